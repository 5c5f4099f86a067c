"""Config sections owned by learner/. Imports only pydantic: cheap to import."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollout.config import Section


class TinyModelConfig(Section):
    """The built-in Qwen2-architecture model with a character-level tokenizer."""

    hidden_size: int = Field(128, ge=64)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    """hidden_size / num_heads must be 64: vLLM's CPU attention rejects smaller heads."""
    num_kv_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(512, ge=1)
    max_positions: int = Field(256, ge=16)
    seed: int = 0


class ColdStartConfig(Section):
    """Supervised warm-up on the task's reference completions, as R1 does before RL."""

    steps: int = Field(600, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0


class ModelConfig(Section):
    path: str | None = None
    """An HF model directory (transformers and vLLM must both load it). None builds the
    tiny model, gives it the cold-start stage on the built-in task, and caches it."""
    tiny: TinyModelConfig = TinyModelConfig()
    cold_start: ColdStartConfig = ColdStartConfig()


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    """Learner ranks (Ray actors in one placement group); the batch is split across them."""
    lr: float = Field(7e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0)
    """Max global gradient norm; 0 disables clipping."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from lr / (warmup_steps + 1) to lr."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warm-up: constant, or cosine decay to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    zero_stage: int = Field(0, ge=0, le=3)
    dtype: Literal["float32", "bfloat16"] = "float32"
    micro_batch_size: int = Field(64, ge=1)
    """Sequences per forward/backward; gradients accumulate over a rank's batch."""
    updates_per_step: int = Field(1, ge=1)
    """Optimizer steps per rollout batch (the batch is split in as many mini-batches)."""
    advantage: str = "grpo"
    """Advantage estimator, by registered name (learner/algos.py)."""
    policy_loss: str = "ppo_clip"
    """Policy loss, by registered name (learner/algos.py)."""
    reduction: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How per-token losses become one number (learner/algos.py), over the global batch."""
    clip_low: float = Field(0.2, gt=0)
    """Ratio clipped below at 1 - clip_low."""
    clip_high: float = Field(0.2, gt=0)
    """Ratio clipped above at 1 + clip_high (DAPO's clip-higher: e.g. 0.28)."""
    mask_truncated: bool = False
    """Overlong filtering: samples cut at rollout.max_tokens contribute no loss."""
    adv_eps: float = Field(1e-6, gt=0)
    """Added to the group std before dividing."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the frozen reference model; 0 skips the reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman's k1, k2, k3)."""
    seed: int = 0
