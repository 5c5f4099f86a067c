"""What an exported HF model directory holds beside the weights, and a bf16 learner's
fp32 master weights (what `Learner.save_hf` writes in bf16)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def export_tokenizer(source: str | Path, out: Path) -> None:
    """The whole tokenizer of `source` into the exported model directory `out`: every
    tokenizer and template file (chat_template.jinja included), re-saved by transformers,
    and a generation_config.json whose EOS ids are every token that ends a completion
    (rollout/tokens.py: EOS and the template's end-of-turn), so transformers' generate
    stops where the generators do."""
    from transformers import AutoTokenizer, GenerationConfig

    from rollout.tokens import stop_token_ids

    tok = AutoTokenizer.from_pretrained(str(source))
    tok.save_pretrained(str(out))
    for f in Path(source).iterdir():  # files a tokenizer class does not re-save (templates, sentencepiece models)
        if f.is_file() and not (out / f.name).exists() and (
                f.suffix == ".jinja" or f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                           "added_tokens", "chat_template"))):
            shutil.copy(f, out / f.name)
    try:
        gen = GenerationConfig.from_pretrained(str(source))
    except OSError:
        gen = GenerationConfig(pad_token_id=tok.pad_token_id)
    stops = stop_token_ids(tok, gen.eos_token_id)
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(str(out))


def fp32_masters_of(engine: Any, rank: int) -> dict[int, torch.Tensor]:
    """A bf16 DeepSpeed engine's fp32 master weight of every parameter it optimizes, on
    CPU, keyed by id(parameter), on rank 0 only (the one that writes exports; the others
    would hold a full fp32 copy for nothing). The optimizer holds them partitioned under
    ZeRO 1-3, so this is a collective there: every rank calls, in the same order."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.utils import is_optimized_parameter
    from deepspeed.utils import safe_get_full_fp32_param
    from torch._utils import _unflatten_dense_tensors

    # ZeRO 0: DeepSpeed's fp16 optimizers (bf16 too) keep each param group's fp32 masters
    # flat (the fused one) or one per parameter (the unfused one, around a torch optimizer)
    opt, flat = engine.optimizer, {}
    if isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        for i, lp in enumerate(opt.fp16_groups):
            hp = (_unflatten_dense_tensors(opt.fp32_groups_flat[i], lp) if isinstance(opt, FP16_Optimizer)
                  else opt.fp32_groups[i])
            flat.update({id(p): m for p, m in zip(lp, hp)})
    # what DeepSpeed optimizes (trainable, not empty): the rest keeps the module's values
    trained = [p for p in engine.module.parameters() if is_optimized_parameter(p)]
    out, found = {}, 0
    for p in trained:  # ZeRO 1-3: safe_get_full_fp32_param gathers (a collective, every rank)
        full = safe_get_full_fp32_param(p)
        full = flat.get(id(p)) if full is None else full
        if full is None:
            continue
        found += 1
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(full.shape) != shape or full.dtype != torch.float32:
            raise RuntimeError(f"learner rank {rank}: the fp32 master of a {shape} parameter "
                               f"is {tuple(full.shape)} {full.dtype}")
        if rank == 0:
            out[id(p)] = full.detach().to("cpu", copy=True)
    if found and found != len(trained):
        raise RuntimeError(f"learner rank {rank}: DeepSpeed holds fp32 masters for {found} of "
                           f"{len(trained)} trained parameters ({type(opt).__name__})")
    if not found:
        print(f"learner rank {rank}: no fp32 master weights found in {type(opt).__name__}; "
              f"the export holds the bf16 weights", flush=True)
    return out
