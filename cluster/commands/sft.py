"""`grpo sft`: supervised fine-tuning through the learner's own DeepSpeed set-up (ranks, ZeRO
stage, the guarded optimizer, the one schedule for all ranks): the default job's cold
start, `grpo sft`, and the student's stage of `grpo distill`. Not a second training
loop: a step is `LearnerGroup.sft`, the loss is the completion tokens' NLL."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from cluster.actors.factory import ActorFactory
from cluster.actors.placement import wait_ready
from cluster.artifacts.files import replace_dir, temp_dir_for
from cluster.config import Config


@dataclass
class SFTSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0


def tokenize(model_path: str, pairs: list[tuple[str, Any]], template: str = "none") -> list[tuple]:
    """(prompt, completion) texts -> (prompt ids, completion ids + the end token), as
    generation sees them: the prompt rendered and tokenised exactly as RL's and eval's
    prompts are (cluster/data.py format_rows, rollout/tokens.py), the completion ended
    with the template's end-of-turn under `chat`, EOS otherwise.

    A multi-turn completion is a list of [text, 1 (a model turn) | 0 (an observation)]
    segments, tokenised as an episode samples them: each model turn on its own, each
    observation on its own as the environment's turn (rollout/tokens.py
    observation_ids) -> (prompt ids, completion ids, loss mask 0 on the observations)."""
    from cluster.data import format_rows, load_tokenizer
    from rollout.tokens import completion_end_id, observation_ids

    tok = load_tokenizer(model_path, template)
    end = completion_end_id(tok, template)
    rows = format_rows([{"prompt": p} for p, _ in pairs], template, tok)
    out = []
    for i, (row, (_, completion)) in enumerate(zip(rows, pairs)):
        segments = [[completion, 1]] if isinstance(completion, str) else completion
        c, mask = [], []
        for text, by_model in segments:
            ids = tok(text, add_special_tokens=False)["input_ids"] if by_model else observation_ids(tok, text, template)
            c, mask = c + ids, mask + [int(bool(by_model))] * len(ids)
        c, mask = c + [end], mask + [1]
        if sum(mask) < 2:
            raise ValueError(f"SFT example {i}: empty completion")
        out.append((row["prompt_ids"], c) if all(mask) else (row["prompt_ids"], c, mask))
    return out


def sft_config(cfg: Config, settings: SFTSettings) -> Config:
    """The learner config of an SFT run: the job's learner (ranks, ZeRO stage, dtype) at
    the SFT learning rate, constant, without KL or off-policy correction."""
    learner = cfg.learner.model_copy(update=dict(
        lr=settings.lr, lr_schedule="constant", warmup_steps=0, kl_coef=0.0, updates_per_step=1, seed=settings.seed,
        micro_batch_size=min(cfg.learner.micro_batch_size, settings.batch_size)))
    run = cfg.run.model_copy(update=dict(prompts_per_step=settings.batch_size, steps=settings.steps))
    return cfg.model_copy(update=dict(learner=learner, run=run, rollout=cfg.rollout.model_copy(update=dict(n=1))))


def train_steps(group, examples: list[tuple], settings: SFTSettings) -> list[float]:
    """settings.steps SFT steps on batches drawn (seeded) from examples, with a progress
    bar. -> the loss of every step."""
    rng, losses = random.Random(settings.seed), []
    with tqdm(total=settings.steps, desc="sft", unit="step", dynamic_ncols=True) as bar:
        for step in range(settings.steps):
            batch = [examples[rng.randrange(len(examples))] for _ in range(settings.batch_size)]
            losses.append(group.sft(batch)["sft/loss"])
            bar.update(1)
            if step % 20 == 0 or step == settings.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def run_sft(cfg: Config, model_path: str, pairs: list[tuple[str, Any]], settings: SFTSettings, out_dir: Path,
            log: Callable[[str], None] = print, template: str | None = None) -> dict[str, float]:
    """Train model_path on (prompt, completion) pairs, batches drawn with the seed; save
    the result as an HF model directory at out_dir. Prompts are formatted by `template`
    (default: data.template, as RL and eval format theirs). -> first and last losses, seconds."""
    examples = tokenize(model_path, pairs, cfg.data.template if template is None else template)
    sft_cfg = sft_config(cfg, settings)
    group = ActorFactory.for_job(sft_cfg, model_path).learner_group()
    try:
        wait_ready({f"learner rank {i}": r for i, r in enumerate(group.ranks)}, cfg.cluster.start_timeout_s)
        t0 = time.perf_counter()
        losses = train_steps(group, examples, settings)
        tmp = temp_dir_for(Path(out_dir))  # a crash while saving leaves no partial model at out_dir
        group.save_hf(str(tmp.resolve()))
        replace_dir(tmp, Path(out_dir))
        log(f"sft: {settings.steps} steps in {time.perf_counter() - t0:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    finally:
        group.kill()
    return {"loss_first": losses[0], "loss_last": losses[-1], "steps": settings.steps,
            "seconds": time.perf_counter() - t0, "losses": losses}
