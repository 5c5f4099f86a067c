"""The model a run starts from: `model.path`, or the built-in tiny model after its
cold start, built once and cached by the hash of everything that shapes it."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from cluster.config import Config
from cluster.data import arithmetic_rows

# Bump when the tiny model, tokenizer, task text or cold start change meaning.
RECIPE_VERSION = 1


def prepare_model(cfg: Config, log=print) -> str:
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {str(path)!r} is not an HF model directory (no config.json)")
        return str(path.resolve())
    key = json.dumps(
        {
            "v": RECIPE_VERSION,
            "tiny": cfg.model.tiny.model_dump(),
            "cold_start": cfg.model.cold_start.model_dump(),
            "data": cfg.data.model_dump(include={"max_operand", "rl_share", "seed"}),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cached = Path(cfg.run.output_dir) / "_cache" / f"tiny-{digest}"
    if (cached / "config.json").is_file():
        log(f"model: cached tiny model {cached}")
        return str(cached.resolve())
    from learner.sft import cold_start
    from learner.tiny_model import build_tiny_model

    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp, cfg.model.tiny)
    sft_rows, _ = arithmetic_rows(cfg.data)
    steps = cfg.model.cold_start.steps
    t0 = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step % 100 == 0 or step == steps - 1:
            log(f"cold start: step {step + 1}/{steps} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")

    cold_start(tmp, [(r["prompt"], r["reference"]) for r in sft_rows], cfg.model.cold_start, progress)
    tmp.rename(cached)  # atomic: a half-built model is never picked up as cached
    return str(cached.resolve())
