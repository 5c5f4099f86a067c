"""The math of the update: pure functions of tensors, registered by name.

What the loss *is* (a policy loss) is kept apart from how per-token values are
*reduced* to one number (a reduction): two settings, never one string for both.

Shapes: G groups of n samples; B = G * n sequences; T completion positions.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch


class AdvantageFn(Protocol):
    def __call__(self, rewards: torch.Tensor, eps: float) -> torch.Tensor:
        """rewards (G, n) -> advantages (G, n), one per sample."""


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        clip_eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logprobs, old_logprobs (B, T); advantages (B,) ->
        (per-token loss (B, T), per-token "was clipped" (B, T) as float)."""


class ReductionFn(Protocol):
    def __call__(self, values: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
        """values, mask (B, T) -> scalar. `normaliser` is computed over the *global*
        batch (all ranks, all micro-batches), so summing the scalars of every
        micro-batch on every rank gives the same number however the batch is split."""


ADVANTAGES: dict[str, AdvantageFn] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
REDUCTIONS: dict[str, ReductionFn] = {}


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


@_register(ADVANTAGES, "grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(r - mean(group)) / (std(group) + eps), std unbiased (DeepSeekMath's GRPO)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


@_register(POLICY_LOSSES, "ppo_clip")
def ppo_clip_loss(logprobs, old_logprobs, advantages, clip_eps):
    """PPO's clipped surrogate: max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@_register(REDUCTIONS, "token_mean")
def token_mean(values: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
    """Sum over every valid token divided by the global batch's token count (DAPO)."""
    return (values * mask).sum() / normaliser


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), per token: exp(d) - d - 1, d = ref - logp.
    Unbiased, always >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (B, T, V) predicting targets (B, T) -> logprob of each target (B, T),
    computed in fp32, logits divided by the sampling temperature as the sampler did."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
