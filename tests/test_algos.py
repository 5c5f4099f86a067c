"""Advantage, loss and reduction values against numbers worked out by hand."""
import math

import pytest
import torch

from learner import algos
from learner.learner import build_batch
from rollout.types import Group, Sample


def test_grpo_advantages_match_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    adv = algos.ADVANTAGES["grpo"](rewards, 1e-6)
    # group 1: mean 0.5, unbiased std sqrt(((.5^2)*4)/3) = sqrt(1/3) = 0.57735
    s = math.sqrt(1 / 3)
    expected = [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6)]
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-9)
    assert adv[0, 0].item() == pytest.approx(0.866024, abs=1e-5)
    # all-equal group: no signal
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_ppo_clip_loss_values():
    # ratios: exp(0)=1, exp(ln 1.5)=1.5, exp(ln 0.5)=0.5
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
    adv = torch.tensor([2.0, -1.0])
    loss, clipped = algos.POLICY_LOSSES["ppo_clip"](logp, old, adv, 0.2)
    # A=+2: max(-2r, -2 clip(r)): r=1 -> -2; r=1.5 -> max(-3, -2.4) = -2.4 (clipped); r=.5 -> max(-1, -1.6) = -1
    # A=-1: r=1 -> 1; r=1.5 -> max(1.5, 1.2) = 1.5; r=.5 -> max(.5, .8) = .8 (clipped)
    assert torch.allclose(loss, torch.tensor([[-2.0, -2.4, -1.0], [1.0, 1.5, 0.8]]), atol=1e-6)
    assert clipped.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_ppo_clip_gradient_is_advantage_at_ratio_one():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = algos.POLICY_LOSSES["ppo_clip"](logp, torch.zeros(1, 2), torch.tensor([0.7]), 0.2)
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.7, -0.7]]))


def test_kl_k3_values():
    logp = torch.tensor([0.0, -1.0, -2.0])
    ref = torch.tensor([0.0, -2.0, -1.0])
    # d = ref - logp = [0, -1, 1]; k3 = e^d - d - 1 = [0, e^-1, e - 2]
    assert algos.kl_k3(logp, ref).tolist() == pytest.approx([0.0, math.exp(-1), math.e - 2], abs=1e-6)


def test_token_mean_is_split_invariant():
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float32)
    whole = algos.REDUCTIONS["token_mean"](values, mask, float(mask.sum()))
    parts = sum(algos.REDUCTIONS["token_mean"](values[i : i + 1], mask[i : i + 1], float(mask.sum())) for i in range(3))
    # (0+1 + 4+5+6+7 + 9) / 7 = 32 / 7
    assert whole.item() == pytest.approx(32 / 7)
    assert parts.item() == pytest.approx(32 / 7)


def test_token_logprobs_uses_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp = algos.token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert lp.item() == pytest.approx(math.log(math.e / (math.e + 1)))


def test_lookup_names_the_registered_choices():
    with pytest.raises(ValueError, match="unknown policy loss 'nope'.*ppo_clip"):
        algos.lookup(algos.POLICY_LOSSES, "nope", "policy loss")


def test_build_batch_masks_exactly_the_completion_targets():
    g = Group([5, 6, 7], "p", {}, [Sample([8, 9], [-0.1, -0.2], "", "stop", 3), Sample([8], [-0.3], "", "length", 3)])
    b = build_batch([g], torch.tensor([[1.0, -1.0]]), pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]]
    # targets are input_ids[:, 1:] = [6, 7, 8, 9]: completion tokens 8, 9 at positions 2, 3
    assert b.loss_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert torch.allclose(b.sampler_logprobs, torch.tensor([[0, 0, -0.1, -0.2], [0, 0, -0.3, 0]]))
    assert b.advantages.tolist() == [1.0, -1.0]


def test_lr_schedule_warmup_then_cosine():
    from learner.config import LearnerConfig
    from learner.learner import lr_factor

    cfg = LearnerConfig(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg, total=7) for s in range(7)]
    # warm-up 1/3, 2/3; then cosine over steps 2..6 (span 4): 1, (1+cos(pi/4))/2 scaled, ..., 0.1
    expected_mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[3] == pytest.approx(expected_mid) and factors[4] == pytest.approx(0.55)
    assert factors[6] == pytest.approx(0.1)
    assert lr_factor(5, LearnerConfig(lr_schedule="constant"), total=7) == 1.0
