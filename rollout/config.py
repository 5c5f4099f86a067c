"""Config sections owned by rollout/. Imports only pydantic: cheap to import."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated
    on assignment too, so an override can never smuggle in a wrong type."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RolloutConfig(Section):
    num_generators: int = Field(2, ge=1)
    """Generator actors, each hosting one vLLM engine; prompts are split among them."""
    n: int = Field(8, ge=1)
    """Samples per prompt (the group size)."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature for training rollouts."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling threshold for training rollouts."""
    max_tokens: int = Field(48, ge=1)
    """Longest completion; leave room for the closing tags and EOS."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the engine's weights (must match what the learner sends)."""
    kv_cache_gib: float = Field(0.25, gt=0.0)
    """KV cache size per engine. vLLM's start-up memory check fails inside Ray without it."""
    gpu_memory_utilization: float = Field(0.4, gt=0.0, le=1.0)
    """Share of each GPU an engine may use (GPU runs only)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine (tensor parallel)."""
    enforce_eager: bool = True
    """Skip graph capture / compilation: faster start-up, which dominates small jobs."""
    seed: int = 0
    """Base sampling seed; each step and generator derive their own from it."""


class WeightSyncConfig(Section):
    backend: Literal["gloo", "nccl"] = "gloo"
    """torch.distributed backend of the learner->generator group: gloo on CPU, nccl on GPUs."""
    bucket_mb: float = Field(64.0, gt=0.0)
    """Tensors are packed into flat buffers of at most this size (a larger tensor
    travels alone); one broadcast per bucket."""
    master_address: str = "127.0.0.1"
    """Address the learner's rank-0 listens on for the rendezvous (reachable by every node)."""
    timeout_s: float = Field(300.0, gt=0.0)
    """Timeout of the group's rendezvous and of each sync."""
