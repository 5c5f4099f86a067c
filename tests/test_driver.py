"""The driver's batch collection with dynamic sampling, on real Ray and real reward
workers, with a fake generator (a fake of our own small interface)."""
import pytest
import ray

from cluster.config import load_config
from cluster.data import PromptStream
from cluster.driver import Actors, collect_batch, shard_bounds, slowest_generator, split
from rewards.worker import RewardWorker
from rollout.types import Group, Sample


class FakeGenerator:
    """Answers prompts "solvable-K" correctly in every sample and "mixed-K" in half."""

    def generate(self, rows, seed):
        groups = []
        for row in rows:
            texts = ["<answer>1</answer>"] * 4 if row["prompt"].startswith("solvable") else \
                ["<answer>1</answer>", "<answer>0</answer>"] * 2
            groups.append(Group([1], row["prompt"], row, [Sample([1], [0.0], t, "stop", 0) for t in texts]))
        return groups


def test_dynamic_sampling_keeps_only_groups_with_signal():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        rows = [{"prompt": f"{kind}-{i}", "answer": "1"} for i in range(4) for kind in ("solvable", "mixed")]
        cfg = load_config(None, ["run.prompts_per_step=4", "rollout.num_generators=2", "rewards.verifiers={accuracy: 1.0}",
                                 "run.dynamic_sampling=true", "run.max_sampling_rounds=3"])
        actors = Actors([ray.remote(FakeGenerator).remote() for _ in range(2)],
                        [ray.remote(RewardWorker).remote(cfg.rewards)], [])
        stream = PromptStream(rows, seed=0)

        def mixed_in_next(count):  # what the next `count` prompts hold, without consuming them
            return sum(r["prompt"].startswith("mixed") for r in PromptStream(rows, 0, stream.cursor).take(count))

        kept, sampled, info = collect_batch(actors, stream, cfg, step=0)
        assert len(kept) == 4 and all(g.prompt.startswith("mixed") for g in kept)  # one epoch holds 4 mixed
        assert info["sampling_rounds"] == 2 and info["groups_dropped"] == 4 and len(sampled) == 8

        cfg.run.max_sampling_rounds = 1  # the cap: train on what there is
        mixed = mixed_in_next(4)
        kept, sampled, info = collect_batch(actors, stream, cfg, step=1)
        assert len(kept) == mixed and info["groups_dropped"] == 4 - mixed and info["sampling_rounds"] == 1

        cfg.run.dynamic_sampling = False
        kept, sampled, info = collect_batch(actors, stream, cfg, step=2)
        assert len(kept) == 4 and kept == sampled and info["groups_dropped"] == 0
    finally:
        ray.shutdown()


def test_split_and_shard_bounds_agree():
    items = list(range(10))
    assert split(items, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]


def test_generator_timings_take_the_slowest_and_count_the_sync_once():
    a = {"generate/engine": 2.0, "generate/convert": 0.01, "sync/start": 0.01, "sync/receive": 0.3,
         "sync/wait": 0.1, "sync/load": 0.2, "sync/finish": 0.02}
    b = {"generate/engine": 2.5, "generate/convert": 0.005, "sync/start": 0.01, "sync/receive": 0.2, "sync/finish": 0.01}
    out = slowest_generator([a, b])
    assert out["time/generate_engine"] == 2.5 and out["time/generate_convert"] == 0.01
    # wait and load are parts of receive: 0.01 + 0.3 + 0.02, not 0.63
    assert out["time/sync_generator"] == pytest.approx(0.33)
