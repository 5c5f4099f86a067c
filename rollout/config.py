"""Config sections owned by rollout/. Imports only pydantic: cheap to import."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated
    on assignment too, so an override can never smuggle in a wrong type; a number is
    never NaN or infinite, and a boolean is never taken for a number (`run.steps=true`
    is an error, not 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value, info):
        if isinstance(value, bool):
            annotation = str(cls.model_fields[info.field_name].annotation)
            if ("int" in annotation or "float" in annotation) and "bool" not in annotation:
                raise ValueError(f"expected a number, got the boolean {value}")
        return value


class RolloutConfig(Section):
    num_generators: int = Field(1, ge=1)
    """Generator actors, each hosting one vLLM engine; prompts go to the least loaded.
    Size it to the machine: two engines on the same cores only fight over them."""
    n: int = Field(8, ge=1)
    """Samples per prompt (the group size)."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature for training rollouts (> 0: the learner scores every token
    at the same temperature, and greedy decoding has no distribution to score)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Must stay 1 for training rollouts: with a nucleus, the sampler draws from the
    renormalised top-p distribution, which the learner would have to rebuild exactly
    for its ratios; it scores the full distribution at `temperature` instead.
    Evaluation has its own sampling settings (top-p 0.95 by default)."""
    max_tokens: int = Field(48, ge=1)
    """Longest completion; leave room for the closing tags and EOS."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the engine's weights and compute; a push in another dtype (a bf16 learner's
    into a float32 engine) is cast on load. bfloat16 is faster for models past a few M
    parameters on a CPU with bf16 instructions (25M: 3.5-4.3 s per 256 x 48 batch against
    5.1-6.1 s in float32 here); float32 keeps the sampler's logprobs equal to a float32
    learner's."""
    max_model_len: int | None = Field(None, ge=16)
    """Longest prompt + completion the engine serves; None: the model's own limit (a real
    model's 8k positions need more KV cache than kv_cache_gib's default)."""
    kv_cache_gib: float = Field(0.25, gt=0.0)
    """KV cache size per engine. vLLM's start-up memory check fails inside Ray without it."""
    gpu_memory_utilization: float = Field(0.4, gt=0.0, le=1.0)
    """Share of each GPU an engine may use (GPU runs only)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine (tensor parallel)."""
    enforce_eager: bool = True
    """Skip graph capture / compilation: faster start-up, which dominates small jobs."""
    partial: Literal["recompute", "keep", "off"] = "keep"
    """Partial rollouts: how a weight update meets the sequences in flight.
    recompute: it lands between two engine steps, and the running sequences are
    re-prefilled under the new weights (no token is sampled over KV computed with the
    old ones; verl's way). keep: it lands between two engine steps, and the running
    sequences keep their KV cache, so tokens after the update are drawn by the new
    weights over the old weights' KV of what came before (PipelineRL's, AReaL's and
    SkyRL's way; the recorded logprobs are still those the tokens were drawn with).
    A request added after an update never reuses a prefix cached under older weights:
    the prefix cache is salted with the weights served. off: an update waits until the requests in flight
    finish, and no new one starts meanwhile. In every mode each sample records the
    versions that produced its tokens. true / false are read as recompute / off."""

    @field_validator("partial", mode="before")
    @classmethod
    def _partial_from_bool(cls, value):
        return ("recompute" if value else "off") if isinstance(value, bool) else value

    @field_validator("top_p")
    @classmethod
    def _full_distribution(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError(
                "top_p < 1 is refused for training rollouts: the sampler's logprobs would be those of the "
                "renormalised nucleus, not of the distribution the learner scores (use temperature instead)"
            )
        return value


class WeightSyncConfig(Section):
    backend: Literal["gloo", "nccl"] = "gloo"
    """torch.distributed backend of the learner->generator group: gloo on CPU, nccl on GPUs."""
    transport: Literal["auto", "collective", "shared"] = "auto"
    """How the bytes of a push travel. collective: bucketed broadcasts over the group above
    (any generator anywhere). shared: the learner exports one buffer that generators on its
    node open by handle (a /dev/shm file on CPU, a CUDA IPC handle on GPUs, where NCCL
    refuses two ranks on one GPU) and copy out; no group (rollout/shared.py). auto:
    shared for cluster.placement=colocated, collective otherwise."""
    bucket_mb: float = Field(64.0, gt=0.0)
    """Tensors are packed into flat buffers of at most this size (a larger tensor
    travels alone); one broadcast per bucket."""
    master_address: str | None = None
    """Address the learner's rank 0 listens on for the rendezvous; None: the address of the
    node it runs on, as Ray knows it (reachable by the other nodes). Set it only for an
    unusual network (another interface than Ray's)."""
    master_port: int | None = Field(None, ge=1, le=65535)
    """Port of that rendezvous; None: a free port found at run time (open the range
    between nodes, or fix it here for a firewall)."""
    timeout_s: float = Field(60.0, gt=0.0)
    """Deadline of the group's rendezvous, of every collective (each bucket's broadcast)
    and of every generator call during a sync: a hung sync is handled like a dead generator."""
    delta: bool = False
    """Full fine-tuning: after a group's first (full) push, send only the elements whose
    bits changed since the previous push (index + value, or the whole tensor where that
    is smaller), and reload only the vLLM layers that changed (rollout/delta.py). Both
    sides keep a copy of the last push (the model's size; on CPU the receiver's is the
    buffer it already keeps). Off by default: see the README for the measured changed
    fractions. Refused with LoRA and with ZeRO-3."""
