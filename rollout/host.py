"""Facts about the process an actor runs in, and its CPU placement."""
from __future__ import annotations

import os

CPU_SET_ENV = "GRPO_CPU_SET"
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


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
