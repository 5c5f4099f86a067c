"""Under ZeRO-3 the weights stream to vLLM bucket by bucket (gather a bucket on every
rank, rank 0 sends it, free it) and vLLM then matches transformers on the same weights."""
import numpy as np
import pytest
import ray

from cluster.actors.factory import ActorFactory
from tests.helpers import SEQ, hf_logprobs, placed, synthetic_groups

COMMON = ["rollout.num_generators=1", "learner.num_ranks=2", "learner.zero_stage=3", "learner.lr=0.01",
          "run.prompts_per_step=4", "rollout.n=4", "sync.bucket_mb=0.1", "cluster.learner_cpus=0.5"]


@pytest.fixture(scope="module")
def generator(tiny_model):
    [gen] = ActorFactory.for_job(placed(COMMON), str(tiny_model)).generators()
    yield gen
    ray.shutdown()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero3_bucketed_stream_matches_transformers(tiny_model, generator, dtype):
    gen = generator
    cfg = placed([*COMMON, f"learner.dtype={dtype}"])
    learners = ActorFactory.for_job(cfg, str(tiny_model)).learner_group()
    try:
        ray.get([gen.ready.remote()] + [r.ready.remote() for r in learners.ranks])
        learners.connect([gen])
        old = np.array(ray.get(gen.prompt_logprobs.remote(SEQ)))
        learners.train(synthetic_groups())
        # 0.1 MiB buckets: the 2 MB model goes in many gathers, never all at once
        results = ray.get([r.broadcast_weights.remote(1) for r in learners.ranks])
        state = ray.get([r.state_dict_numpy.remote() for r in learners.ranks])  # a gather: every rank
        itemsize = 2 if dtype == "bfloat16" else 4  # bf16 weights travel as bf16
        assert results[0]["sync/bytes"] == sum(v.size * itemsize for k, v in state[0].items() if k != "lm_head.weight")
        for k in state[0]:
            np.testing.assert_array_equal(state[0][k], state[1][k])
        new = np.array(ray.get(gen.prompt_logprobs.remote(SEQ)))
        assert np.abs(new - hf_logprobs(tiny_model, state[0], SEQ)).max() <= 1e-4
        assert np.abs(new - old).max() > 1e-3
        assert ray.get(gen.ready.remote())["version"] == 1
    finally:
        learners.kill()
