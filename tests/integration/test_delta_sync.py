"""sync.delta through the real stack: a DeepSpeed learner in bf16 pushes only the
elements that changed to a vLLM engine (CPU), whose kept copy stays bit-equal to the
learner's weights; a replaced generator gets a full push, then deltas again; and the
same through the learner's shared buffer (sync.transport=shared)."""
import hashlib

import numpy as np
import ray

from cluster.actors.factory import ActorFactory
from tests.helpers import SEQ, hf_logprobs, placed, synthetic_groups

# bf16 weights and a small step: most elements keep their bits from one step to the next
COMMON = ["rollout.num_generators=1", "run.prompts_per_step=4", "rollout.n=4", "sync.bucket_mb=0.1",
          "learner.dtype=bfloat16", "learner.lr=2e-5", "learner.lr_schedule=constant", "sync.delta=true"]


def digest(state: dict) -> dict:
    return {k: hashlib.sha256(np.asarray(v, dtype=np.float32).tobytes()).hexdigest() for k, v in state.items()}


def full_bytes(state: dict) -> int:
    return sum(v.size * 2 for k, v in state.items() if k != "lm_head.weight")  # bf16, lm_head tied


def test_delta_pushes_keep_the_generator_bit_equal_and_a_replacement_gets_a_full_push(tiny_model):
    cfg = placed(COMMON)
    factory = ActorFactory.for_job(cfg, str(tiny_model))
    [gen] = factory.generators()
    learners = factory.learner_group()
    try:
        ray.get([gen.ready.remote(), *[r.ready.remote() for r in learners.ranks]])
        learners.connect([gen])
        first = learners.push(1)  # a group's first push is full, and kept as the base
        state = ray.get(learners.ranks[0].state_dict_numpy.remote())
        assert first["sync/bytes"] == full_bytes(state) and "sync/changed_frac" not in first
        assert ray.get(gen.kept_weights_digest.remote()) == {k: v for k, v in digest(state).items() if k != "lm_head.weight"}
        start = np.array(ray.get(gen.prompt_logprobs.remote(SEQ)))

        for version in (2, 3, 4):
            learners.train(synthetic_groups(seed=version))
            sync = learners.push(version)
            state = ray.get(learners.ranks[0].state_dict_numpy.remote())
            # exactly the changed elements travel: the generator's copy is bit-equal to the learner's
            kept = ray.get(gen.kept_weights_digest.remote())
            assert kept == {k: v for k, v in digest(state).items() if k != "lm_head.weight"}
            assert 0 < sync["sync/changed_frac"] < 0.5, sync
            assert sync["sync/full_bytes"] == full_bytes(state) and sync["sync/bytes"] < 0.8 * full_bytes(state), sync
        delta_lp = np.array(ray.get(gen.prompt_logprobs.remote(SEQ)))
        assert np.abs(delta_lp - start).max() > 1e-4  # the deltas did move the served policy
        assert np.abs(delta_lp - hf_logprobs(tiny_model, state, SEQ)).max() < 1e-4

        # a replacement generator (fresh from the base model) joins: a new group, so a full push,
        # after which it serves exactly what the delta-fed engine served
        ray.kill(gen, no_restart=True)
        gen = factory.generator(0, 4, str(tiny_model))
        ray.get(gen.ready.remote())
        learners.connect([gen])
        again = learners.push(4)
        assert again["sync/bytes"] == full_bytes(state) and "sync/changed_frac" not in again
        np.testing.assert_array_equal(np.array(ray.get(gen.prompt_logprobs.remote(SEQ))), delta_lp)

        learners.train(synthetic_groups(seed=5))
        sync = learners.push(5)
        state = ray.get(learners.ranks[0].state_dict_numpy.remote())
        assert 0 < sync["sync/changed_frac"] < 0.5
        assert ray.get(gen.kept_weights_digest.remote()) == {k: v for k, v in digest(state).items() if k != "lm_head.weight"}
        assert np.abs(np.array(ray.get(gen.prompt_logprobs.remote(SEQ))) - hf_logprobs(tiny_model, state, SEQ)).max() < 1e-4

        # the same pushes through the learner's shared buffer (sync.transport=shared, the
        # colocated default) instead of the gloo group: a full push, then deltas, bit-equal
        learners.sync = learners.sync.model_copy(update={"transport": "shared"})
        learners.connect([gen])
        assert ray.get(gen.ready.remote())["sync_peer"].startswith("shared@")
        for version in (6, 7):
            learners.train(synthetic_groups(seed=version))
            sync = learners.push(version)
            state = ray.get(learners.ranks[0].state_dict_numpy.remote())
            assert ray.get(gen.kept_weights_digest.remote()) == {k: v for k, v in digest(state).items()
                                                                 if k != "lm_head.weight"}
            if version == 6:
                assert sync["sync/bytes"] == full_bytes(state) and "sync/changed_frac" not in sync
            else:
                assert 0 < sync["sync/changed_frac"] < 0.5 and sync["sync/bytes"] < 0.8 * full_bytes(state), sync
        assert np.abs(np.array(ray.get(gen.prompt_logprobs.remote(SEQ))) - hf_logprobs(tiny_model, state, SEQ)).max() < 1e-4
    finally:
        learners.kill()
        ray.shutdown()

