"""Under ZeRO-3 the weights stream to vLLM bucket by bucket (gather a bucket on every
rank, rank 0 sends it, free it) and vLLM then matches transformers on the same weights."""
import numpy as np
import pytest
import ray

from cluster import placement
from cluster.config import load_config
from tests.test_learner_equivalence import synthetic_groups
from tests.test_weight_sync import hf_logprobs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero3_bucketed_stream_matches_transformers(tiny_model, dtype):
    cfg = load_config(None, ["rollout.num_generators=1", "cluster.num_cpus=2", "learner.num_ranks=2", f"learner.dtype={dtype}",
                             "learner.zero_stage=3", "learner.lr=0.01", "run.prompts_per_step=4", "rollout.n=4",
                             "sync.bucket_mb=0.1", "cluster.learner_cpus=0.5", "cluster.generator_cpus=0.5"])
    placement.start_ray(cfg.cluster)
    try:
        [gen] = placement.make_generators(str(tiny_model), cfg)
        learners, _ = placement.make_learners(str(tiny_model), cfg, sequences_per_step=16)
        ray.get([gen.ready.remote()] + [lrn.ready.remote() for lrn in learners])
        ray.get([learners[0].connect_generators.remote([gen], [1], cfg.sync),
                 learners[1].connect_generators.remote(None, None, cfg.sync)])
        seq = [20, 21, 14, 26, 32, 31, 87, 75, 76, 81, 78, 33, 23, 87, 33]
        old = np.array(ray.get(gen.prompt_logprobs.remote(seq)))
        groups = ray.put(synthetic_groups())
        ray.get([lrn.train_step.remote(groups, b) for lrn, b in zip(learners, [(0, 2), (2, 4)])])
        # 0.1 MiB buckets: the 2 MB model goes in many gathers, never all at once
        results = ray.get([lrn.broadcast_weights.remote(1) for lrn in learners])
        state = ray.get([lrn.state_dict_numpy.remote() for lrn in learners])  # a gather: every rank
        itemsize = 2 if dtype == "bfloat16" else 4  # bf16 weights travel as bf16
        assert results[0]["sync/bytes"] == sum(v.size * itemsize for k, v in state[0].items() if k != "lm_head.weight")
        for k in state[0]:
            np.testing.assert_array_equal(state[0][k], state[1][k])
        new = np.array(ray.get(gen.prompt_logprobs.remote(seq)))
        assert np.abs(new - hf_logprobs(tiny_model, state[0], seq)).max() <= 1e-4
        assert np.abs(new - old).max() > 1e-3
        assert ray.get(gen.ready.remote())["version"] == 1
    finally:
        ray.shutdown()
