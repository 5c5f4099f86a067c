"""Facts about the process an actor runs in, and its CPU placement."""
from __future__ import annotations

import os

CPU_SET_ENV = "GRPO_CPU_SET"
LOG_FILE_ENV = "GRPO_LOG_FILE"
"""Where an actor writes what it prints (set by cluster/placement.py for a quiet console)."""
"""Comma-separated core ids an actor pins itself to (set by cluster/placement.py)."""


def pin_from_env() -> list[int] | None:
    """Pin this process (and the threads it starts later) to the cores named in
    GRPO_CPU_SET, if set; -> the cores. Call it before torch or vLLM start threads."""
    value = os.environ.get(CPU_SET_ENV)
    if not value:
        return None
    cores = [int(c) for c in value.split(",") if c.strip()]
    os.sched_setaffinity(0, cores)
    return cores


def redirect_output_from_env() -> str | None:
    """Send this process's stdout and stderr (Python's and the C libraries') to the file
    named in GRPO_LOG_FILE, if set; -> the file."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        return None
    import sys

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
