"""The wire format of a weight sync, in plain torch (no vLLM): tensors packed, in
order, into flat uint8 buckets of at most `bucket_bytes` (a tensor larger than that
travels alone). Both sides compute the same buckets from the same metadata, so only
the bytes cross the wire, one broadcast per bucket."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ENGINE_NAME = "grpo_collective"
"""The weight-transfer backend name our vLLM engines register (rollout/weight_sync.py)."""

FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
"""HF module -> the vLLM layer it is loaded into (the rest are layers of their own)."""


def vllm_layer(name: str) -> str:
    """`model.layers.0.self_attn.k_proj.bias` -> `model.layers.0.self_attn.qkv_proj`: the
    vLLM layer an HF tensor is loaded into. vLLM's layerwise reload rebuilds a layer only
    from *all* of its tensors (one given some is left partly uninitialised, one given none
    keeps its weights), so a push that skips tensors skips whole layers."""
    module, _, _ = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{FUSED.get(leaf, leaf)}"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * getattr(torch, self.dtype).itemsize


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Split tensor indices, in order, into consecutive buckets of <= bucket_bytes
    (a tensor larger than bucket_bytes forms a bucket of its own)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, meta in enumerate(metas):
        if current and size + meta.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += meta.nbytes
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate the tensors' bytes into one flat uint8 tensor on their device
    (into the front of `out` when given; a lone tensor without `out` is sent as it is, no copy)."""
    if len(tensors) == 1 and out is None:
        return tensors[0].contiguous().view(-1).view(torch.uint8)
    flat = [t.contiguous().view(-1).view(torch.uint8) for t in tensors]
    if out is None:
        return torch.cat(flat)
    return torch.cat(flat, out=out[: sum(f.numel() for f in flat)])


def unpack(flat: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `pack`: views into `flat`, one per meta (a copy only where a tensor
    of a wider dtype starts at an offset its element size does not divide)."""
    out, offset = [], 0
    for meta in metas:
        n = meta.nbytes
        dtype = getattr(torch, meta.dtype)
        chunk = flat[offset : offset + n]
        if offset % dtype.itemsize:
            chunk = chunk.clone()
        tensor = chunk.view(dtype).view(meta.shape)
        out.append((meta.name, tensor))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} bytes, metadata describes {offset}")
    return out


def bucket_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Where each bucket starts in one buffer holding them all, each 64-byte aligned (so
    its tensors' views are too); -> (starts, total bytes). The receiver's kept arena and
    the sender's shared buffer (sync.transport=shared) use the same layout."""
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + -(-size // 64) * 64)
    return starts, (starts[-1] + sizes[-1] if sizes else 0)
