"""Writing a run's files so that a crash never leaves a torn one that is taken for whole,
and a run directory that is never written by another run.

`write_atomic` writes a temp file beside the target, fsyncs it, renames it over the
target and fsyncs the directory: a reader sees the old file or the new one, never part
of one. `replace_dir` does the same for a directory (a model export): it is built under
a temp name and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from cluster.config import Config, dump_config

RUN_FILE = "run.json"
"""RUN/run.json: the run's id, written when its directory is made; every checkpoint carries it."""


class RunDirError(ValueError):
    """A run directory that holds another run, or whose files are unreadable."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temp_dir_for(path: Path) -> Path:
    """Where to build a directory that replace_dir then moves to `path` (same filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory `tmp` to `path`, replacing what was there."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path, what: str) -> Any:
    """json.loads of a small file, or RunDirError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: unreadable {what} ({e})") from None


def holds_run(path: Path) -> bool:
    """Whether a directory holds (part of) a run."""
    return path.is_dir() and any((path / name).exists() for name in
                                 (RUN_FILE, "config.yaml", "metrics.jsonl", "checkpoints", "rollouts", "final"))


def run_dir_for(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """The new run's directory, not yet made: run.name, which must not hold a run yet
    (a run's files are never written by another run), or a fresh timestamp."""
    root = Path(cfg.run.output_dir)
    if cfg.run.name:
        path = root / cfg.run.name
        if holds_run(path):
            raise RunDirError(f"{path} holds a run already: continue it with `grpo train --resume {path}`, "
                              "or give a fresh run.name")
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = root / stamp, 1
    while path.exists():
        k += 1
        path = root / f"{stamp}-{k}"
    if k > 1:
        log(f"run directory {root / stamp} exists: using {path}")
    return path


def make_run_dir(path: Path, cfg: Config) -> Path:
    """Make the run's directory with its id (run.json) and its resolved config."""
    path.mkdir(parents=True, exist_ok=True)
    if holds_run(path):  # made by a run that started meanwhile
        raise RunDirError(f"{path} holds a run already (started meanwhile): give a fresh run.name")
    new_run_id(path)
    write_atomic(path / "config.yaml", dump_config(cfg))
    return path


def new_run_id(run_dir: Path) -> str:
    run_id = uuid.uuid4().hex
    write_atomic(run_dir / RUN_FILE, json.dumps({"id": run_id}))
    return run_id


def run_id(run_dir: Path) -> str | None:
    """The run's id (None: a run made before ids existed)."""
    path = run_dir / RUN_FILE
    return read_json(path, "run file")["id"] if path.is_file() else None


def resolve_model(model: str) -> tuple[str, Path | None]:
    """MODEL -> (an HF model directory, the run directory it came from, if any): a run
    directory means its final/ (and its config.yaml is the base config)."""
    path = Path(model)
    if (path / "final" / "config.json").is_file():
        return str((path / "final").resolve()), path
    if (path / "config.json").is_file():
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        return str(path.resolve()), run
    raise FileNotFoundError(f"{model}: neither an HF model directory nor a run directory with final/")


def check_output(out_dir: Path, model_path: str | None = None) -> None:
    """An SFT (or distillation) result never overwrites its source model or anything else."""
    out = Path(out_dir)
    if model_path is not None and out.resolve() == Path(model_path).resolve():
        raise RunDirError(f"--output {out} is the model it would train from: give another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--output {out} exists and is not empty: give a new directory")
