"""`grpo replay RUN --from-step N`: the learner alone on a run's recorded rollouts (no
generators, no verifiers). It restores the last checkpoint before step N, trains the
recorded batches of the steps between it and N to get there, then N and the steps after
it, and sets each step's learner metrics beside the recorded ones. With the run's own
config and seed they match exactly; with other learner settings (overrides) it is a
controlled experiment on the same data."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cluster.actors.factory import ActorFactory
from cluster.actors.placement import place, wait_ready
from cluster.artifacts import checkpoint
from cluster.artifacts.record import load, to_groups
from cluster.commands.cold_start import prepare_model
from cluster.config import Config

COMPARED = ("train/loss", "train/entropy", "train/grad_norm", "train/clip_frac", "train/kl", "train/is_weight_mean")


def replay(cfg: Config, run_dir: Path, from_step: int, steps: int, log=print, trust: bool = False) -> dict[str, Any]:
    """trust: the checkpoint may be unpickled (an older version's)."""
    recorded = {json.loads(line)["step"]: json.loads(line)
                for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()}
    ckpts = [d for d in checkpoint.checkpoint_dirs(run_dir) if int(d.name.split("-")[1]) <= from_step - 1]
    start = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
    for s in range(start + 1, from_step + steps):
        load(run_dir, s)  # every step to train must be recorded: fail now, before anything starts
    cfg = place(cfg, log)
    model_path = prepare_model(cfg, log) if cfg.model.path is None else cfg.model.path
    learners = ActorFactory.for_job(cfg, model_path).learner_group()
    t0 = time.perf_counter()
    try:
        wait_ready({f"learner rank {i}": r for i, r in enumerate(learners.ranks)}, cfg.cluster.start_timeout_s)
        if ckpts:
            checkpoint.restore(learners, ckpts[-1], trust)
        log(f"replay: from {ckpts[-1] if ckpts else 'the initial model'} (step {start}); "
            f"steps {start + 1}..{from_step - 1} to get there, then {from_step}..{from_step + steps - 1}")
        rows = []
        for s in range(start + 1, from_step + steps):
            groups = to_groups(load(run_dir, s))
            stats = learners.train(groups) if groups else {}
            if s >= from_step:
                was = recorded.get(s, {})
                rows.append({"step": s, **{f"replay/{k}": stats.get(k) for k in COMPARED},
                             **{f"recorded/{k}": was.get(k) for k in COMPARED}})
    finally:
        learners.kill()
    diffs = [abs(r[f"replay/{k}"] - r[f"recorded/{k}"]) for r in rows for k in COMPARED
             if r[f"replay/{k}"] is not None and r[f"recorded/{k}"] is not None]
    result = {"run": str(run_dir), "from_step": from_step, "steps": steps, "restored_step": start, "rows": rows,
              "max_abs_diff": max(diffs, default=0.0), "seconds": time.perf_counter() - t0}
    out = run_dir / f"replay-{from_step}-{steps}.json"
    out.write_text(json.dumps(result, indent=2))
    result["output"] = str(out)
    return result
