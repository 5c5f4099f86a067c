"""Facts about the process an actor runs in, and its CPU placement."""
from __future__ import annotations

import os
import threading

CPU_SET_ENV = "GRPO_CPU_SET"
"""Comma-separated core ids an actor pins itself to (set by cluster/actors/placement.py)."""
LOG_FILE_ENV = "GRPO_LOG_FILE"
"""Where an actor writes what it prints (set by cluster/actors/placement.py for a quiet console)."""
LOG_MAX_ENV = "GRPO_LOG_MAX_BYTES"
"""Size bound of that file: past it, the file becomes <file>.1 (the one before is
deleted) and a new one starts, so an actor's log never holds more than twice this."""
DEFAULT_LOG_MAX_BYTES = 64 * 2**20


def pin_from_env() -> list[int] | None:
    """Pin this process (and the threads it starts later) to the cores named in
    GRPO_CPU_SET, if set; -> the cores. Call it before torch or vLLM start threads."""
    value = os.environ.get(CPU_SET_ENV)
    if not value:
        return None
    cores = [int(c) for c in value.split(",") if c.strip()]
    os.sched_setaffinity(0, cores)
    return cores


class RotatingLog:
    """A log file bounded in size: at `max_bytes` it is renamed to <path>.1 (replacing
    the one before) and a fresh file begins."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max(1, max_bytes)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.file = open(path, "ab", buffering=0)
        self.size = self.file.tell()

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self.size
            if room <= 0:
                self.rotate()
                continue
            part, data = data[:room], data[room:]
            self.file.write(part)
            self.size += len(part)

    def rotate(self) -> None:
        self.file.close()
        os.replace(self.path, self.path + ".1")
        self.file = open(self.path, "ab", buffering=0)
        self.size = 0


def redirect_output_from_env() -> str | None:
    """Send this process's stdout and stderr (Python's and the C libraries') to the file
    named in GRPO_LOG_FILE, if set, bounded by GRPO_LOG_MAX_BYTES (RotatingLog): both
    descriptors go to a pipe that a thread of this process drains into the file.
    -> the file."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        return None
    import sys

    log = RotatingLog(path, int(os.environ.get(LOG_MAX_ENV, DEFAULT_LOG_MAX_BYTES)))
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def drain() -> None:
        while chunk := os.read(read_end, 1 << 16):
            try:
                log.write(chunk)
            except OSError:  # a full disk must not block the actor on a full pipe: drop
                pass

    threading.Thread(target=drain, name="log-drain", daemon=True).start()
    return path


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
