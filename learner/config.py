"""Config sections owned by learner/. Imports only pydantic: cheap to import."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rollout.config import Section


class TinyModelConfig(Section):
    """The built-in Qwen2-architecture model and its tokenizer."""

    hidden_size: int = Field(128, ge=64)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    """hidden_size / num_heads must be 64: vLLM's CPU attention rejects smaller heads."""
    num_kv_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(512, ge=1)
    max_positions: int = Field(256, ge=16)
    seed: int = 0
    tokenizer: Literal["char", "chat_bpe"] = "char"
    """`char`: one token per character, no chat template (the default job). `chat_bpe`: a
    byte-level BPE with merges, a ChatML-like chat template, and an end-of-turn token
    (`<|im_end|>`) distinct from EOS (`<|endoftext|>`), for tests of templates and stopping."""


class ColdStartConfig(Section):
    """Supervised warm-up on the task's reference completions, as R1 does before RL."""

    steps: int = Field(200, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0


class ModelConfig(Section):
    path: str | None = None
    """An HF model directory (transformers and vLLM must both load it). None builds the
    tiny model, gives it the cold-start stage on the built-in task, and caches it."""
    tiny: TinyModelConfig = TinyModelConfig()
    cold_start: ColdStartConfig = ColdStartConfig()


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers LoRA may target (decoder layers of the Llama/Qwen2/Mistral family)."""


class LoRAConfig(Section):
    """LoRA adapters through peft (learner/lora.py): the base weights stay frozen, the
    optimizer holds only the adapters, the KL reference is the base (adapters off), and
    a push carries the merged weights of the adapted layers only."""

    rank: int = Field(0, ge=0)
    """Adapter rank r; 0: off (full fine-tuning)."""
    alpha: float = Field(32.0, gt=0)
    """peft's lora_alpha: the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Linear layers that get adapters (PROJECTIONS)."""
    push: Literal["merged", "adapter"] = "merged"
    """What a weight push carries: `merged`, the merged weights W + (alpha/r) B A of every
    vLLM layer holding an adapter (the generators serve a plain model); `adapter`, the
    adapter tensors alone, which each generator writes to a local peft directory and
    serves through vLLM's LoRA support (`enable_lora`, a LoRARequest per version; an
    update then waits for the requests in flight, whose adapter is fixed). README: LoRA."""

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in PROJECTIONS]
        if unknown or not value:
            raise ValueError(f"unknown or no target modules {unknown or value}; choices: {list(PROJECTIONS)}")
        return value


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    """Learner ranks (Ray actors in one placement group); the batch is split across them."""
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2), each in [0, 1)."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value

    grad_clip: float = Field(1.0, ge=0)
    """Max global gradient norm; 0 disables clipping."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from lr / (warmup_steps + 1) to lr."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warm-up: constant, or cosine decay to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    zero_stage: int = Field(0, ge=0, le=3)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training precision. bfloat16: DeepSpeed's bf16 mode (bf16 weights, activations and
    pushes; fp32 master weights and Adam moments), the precision of TRL's, verl's and
    OpenRLHF's defaults. auto: bfloat16 where every rank's device computes bf16 natively (a
    GPU that supports it; a CPU with AVX512-BF16, AMX or Arm BF16), else float32
    (learner/precision.py). In float32 the sampler's logprobs equal the learner's (< 1e-4
    per token, which the tests check); in bf16 they differ by ~0.003, and the importance
    correction accounts for it. On this 2-core EPYC the default job's 80 steps took 62 s
    in bf16 against 84-86 s in float32 the same day, with the same held-out gain."""
    micro_batch_size: int = Field(64, ge=1)
    """Sequences per forward/backward; gradients accumulate over a rank's batch."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward instead of keeping them (HF's
    gradient checkpointing, non-reentrant): far less memory on long sequences, ~30% more
    compute; the gradient is the same."""
    max_tokens_per_micro: int = Field(0, ge=0)
    """Token budget of one forward/backward, counted padded (longest sequence x count); 0:
    off, micro_batch_size counts sequences. On: sequences are dealt to the ranks by tokens
    and packed longest first (learner/schedule.py), so long and short ones do not share a
    padded micro-batch and every rank gets about the same work; the gradient is unchanged."""
    updates_per_step: int = Field(1, ge=1)
    """Optimizer steps per rollout batch (the batch is split in as many mini-batches)."""
    advantage: str = "grpo"
    """Advantage estimator, by registered name (learner/algos.py ADVANTAGES)."""
    policy_loss: str = "ppo_clip"
    """Policy loss, by registered name (learner/algos.py POLICY_LOSSES)."""
    reduction: str = "token_mean"
    """How per-token losses become one number, over the global batch (learner/algos.py REDUCTIONS)."""
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
    reference_path: str | None = None
    """The frozen KL reference (an HF model directory); None: the model the run starts
    from (also on --resume, where the policy comes from the checkpoint)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator (Schulman's k1, k2, k3; learner/algos.py KL_ESTIMATORS)."""
    is_correction: str = "tis"
    """Off-policy correction of the sampler/learner mismatch, per token, by the ratio
    pi_proximal / pi_behaviour (learner/algos.py IS_CORRECTIONS): `none`, `tis`
    (truncated importance sampling, weight min(ratio, is_threshold_high)) or `mask`
    (IcePop: tokens with a ratio outside [is_threshold_low, is_threshold_high] get no loss)."""
    is_threshold_low: float = Field(0.5, ge=0)
    is_threshold_high: float = Field(2.0, gt=0)
    lora: LoRAConfig = LoRAConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _names(self) -> "LearnerConfig":
        from learner import algos

        for key, table in (("advantage", algos.ADVANTAGES), ("policy_loss", algos.POLICY_LOSSES),
                           ("reduction", algos.REDUCTIONS), ("kl_estimator", algos.KL_ESTIMATORS),
                           ("is_correction", algos.IS_CORRECTIONS)):
            if getattr(self, key) not in table:
                raise ValueError(f"learner.{key}: unknown name {getattr(self, key)!r}; choices: {sorted(table)}")
        if self.policy_loss == "gspo" and self.reduction != "seq_mean_token_mean":
            raise ValueError(
                f"learner.policy_loss=gspo needs learner.reduction=seq_mean_token_mean (got {self.reduction!r}): "
                "GSPO's sequence-level ratio is defined with a per-sequence token mean"
            )
        if self.lora.rank and self.reference_path:
            raise ValueError("learner.reference_path is set with learner.lora.rank > 0: a LoRA run's KL reference "
                             "is its base model with the adapters off, never another model")
        if self.is_threshold_low >= self.is_threshold_high:
            raise ValueError(f"learner.is_threshold_low={self.is_threshold_low} must be below "
                             f"learner.is_threshold_high={self.is_threshold_high}")
        return self
