"""The learner's gradient does not depend on how a batch is split: one micro-batch or
four, one rank or two (real DeepSpeed ranks in Ray actors, gloo, fp32)."""
import random

import numpy as np
import pytest
import ray

from cluster import placement
from cluster.config import load_config
from rollout.types import Group, Sample


def synthetic_groups(num_groups=4, n=4, seed=0) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [rng.randrange(3, 90) for _ in range(rng.randint(3, 6))]
        samples = []
        for _ in range(n):
            ids = [rng.randrange(3, 90) for _ in range(rng.randint(2, 9))]  # unequal lengths
            samples.append(Sample(ids, [-1.0] * len(ids), "", "stop", 0))
        groups.append(Group(prompt, "", {}, samples, rewards=[float(rng.random() < 0.5) + 0.1 * i for i in range(n)]))
    return groups


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def gradients(model_dir, groups, reduction, micro, ranks, zero_stage=0, kl_coef=0.0):
    cfg = load_config(None, [f"learner.reduction={reduction}", f"learner.micro_batch_size={micro}",
                             f"learner.num_ranks={ranks}", "run.prompts_per_step=4", "rollout.n=4",
                             f"learner.zero_stage={zero_stage}", f"learner.kl_coef={kl_coef}"])
    learners, pg = placement.make_learners(str(model_dir), cfg, sequences_per_step=16)
    bounds = [(0, 4)] if ranks == 1 else [(0, 2), (2, 4)]
    ref = ray.put(groups)
    results = ray.get([lrn.train_step.remote(ref, b, capture_gradients=True) for lrn, b in zip(learners, bounds)])
    for lrn in learners:
        ray.kill(lrn)
    ray.util.remove_placement_group(pg)  # free the learners' reserved CPUs
    return [r["gradients"] for r in results]


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
def test_gradient_is_independent_of_micro_batches_and_ranks(ray_session, tiny_model, reduction):
    groups = synthetic_groups()
    [whole] = gradients(tiny_model, groups, reduction, micro=16, ranks=1)
    [four_micro] = gradients(tiny_model, groups, reduction, micro=4, ranks=1)
    two_ranks = gradients(tiny_model, groups, reduction, micro=4, ranks=2)
    assert set(whole) == set(four_micro) == set(two_ranks[0]) and len(whole) > 10
    assert max(np.abs(v).max() for v in whole.values()) > 1e-4  # a real gradient
    for name, g in whole.items():
        np.testing.assert_allclose(four_micro[name], g, atol=1e-6, rtol=0, err_msg=name)
        for rank_grads in two_ranks:  # every rank holds the reduced (global) gradient
            np.testing.assert_allclose(rank_grads[name], g, atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_on_two_ranks_gives_the_same_gradient_as_stage0(ray_session, tiny_model, stage):
    # with a KL term, so the frozen reference (sharded under ZeRO-3) is exercised too
    groups = synthetic_groups(seed=1)
    [stage0] = gradients(tiny_model, groups, "token_mean", micro=16, ranks=1, kl_coef=0.1)
    zero = gradients(tiny_model, groups, "token_mean", micro=8, ranks=2, zero_stage=stage, kl_coef=0.1)
    assert set(zero[0]) == set(stage0)
    for name, g in stage0.items():
        for rank_grads in zero:
            np.testing.assert_allclose(rank_grads[name], g, atol=1e-6, rtol=0, err_msg=name)
