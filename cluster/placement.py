"""Putting the actors on a Ray cluster: generators, reward workers, learner ranks.

Every actor gets its resources from ClusterConfig; learner ranks share one placement
group (PACK) so they land together. The same code serves CPU and GPU clusters.
"""
from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig, Config
from learner.learner import Learner
from rewards.worker import RewardWorker
from rollout.generator import ENGINE_ENV, Generator


def start_ray(cfg: ClusterConfig) -> None:
    """Join `cfg.address`, the cluster a `ray job submit` entrypoint runs in
    (RAY_ADDRESS), or start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=False,
        )


def thread_env(cfg: ClusterConfig) -> dict[str, str]:
    n = str(cfg.threads_per_actor)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def generator_options(cfg: Config) -> dict[str, Any]:
    """Ray options of a generator actor (benchmarks give raw engines the same)."""
    # A variable the user exported wins over our defaults.
    env = {**ENGINE_ENV, **thread_env(cfg.cluster)}
    env.update({k: os.environ[k] for k in env if k in os.environ})
    return {"num_cpus": cfg.cluster.generator_cpus, "num_gpus": cfg.cluster.generator_gpus,
            "runtime_env": {"env_vars": env}}


def make_generators(model_path: str, cfg: Config) -> list[Any]:
    actor = ray.remote(Generator)
    return [
        actor.options(**generator_options(cfg)).remote(model_path, cfg.rollout, i)
        for i in range(cfg.rollout.num_generators)
    ]


def make_reward_workers(cfg: Config) -> list[Any]:
    actor = ray.remote(RewardWorker)
    return [
        actor.options(num_cpus=cfg.cluster.reward_cpus).remote(cfg.rewards, i)
        for i in range(cfg.rewards.num_workers)
    ]


@ray.remote
def _address_and_port(local: bool) -> tuple[str, int]:
    from vllm.utils.network_utils import get_ip, get_open_port

    return ("127.0.0.1" if local else get_ip()), get_open_port()


def make_learners(model_path: str, cfg: Config, sequences_per_step: int) -> tuple[list[Any], Any]:
    """All learner ranks in one PACK placement group; rank 0 hosts the rendezvous.
    -> (rank actors, the placement group: remove it to free their resources)."""
    n = cfg.learner.num_ranks
    bundle = {"CPU": cfg.cluster.learner_cpus}
    if cfg.cluster.learner_gpus:
        bundle["GPU"] = cfg.cluster.learner_gpus
    pg = placement_group([bundle] * n, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=600)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"the cluster cannot place {n} learner rank(s) of {bundle} (PACK) within 600 s") from None
    # Rank 0 hosts the DeepSpeed rendezvous: take an address and port on its node.
    master_addr, master_port = ray.get(
        _address_and_port.options(
            num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        ).remote(n == 1)
    )
    actor = ray.remote(Learner)
    dist_backend = "nccl" if cfg.cluster.learner_gpus else "gloo"
    learners = [
        actor.options(
            num_cpus=cfg.cluster.learner_cpus,
            num_gpus=cfg.cluster.learner_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            runtime_env={"env_vars": thread_env(cfg.cluster)},
        ).remote(
            model_path, cfg.learner, rank, n, master_addr, master_port,
            sequences_per_step, cfg.run.steps, cfg.rollout.temperature, cfg.rollout.max_tokens, dist_backend,
        )
        for rank in range(n)
    ]
    return learners, pg
