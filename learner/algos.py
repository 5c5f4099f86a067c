"""The math of the update: pure functions of tensors, registered by name.

What the loss *is* (a policy loss) is kept apart from how per-token values are
*reduced* to one number (a reduction): two settings, never one string for both.

Shapes: G groups of n samples; B sequences; T completion positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch
else:
    class _Torch:
        """torch, imported on first use: the config checks names against these
        registries when it loads, without paying torch's import (~3 s)."""

        def __getattr__(self, name: str):
            import torch as _torch

            return getattr(_torch, name)

    torch = _Torch()


@dataclass
class LossInputs:
    logprobs: torch.Tensor  # (B, T) current policy, with grad
    old_logprobs: torch.Tensor  # (B, T) the proximal policy (the learner before this step's update), no grad
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
# As loss terms (kl_coef * estimator, differentiated through logprobs; tokens are
# sampled from the policy pi): k1's expected gradient is 0 on-policy (E_pi[grad log pi]
# = 0), so it only adds noise; k2's is grad KL(pi || ref); k3's is grad KL(ref || pi).
@_register(KL_ESTIMATORS, "k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log(pi / ref): unbiased estimate of KL(pi || ref), can be negative per token."""
    return logprobs - ref_logprobs


@_register(KL_ESTIMATORS, "k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 * log(pi / ref)^2: biased, low variance, >= 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@_register(KL_ESTIMATORS, "k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3: exp(d) - d - 1, d = ref - logp. Unbiased for KL(pi || ref), >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


# ------------------------------------------------------ off-policy correction
class ISCorrectionFn(Protocol):
    def __call__(self, proximal: torch.Tensor, behaviour: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """logprobs (B, T) of the proximal policy (the learner, before this step's
        update) and of the behaviour policy (the sampler) -> per-token weight (B, T),
        0 where a token is masked out. No gradient flows through it."""


IS_CORRECTIONS: dict[str, ISCorrectionFn] = {}


@_register(IS_CORRECTIONS, "none")
def no_correction(proximal: torch.Tensor, behaviour: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Treat the samples as on-policy: weight 1."""
    return torch.ones_like(proximal)


@_register(IS_CORRECTIONS, "tis")
def truncated_is(proximal: torch.Tensor, behaviour: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Truncated importance sampling (verl/slime): min(pi_prox / pi_behaviour, high) per token."""
    return torch.exp(proximal - behaviour).clamp(max=high)


@_register(IS_CORRECTIONS, "mask")
def masked_is(proximal: torch.Tensor, behaviour: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """IcePop: tokens whose ratio pi_prox / pi_behaviour falls outside [low, high] get
    no loss; the others weight 1."""
    ratio = torch.exp(proximal - behaviour)
    return ((ratio >= low) & (ratio <= high)).to(proximal.dtype)


def mismatch_kl(proximal: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(behaviour || proximal) on tokens drawn from the
    behaviour policy: r - 1 - log r, r = pi_prox / pi_behaviour (>= 0)."""
    log_r = proximal - behaviour
    return torch.exp(log_r) - 1.0 - log_r


# ---------------------------------------------------------------- log-probs
def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V) predicting targets (B, T) -> (logprob of each target (B, T), with
    grad; entropy of each position's distribution (B, T), no grad), in fp32, logits
    divided by the sampling temperature as the sampler did.

    The logprob is gather - logsumexp (no (B, T, V) log-softmax kept for backward);
    the entropy is computed in chunks of rows, so at most one chunk of fp32
    probabilities exists beside the logits."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    logz = torch.logsumexp(scaled, dim=-1)  # (B, T)
    logp = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.no_grad():
        flat, flat_logz = scaled.detach().reshape(-1, scaled.shape[-1]), logz.detach().reshape(-1)
        ent = torch.empty_like(flat_logz)
        for i in range(0, flat.shape[0], chunk_rows):
            z = flat[i : i + chunk_rows]
            p = torch.softmax(z, dim=-1)
            ent[i : i + chunk_rows] = flat_logz[i : i + chunk_rows] - (p * z).sum(dim=-1)
    return logp, ent.reshape(logz.shape)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (B, T, V) -> logprob of each target (B, T), fp32, at the sampling temperature."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
