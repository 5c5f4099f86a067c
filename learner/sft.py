"""Cold start: a short supervised stage on reference completions, in one process
with plain torch (R1 does this before RL; here it makes the starting reward neither
0 nor saturated)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch

from learner.config import ColdStartConfig


def cold_start(
    model_dir: str | Path,
    examples: list[tuple[str, str]],
    cfg: ColdStartConfig,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Train the model in `model_dir` in place on (prompt, completion) pairs: loss on
    the completion tokens and EOS only. Returns the last loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    encoded = []
    for prompt, completion in examples:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        encoded.append((p, c))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    loss_value = float("nan")
    for step in range(cfg.steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(cfg.batch_size)]
        length = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), length), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
            attn[i, : len(p) + len(c)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = float(loss)
        if progress is not None:
            progress(step, loss_value)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return loss_value
