"""The rollout pipeline on real Ray and real reward workers, with fake generators (a
fake of our own small generator interface: submit / collect / abort_all): admission
under the staleness bound, dynamic sampling in rounds, and the fate of every prompt."""
import time

import pytest
import ray

from cluster.config import load_config
from cluster.data import PromptStream
from cluster.commands.train import pipeline_settings
from cluster.flow.pipeline import RolloutPipeline
from rewards.worker import RewardWorker
from tests.fakes import FakeGenerator


def make(rows, overrides, delay=0.0, generators=2):
    cfg = load_config(None, ["run.prompts_per_step=4", "rollout.n=4", "rewards.verifiers={accuracy: 1.0}", *overrides])
    gens = [ray.remote(FakeGenerator).options(max_concurrency=4).remote(delay) for _ in range(generators)]
    workers = [ray.remote(RewardWorker).remote(cfg.rewards, i) for i in range(2)]
    stream = PromptStream(rows, seed=0)
    return cfg, gens, RolloutPipeline(gens, workers, stream, pipeline_settings(cfg), log=lambda m: None), stream


def test_dynamic_sampling_keeps_only_groups_with_signal_in_rounds(ray_session):
    rows = [{"prompt": f"{kind}-{i}", "answer": "1"} for i in range(4) for kind in ("solvable", "mixed")]
    cfg, gens, pipe, stream = make(rows, ["run.dynamic_sampling=true", "run.max_sampling_rounds=3", "run.steps=3",
                                          "run.max_staleness=0"])  # one step's prompts at a time: exact rounds
    # what the rounds must be: the first round takes 4 prompts, each next one as many as are
    # still missing (the mixed prompts are kept), at most 3 rounds
    order, kept, rounds, taken = PromptStream(rows, seed=0), [], 0, []
    while len(kept) < 4 and rounds < 3:
        got = order.take(4 - len(kept))
        taken += got
        kept += [r for r in got if r["prompt"].startswith("mixed")]
        rounds += 1
    pipe.publish(0, 0)
    batch = pipe.next_batch(0, timeout_s=30)
    assert [g.prompt for g in batch.groups] == [r["prompt"] for r in kept[:4]]
    assert [g.prompt for g in batch.sampled] == [r["prompt"] for r in taken]
    assert batch.info["sampling_rounds"] == rounds and batch.info["groups_dropped"] == len(taken) - len(kept)
    ray.get([g.set_version.remote(1) for g in gens])  # the weight push
    pipe.publish(1, 1)
    batch = pipe.next_batch(1, timeout_s=30)
    assert len(batch.groups) <= 4 and batch.info["sampling_rounds"] <= 3
    fates = pipe.close()
    # every prompt taken is trained, dropped (no signal) or still in flight: none lost
    assert fates["taken"] == stream.cursor and fates["taken"] == fates["trained"] + fates.get("dropped/no_signal", 0) \
        + fates["unfinished"]
    assert fates["trained"] == 4 + len(batch.groups)


def test_without_dynamic_sampling_every_group_is_trained(ray_session):
    # the "solvable" prompts' groups have no signal (every sample right, equal rewards):
    # with dynamic sampling off (the default) they are trained on all the same, in one round
    rows = [{"prompt": f"{kind}-{i}", "answer": "1"} for i in range(4) for kind in ("solvable", "mixed")]
    cfg, gens, pipe, stream = make(rows, ["run.steps=2", "run.max_staleness=0"])
    order, trained = PromptStream(rows, seed=0), []
    pipe.publish(0, 0)
    for step in range(2):
        batch = pipe.next_batch(step, timeout_s=30)
        assert [g.prompt for g in batch.groups] == [r["prompt"] for r in order.take(4)]  # the next 4, in order
        assert batch.info["sampling_rounds"] == 1 and batch.info["groups_dropped"] == 0 and not batch.dropped
        trained += batch.groups
        ray.get([g.set_version.remote(step + 1) for g in gens])
        pipe.publish(step + 1, step + 1)
    no_signal = [g.prompt for g in trained if max(g.rewards) == min(g.rewards)]
    assert sorted(no_signal) == sorted(r["prompt"] for r in rows if r["prompt"].startswith("solvable"))
    assert pipe.close() == {"taken": 8, "trained": 8, "unfinished": 0}


@pytest.mark.parametrize("staleness", [0, 2])
def test_staleness_bound_holds_under_a_slow_learner(ray_session, staleness):
    rows = [{"prompt": f"mixed-{i}", "answer": "1"} for i in range(50)]
    steps = 8
    cfg, gens, pipe, stream = make(rows, [f"run.max_staleness={staleness}", f"run.steps={steps}"], delay=0.05)
    seen = []
    pipe.publish(0, 0)
    for step in range(steps):
        batch = pipe.next_batch(step, timeout_s=30)
        assert len(batch.groups) == 4
        stale = [step - s.version for g in batch.groups for s in g.samples]
        assert max(stale) <= staleness and batch.info["staleness/max"] == max(stale)
        seen.append(max(stale))
        time.sleep(0.3)  # a slow learner: the generators have time to run ahead, as far as allowed
        ray.get([g.set_version.remote(step + 1) for g in gens])
        pipe.publish(step + 1, step + 1)
    fates = pipe.close()
    assert fates == {"taken": steps * 4, "trained": steps * 4, "unfinished": 0}
    started = {}
    for g in gens:
        started.update(ray.get(g.started_versions.remote()))
    # a prompt of step b started under version >= b - S; with S = 0 never before its step's weights
    for key, version in started.items():
        assert version >= key // 4 - staleness
    if staleness == 0:
        assert seen == [0] * steps and all(version == key // 4 for key, version in started.items())
    else:
        assert max(seen) >= 1  # the generators did run ahead


def test_closing_the_supervisor_stops_a_replacement_still_starting(ray_session):
    """A command that ends while a lost generator's replacement is still starting (as
    `grpo eval` does when the others finish its prompts first) kills the replacement and
    joins the thread that started it: no thread of ours is left calling Ray after the
    command shuts Ray down (Ray then ends the process with status 1)."""
    from cluster.actors.supervisor import Supervisor
    from cluster.config import FaultConfig
    from tests.fakes import SlowStartGenerator

    class Factory:
        def generator(self, index, version, model_path):
            return ray.remote(SlowStartGenerator).options(num_cpus=0, max_concurrency=2).remote(120.0)

    first = Factory().generator(0, 0, None)
    log = []
    sup = Supervisor(FaultConfig(health_interval_s=0.5), 300.0, Factory(), [first], None, 0, log=log.append)
    sup.generator_lost(0, "killed by the test")
    deadline = time.monotonic() + 30
    while not sup._starting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sup._starting, "the replacement never started"
    replacement = next(iter(sup._starting.values()))
    t0 = time.monotonic()
    sup.close()
    assert not sup._healing.is_alive() and time.monotonic() - t0 < 15
    assert sup.heal_error is None and not any("replacing generators failed" in m for m in log), log
    assert sup.live == [False] and sup.generators == [first]  # nothing half-started is taken in
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(replacement.health.remote(), timeout=10)


def test_generators_sleep_before_the_learners_phase_and_one_that_cannot_is_replaced(ray_session):
    """Colocated on GPUs the driver puts every live generator to sleep before training
    (Supervisor.sleep_generators); one whose sleep fails is lost and replaced like any other."""
    from cluster.actors.supervisor import Supervisor
    from cluster.config import FaultConfig
    from tests.fakes import SleepyGenerator

    class Factory:
        def generator(self, index, version, model_path):
            return ray.remote(SleepyGenerator).options(num_cpus=0, max_concurrency=2).remote()

    good, bad = (ray.remote(SleepyGenerator).options(num_cpus=0, max_concurrency=2).remote(broken)
                 for broken in (False, True))
    log = []
    sup = Supervisor(FaultConfig(health_interval_s=0.5), 60.0, Factory(), [good, bad], None, 0, log=log.append)
    try:
        sup.sleep_generators()
        assert ray.get(good.times_slept.remote()) == 1
        assert sup.live[0] and [f.index for f in sup.faults] == [1]
        assert "could not sleep" in sup.faults[0].cause and "sleep mode failed" in sup.faults[0].cause
        deadline = time.monotonic() + 60
        while not all(sup.live) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(sup.live) and sup.generators[1] is not bad  # replaced, and the replacement sleeps
        sup.sleep_generators()
        assert ray.get(sup.generators[1].times_slept.remote()) == 1 and len(sup.faults) == 1
    finally:
        sup.close()
