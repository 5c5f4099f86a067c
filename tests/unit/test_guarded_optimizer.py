"""GuardedAdamW (learner/learner.py): a step whose gradient holds NaN or inf is skipped
whole, and its flag is reduced on the device the process group's backend takes."""
from __future__ import annotations

import math

import pytest
import torch

from learner.learner import GuardedAdamW, collective_device


def _params(grads: list[list[float]]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.ones(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_gradient_in_any_tensor_skips_the_whole_step(bad: float) -> None:
    params = _params([[0.5, -0.5], [0.25, bad]])
    opt = GuardedAdamW(params, lr=0.1)
    opt.step()
    assert opt.skipped == 1
    assert all(torch.equal(p.detach(), torch.ones(2)) for p in params)  # neither tensor moved
    assert not opt.state  # no moments were started from the bad step


def test_a_finite_gradient_steps_every_tensor() -> None:
    params = _params([[0.5, -0.5], [0.25, 1.0]])
    opt = GuardedAdamW(params, lr=0.1, weight_decay=0.0)
    opt.step()
    assert opt.skipped == 0
    # AdamW's first step moves each element by lr against its gradient's sign
    assert torch.allclose(params[0].detach(), torch.tensor([0.9, 1.1]), atol=1e-6)
    assert torch.allclose(params[1].detach(), torch.tensor([0.9, 0.9]), atol=1e-6)


def test_the_flag_lives_on_the_cpu_under_gloo(tmp_path) -> None:
    assert collective_device() == torch.device("cpu")  # no process group
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert collective_device() == torch.device("cpu")
        params = _params([[1.0, math.nan]])
        opt = GuardedAdamW(params, lr=0.1)
        opt.step()
        assert opt.skipped == 1
    finally:
        torch.distributed.destroy_process_group()
