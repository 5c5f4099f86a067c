"""The math of the update: pure functions of tensors, registered by name.

What the loss *is* (a policy loss) is kept apart from how per-token values are
*reduced* to one number (a reduction): two settings, never one string for both.

Shapes: G groups of n samples; B sequences; T completion positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass
class LossInputs:
    logprobs: torch.Tensor  # (B, T) current policy, with grad
    old_logprobs: torch.Tensor  # (B, T) the policy that sampled (recomputed), no grad
    advantages: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, T) 1 on completion tokens that count
    clip_low: float
    clip_high: float


@dataclass
class Normaliser:
    """Sizes of the *global* batch (all ranks, all micro-batches of one optimizer
    step): dividing by them makes the summed micro-batch losses independent of the split."""

    tokens: float
    sequences: float
    constant: float  # Dr. GRPO's fixed length normaliser (the generation budget)


class AdvantageFn(Protocol):
    def __call__(self, rewards: torch.Tensor, eps: float) -> torch.Tensor:
        """rewards (G, n) -> advantages (G, n), one per sample."""


class PolicyLossFn(Protocol):
    def __call__(self, x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (per-token loss (B, T), per-token "was clipped" (B, T) as float)."""


class ReductionFn(Protocol):
    def __call__(self, values: torch.Tensor, mask: torch.Tensor, norm: Normaliser) -> torch.Tensor:
        """values, mask (B, T) -> this micro-batch's share of the global scalar."""


ADVANTAGES: dict[str, AdvantageFn] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
REDUCTIONS: dict[str, ReductionFn] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def _register(table: dict, name: str) -> Callable:
    def deco(fn):
        if name in table:
            raise ValueError(f"{name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; registered: {sorted(table)}") from None


# ------------------------------------------------------------------ advantages
def _group_std(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards[:, :1])
    return rewards.std(dim=1, keepdim=True)


@_register(ADVANTAGES, "grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(r - mean(group)) / (std(group) + eps), std unbiased (DeepSeekMath's GRPO)."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (_group_std(rewards) + eps)


@_register(ADVANTAGES, "dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """r - mean(group): Dr. GRPO drops the std division (it favours easy/hard groups)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@_register(ADVANTAGES, "rloo")
def rloo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """r_i - mean of the other n-1 rewards of the group (RLOO, Ahmadian et al. 2024)."""
    n = rewards.shape[1]
    if n < 2:
        return torch.zeros_like(rewards)
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)
    return rewards - others


@_register(ADVANTAGES, "reinforce_pp")
def reinforce_pp_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """REINFORCE++ (baseline variant): r - mean(group), then whitened over the whole
    batch: (a - mean(a)) / (std(a) + eps). Needs every group of the step, not a shard."""
    a = rewards - rewards.mean(dim=1, keepdim=True)
    return (a - a.mean()) / (a.std() + eps) if a.numel() > 1 else torch.zeros_like(a)


# --------------------------------------------------------------- policy losses
@_register(POLICY_LOSSES, "ppo_clip")
def ppo_clip_loss(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with separate bounds (DAPO's clip-higher):
    max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old) per token."""
    ratio = torch.exp(x.logprobs - x.old_logprobs)
    adv = x.advantages.unsqueeze(-1)  # (B, 1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - x.clip_low, 1.0 + x.clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@_register(POLICY_LOSSES, "gspo")
def gspo_loss(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO: one ratio per sequence, s = exp(mean_t (logp - old)), clipped per sequence;
    written per token as sg(s) * exp(logp_t - sg(logp_t)) so each token's gradient is
    s * grad logp_t / |y| once reduced with seq_mean_token_mean."""
    lengths = x.mask.sum(dim=-1).clamp(min=1.0)  # (B,)
    log_s = ((x.logprobs - x.old_logprobs) * x.mask).sum(dim=-1) / lengths  # (B,)
    s_token = torch.exp(log_s.detach().unsqueeze(-1) + x.logprobs - x.logprobs.detach())  # (B, T)
    adv = x.advantages.unsqueeze(-1)
    unclipped = -adv * s_token
    clipped = -adv * torch.clamp(s_token, 1.0 - x.clip_low, 1.0 + x.clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@_register(POLICY_LOSSES, "pg")
def policy_gradient_loss(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain on-policy policy gradient (REINFORCE): -A * logp per token, no ratio, no clip."""
    return -x.advantages.unsqueeze(-1) * x.logprobs, torch.zeros_like(x.logprobs)


# ------------------------------------------------------------------ reductions
@_register(REDUCTIONS, "token_mean")
def token_mean(values: torch.Tensor, mask: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Sum over every valid token / the global batch's token count (DAPO)."""
    return (values * mask).sum() / norm.tokens


@_register(REDUCTIONS, "seq_mean_token_mean")
def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Mean over each sequence's tokens, then mean over the global batch's sequences
    (the original GRPO)."""
    per_seq = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return per_seq.sum() / norm.sequences


@_register(REDUCTIONS, "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(values: torch.Tensor, mask: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Each sequence's token sum / a constant (the generation budget), then mean over
    the global batch's sequences (Dr. GRPO: no length bias)."""
    return ((values * mask).sum(dim=-1) / norm.constant).sum() / norm.sequences


# ------------------------------------------------------------------------- KL
@_register(KL_ESTIMATORS, "k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log(pi / ref): unbiased, can be negative per token."""
    return logprobs - ref_logprobs


@_register(KL_ESTIMATORS, "k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 * log(pi / ref)^2: biased, low variance, >= 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@_register(KL_ESTIMATORS, "k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3: exp(d) - d - 1, d = ref - logp. Unbiased, always >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


# ---------------------------------------------------------------- log-probs
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (B, T, V) predicting targets (B, T) -> logprob of each target (B, T),
    in fp32, logits divided by the sampling temperature as the sampler did."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (B, T, V) -> entropy of each position's distribution (B, T), fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
