"""Checkpoints a run can resume from exactly.

<run_dir>/checkpoints/step-<k>/ holds the DeepSpeed checkpoint of every learner rank
(optimizer and LR schedule included), an HF export of the policy (hf/), and
run_state.json (step, data cursor, policy version), written last: a directory
without it is incomplete and ignored. The last `keep` checkpoints are kept.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "run_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [d for d in root.iterdir() if d.name.startswith("step-") and (d / STATE_FILE).is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def save(learners: Any, run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Every learner rank's DeepSpeed state, the HF export, then the run state (last).
    learners: a LearnerGroup (its calls have deadlines)."""
    path = (run_dir / "checkpoints" / f"step-{state['step']}").resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    learners.save_checkpoint(str(path / "deepspeed"))
    learners.save_hf(str(path / "hf"))  # a collective under ZeRO-3
    (path / STATE_FILE).write_text(json.dumps(state))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return None
    return dirs[-1], json.loads((dirs[-1] / STATE_FILE).read_text())


def restore(learners: Any, path: Path) -> None:
    learners.load_checkpoint(str(path / "deepspeed"))
