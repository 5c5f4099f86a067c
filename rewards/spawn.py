"""How the reward side starts a process (a verifier process, an external verifier
program, the code sandbox, its reaper): from an explicit, minimal environment, and
dying with the one that started it.

Nothing of the reward worker's own environment crosses unless named: not its W&B keys,
cloud credentials or Ray's variables (a model-written program reading /proc/*/environ
finds only what is listed here). A verifier that needs more names it in the config
(`env` of rewards.verifiers.<name> or rewards.external.<name>, rewards/config.py).
"""
from __future__ import annotations

import atexit
import ctypes
import glob
import os
import shutil
import signal
import sys
import tempfile
from typing import Callable, Iterable

BASE_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONHOME", "VIRTUAL_ENV", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM",
            "GRPO_CODE_SANDBOX")
"""Variables a started process takes from ours when they are set here: what finds
programs and runs our interpreter (a shared libpython may need LD_LIBRARY_PATH), the
locale, the temp directory, thread counts, and the sandbox override the tests use
(rewards/sandbox.py). HOME is never among them: each process gets a throwaway one."""

_PR_SET_PDEATHSIG = 1
try:  # loaded here, never between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal
    _prctl = None


def import_path() -> str:
    """A PYTHONPATH with which a child of this interpreter imports what this process can
    (the project, plug-in modules, a Ray job's working directory): our sys.path, made
    absolute ('' is the working directory)."""
    return os.pathsep.join(dict.fromkeys(os.path.abspath(p or os.curdir) for p in sys.path))


def minimal_env(extra: Iterable[str] = (), home: str | None = None, python: bool = False) -> dict[str, str]:
    """The environment of a process we start: BASE_ENV and the `extra` names, with the
    values they have here (unset ones left out); HOME when given; with `python`, a
    PYTHONPATH that imports what we import (only for children running our own
    interpreter: another Python would choke on our standard library)."""
    env = {name: os.environ[name] for name in (*BASE_ENV, *extra) if name in os.environ}
    if python:
        env["PYTHONPATH"] = import_path()
    if home is not None:
        env["HOME"] = home
    return env


_homes: dict[int, str] = {}


def throwaway_home() -> str:
    """The HOME of the processes this process starts: an empty directory of its own,
    `grpo-verifier-home-<pid>` in the temp directory, made on first use and removed at
    exit. A process killed before its exit leaves its directory, and the next one to
    make its own removes the directories of pids that no longer run."""
    pid = os.getpid()
    if pid not in _homes:
        prefix = os.path.join(tempfile.gettempdir(), "grpo-verifier-home-")
        for stale in glob.glob(prefix + "*"):
            if stale[len(prefix):].isdigit() and not _alive(int(stale[len(prefix):])):
                shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(prefix + str(pid), mode=0o700, exist_ok=True)
        _homes[pid] = prefix + str(pid)
        atexit.register(shutil.rmtree, _homes[pid], True)
    return _homes[pid]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the started process gets SIGKILL when the thread that started it
    dies (Linux's PR_SET_PDEATHSIG), however it dies, so nothing we start outlives us.
    The reward worker's threads live as long as it does. Called in the parent (it notes
    the parent's pid: a parent that died between fork and prctl is caught too)."""
    parent = os.getpid()

    def apply() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return apply


def child_stdout():
    """In a process of ours that serves frames (rewards/child.py, rewards/env_host.py):
    the address-space limit the reward worker set (GRPO_VERIFIER_MEMORY_MB), and the
    real stdout kept for the protocol, while anything the code prints goes to stderr.
    -> the protocol's stream."""
    import resource

    memory_mb = int(os.environ.get("GRPO_VERIFIER_MEMORY_MB", "0"))
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol_out
