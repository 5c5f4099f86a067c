"""Delta weight pushes (`sync.delta`), in plain torch: both sides of a sync use it.

A delta push carries, for each tensor, only the elements whose *bits* changed since
the previous push to the same group, so the receiver's copy becomes bit-equal to the
sender's. Each tensor travels in the cheapest of these encodings, chosen from its count
of changed elements (sent in the update info, so both sides derive the same wire
layout):

- `same` (0 changed): nothing; its vLLM layer is not reloaded unless another of the
  layer's tensors changed;
- `sparse`: int32 flat indices, then the changed values in the tensor's dtype;
- `mask`: one bit per element (changed or not), then the changed values;
- `dense`: the whole tensor;

whichever is fewest bytes (a bf16 tensor with 30% of its elements changed: 0.36x
dense as a mask, 0.9x as indices).

Both sides hold the previous weights: the sender a copy of what it last pushed, the
receiver the buffer it received the last push into (rollout/weight_sync.py).
"""
from __future__ import annotations

import torch

from rollout.buckets import TensorMeta

INDEX = torch.int32
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _mask_bytes(meta: TensorMeta) -> int:
    return -(-meta.numel // 8)


def _sizes(meta: TensorMeta, changed: int) -> dict[str, int]:
    item = getattr(torch, meta.dtype).itemsize
    return {"sparse": changed * (INDEX.itemsize + item), "mask": _mask_bytes(meta) + changed * item, "dense": meta.nbytes}


def encoding(meta: TensorMeta, changed: int) -> str:
    if not 0 <= changed <= meta.numel:
        raise ValueError(f"delta push: {meta.name} reports {changed} changed elements of {meta.numel}")
    if changed == 0:
        return "same"
    sizes = _sizes(meta, changed)
    return min(sizes, key=sizes.get)  # ties: sparse, then mask, then dense


PARTS = {"same": 0, "sparse": 2, "mask": 2, "dense": 1}
"""How many wire tensors each encoding sends."""


def wire(metas: list[TensorMeta], counts: list[int]) -> list[TensorMeta]:
    """The tensors a delta push sends, in order (what the buckets are planned over)."""
    if len(metas) != len(counts):
        raise ValueError(f"delta push: {len(counts)} counts for {len(metas)} tensors")
    out = []
    for meta, count in zip(metas, counts):
        kind = encoding(meta, count)
        if kind == "sparse":
            out += [TensorMeta(f"{meta.name}#index", "int32", (count,)), TensorMeta(f"{meta.name}#value", meta.dtype, (count,))]
        elif kind == "mask":
            out += [TensorMeta(f"{meta.name}#mask", "uint8", (_mask_bytes(meta),)),
                    TensorMeta(f"{meta.name}#value", meta.dtype, (count,))]
        elif kind == "dense":
            out.append(meta)
    return out


_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def pack_bits(changed: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n / 8),), element i in bit i % 8 of byte i // 8."""
    if changed.device.type == "cpu":  # numpy's packbits: ~10x faster than the torch ops below
        import numpy as np

        return torch.from_numpy(np.packbits(changed.numpy(), bitorder="little"))
    pad = -changed.numel() % 8
    bits = torch.nn.functional.pad(changed.to(torch.int32), (0, pad)).view(-1, 8)
    return (bits * _WEIGHTS.to(bits.device)).sum(1).to(torch.uint8)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    if mask.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.unpackbits(mask.numpy(), count=n, bitorder="little").view(np.bool_))
    bits = (mask.to(torch.int32).unsqueeze(1) >> torch.arange(8, device=mask.device)) & 1
    return bits.view(-1)[:n].bool()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def encode(meta: TensorMeta, new: torch.Tensor, last: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Compare `new` with `last` (flat, same dtype) bit by bit, bring `last` up to `new`,
    and return (changed count, the tensors to send for it: see `wire`)."""
    new = new.reshape(-1)
    changed = _bits(new) != _bits(last)
    count = int(changed.sum())
    kind = encoding(meta, count)
    if kind == "same":
        return 0, []
    if kind == "dense":
        last.copy_(new)
        return count, [new]
    values = new.masked_select(changed)
    last.copy_(new)
    if kind == "sparse":
        return count, [torch.nonzero(changed).view(-1).to(INDEX), values]
    return count, [pack_bits(changed), values]


def apply(target: torch.Tensor, meta: TensorMeta, count: int, parts: list[torch.Tensor]) -> None:
    """The receiver's side of `encode`: bring `target` (the previous weights) up to date."""
    kind = encoding(meta, count)
    if len(parts) != PARTS[kind]:
        raise ValueError(f"delta push: {meta.name} ({kind}) got {len(parts)} tensors")
    flat = target.view(-1)
    if kind == "sparse":
        index, values = parts
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= flat.numel()):
            raise ValueError(f"delta push: an index of {meta.name} is outside its {flat.numel()} elements")
        flat[index.long()] = values
    elif kind == "mask":
        mask, values = parts
        changed = unpack_bits(mask, flat.numel())
        if int(changed.sum()) != values.numel():
            raise ValueError(f"delta push: the mask of {meta.name} marks {int(changed.sum())} elements, "
                             f"{values.numel()} values came")
        flat.masked_scatter_(changed, values)
    elif kind == "dense":
        flat.copy_(parts[0].view(-1))
