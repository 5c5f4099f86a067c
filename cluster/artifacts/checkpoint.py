"""Checkpoints a run can resume from exactly.

<run_dir>/checkpoints/step-<k>/ holds the DeepSpeed checkpoint of every learner rank
(optimizer and LR schedule included), an HF export of the policy (hf/), and
run_state.json (step, data cursor, policy version, the run's id), written last and
atomically: a directory without it is incomplete and ignored. The last `keep`
checkpoints are kept. A checkpoint is only ever restored into the run that wrote it:
its run id must match the run directory's (run.json).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from cluster.artifacts.files import RunDirError, read_json, run_id, write_atomic

STATE_FILE = "run_state.json"


def initial_state() -> dict[str, Any]:
    """The run state before the first step: nothing trained, the stream at its start."""
    return {"step": 0, "cursor": 0, "policy_version": 0}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [d for d in root.iterdir() if d.name.startswith("step-") and d.name[5:].isdigit()
            and (d / STATE_FILE).is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def save(learners: Any, run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Every learner rank's DeepSpeed state, the HF export, then the run state (last).
    learners: a LearnerGroup (its calls have deadlines)."""
    path = (run_dir / "checkpoints" / f"step-{state['step']}").resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    learners.save_checkpoint(str(path / "deepspeed"))
    learners.save_hf(str(path / "hf"))  # a collective under ZeRO-3, and in bf16 under any ZeRO stage (the fp32 masters)
    write_atomic(path / STATE_FILE, json.dumps({**state, "run_id": run_id(run_dir)}))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest(run_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The last complete checkpoint of this run and its state. One whose run_state.json
    is torn is named and skipped (the one before it is used); one written by another
    run is refused."""
    expected = run_id(run_dir)
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            state = read_json(path / STATE_FILE, "checkpoint state")
            if not isinstance(state, dict) or not {"step", "cursor", "policy_version"} <= state.keys():
                raise RunDirError(f"{path / STATE_FILE}: not a checkpoint state (keys step, cursor, policy_version)")
        except RunDirError as e:
            log(f"checkpoint skipped: {e}")
            continue
        if expected is not None and state.get("run_id") != expected:
            raise RunDirError(f"{path}: written by another run (run id {state.get('run_id')}, this run is {expected}); "
                              "it is not restored")
        return path, state
    return None


def restore(learners: Any, path: Path, trust: bool = False) -> None:
    """Load a checkpoint into the learner group; nothing is unpickled unless `trust`."""
    learners.load_checkpoint(str(path / "deepspeed"), trust)
