"""Resource shares, threads and core sets of both placements, from a described cluster
(no Ray): what `place` fills in before any actor starts."""
import os

import pytest

from cluster.actors.placement import (core_sets, demand, learner_only, pair_bundle, resolve_resources, resolve_transport,
                                     thread_env, whole_cores)
from cluster.config import ConfigError, load_config

TWO_CORES = [{"CPU": 2.0, "memory": 1e10}]


def resolved(*overrides: str, nodes=TWO_CORES):
    return resolve_resources(load_config(None, list(overrides)), nodes).cluster


def test_disaggregated_default_job_gives_each_actor_one_core_of_its_own():
    c = resolved()
    assert c.placement == "disaggregated"
    # the reward workers get no share that would cost an actor its core (they mostly wait)
    assert (c.generator_cpus, c.learner_cpus, c.reward_cpus) == (1.0, 1.0, 0.0)
    assert (c.generator_threads, c.learner_threads) == (1, 1)


def test_a_learner_only_job_takes_every_core_with_one_thread_per_core():
    # the cold start and `grpo sft`: every core, one thread per core (one rank)
    cfg = resolve_resources(learner_only(load_config(None, ["cluster.placement=colocated", "run.max_staleness=0"])),
                            TWO_CORES)
    assert cfg.cluster.placement == "disaggregated" and cfg.rollout.num_generators == 0
    assert cfg.cluster.learner_cpus == 1.9 and cfg.cluster.learner_threads == 2  # 0.1 to the reward worker
    # a reward worker's tenth of a core costs no thread
    c = resolved("learner.num_ranks=1", "rollout.num_generators=1", "rewards.num_workers=1", nodes=[{"CPU": 3.0}])
    assert (c.reward_cpus, c.generator_cpus, c.generator_threads) == (0.1, 1.45, 1)
    assert [whole_cores(x) for x in (0.5, 0.99, 1.5, 1.98, 2.0, 3.89)] == [1, 1, 1, 2, 2, 3]


def test_colocated_pair_shares_the_machine_and_both_actors_run_on_every_core():
    cfg = load_config(None, ["cluster.placement=colocated", "run.max_staleness=0"])
    c = resolve_resources(cfg, TWO_CORES).cluster
    assert (c.generator_cpus, c.learner_cpus, c.reward_cpus) == (1.0, 1.0, 0.0)  # Ray's halves of the pair's bundle
    assert (c.generator_threads, c.learner_threads) == (2, 2)  # but each runs on all of it, in turn
    roles = {r.name: (r.count, r.resources) for r in demand(resolve_resources(cfg, TWO_CORES))}
    assert roles == {"reward worker": (1, {}), "colocated pair": (1, {"CPU": 2.0})}
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) == 2:
        assert core_sets(c, 1, 1, TWO_CORES) == {"learner 0": cores, "generator 0": cores}


def test_colocated_pairs_on_a_larger_node_get_disjoint_core_sets():
    nodes = [{"CPU": 8.0}]
    c = resolved("cluster.placement=colocated", "run.max_staleness=0", "learner.num_ranks=2",
                 "rollout.num_generators=2", nodes=nodes)
    assert (c.generator_threads, c.learner_threads) == (4, 4)  # 8 CPUs, 4 a pair
    if len(os.sched_getaffinity(0)) >= 8:
        sets = core_sets(c, 2, 2, nodes)
        assert sets["generator 0"] == sets["learner 0"] and sets["generator 1"] == sets["learner 1"]
        assert not set(sets["learner 0"]) & set(sets["learner 1"])


def test_colocated_threads_soon_sleep_and_an_exported_setting_wins(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert thread_env(2, [0, 1], colocated=True) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                                     "GOMP_SPINCOUNT": "10000", "GRPO_CPU_SET": "0,1"}
    assert "GOMP_SPINCOUNT" not in thread_env(1)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert thread_env(2, colocated=True)["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.parametrize("overrides, words", [
    (["cluster.placement=colocated"], "run.max_staleness=0 (got 1)"),
    (["cluster.placement=colocated", "run.max_staleness=0", "learner.num_ranks=2"],
     "rollout.num_generators (1) must equal learner.num_ranks (2)"),
    (["cluster.placement=colocated", "run.max_staleness=0", "rollout.tensor_parallel_size=2"],
     "tensor_parallel_size > 1"),
    (["cluster.placement=hybrid"], "cluster.placement"),
    (["cluster.placement=colocated", "run.max_staleness=0", "cluster.learner_gpus=1", "cluster.generator_gpus=1"],
     "add up to <= 1 (got 1 + 1)"),
    (["cluster.placement=colocated", "run.max_staleness=0", "cluster.learner_gpus=0.5", "cluster.generator_gpus=0.5",
      "sync.transport=collective"], "NCCL refuses"),
    (["cluster.placement=colocated", "run.max_staleness=0", "cluster.learner_gpus=0.5", "cluster.generator_gpus=0.5",
      "learner.num_ranks=2", "rollout.num_generators=2"], "one pair only for now"),
    (["sync.transport=shared", "cluster.learner_gpus=1", "cluster.generator_gpus=1"], "for colocated pairs"),
])
def test_a_colocated_job_that_cannot_take_turns_is_refused_at_load(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert words in str(e.value)


def test_colocated_pairs_on_gpus_share_one_gpu_and_push_by_shared_memory():
    """The GPU colocated path as far as it is decided before any actor starts (the rest,
    CUDA IPC and vLLM's sleep mode, needs a GPU: unverified)."""
    cfg = load_config(None, ["cluster.placement=colocated", "run.max_staleness=0", "cluster.generator_gpus=0.4",
                             "cluster.learner_gpus=0.6", "sync.backend=nccl"])
    nodes = [{"CPU": 16.0, "GPU": 2.0}]
    cfg = resolve_transport(resolve_resources(cfg, nodes))
    assert cfg.sync.transport == "shared"  # auto: NCCL would refuse two ranks on one GPU
    c = cfg.cluster
    assert (c.generator_cpus, c.learner_cpus, c.generator_threads, c.learner_threads) == (1.0, 1.0, 1, 1)
    assert pair_bundle(c) == {"CPU": 2.0, "GPU": 1.0}
    roles = {r.name: (r.count, r.resources) for r in demand(cfg)}
    assert roles["colocated pair"] == (1, {"CPU": 2.0, "GPU": 1.0})
    # disaggregated stays on the collective; an explicit choice is kept
    assert resolve_transport(load_config(None, [])).sync.transport == "collective"
    explicit = load_config(None, ["cluster.placement=colocated", "run.max_staleness=0", "sync.transport=collective"])
    assert resolve_transport(explicit).sync.transport == "collective"
