import os
import signal
from pathlib import Path

import pytest

# Loopback-only local heads in tests need no token auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen2 + char tokenizer (no download, no training)."""
    from learner.config import TinyModelConfig
    from learner.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", TinyModelConfig(seed=1))


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """Output directory shared by the CLI runs, so the cold-start model is built once."""
    return tmp_path_factory.mktemp("runs")


# The short real run that several tests read (the CLI end to end, the resume test's
# uninterrupted reference): run once per session.
FULL_RUN = [
    "model.cold_start.steps=150", "run.steps=6", "run.checkpoint_every=2", "run.keep_checkpoints=2",
    "run.prompts_per_step=4", "rollout.n=4", "rollout.temperature=0.7", "learner.lr=1e-3",
    "run.progress=false", "cluster.num_cpus=2", "run.loggers=[jsonl,tensorboard]",
    "run.max_staleness=0",  # synchronous: the resume test compares parameters exactly
]


def grpo(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "cluster.cli", *args]


@pytest.fixture(scope="session")
def full_run(runs_dir):
    """-> (run directory, the CLI's CompletedProcess) of `grpo train` with FULL_RUN."""
    import subprocess

    proc = subprocess.run(grpo("train", *FULL_RUN, "run.name=full", f"run.output_dir={runs_dir}"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs_dir / "full", proc


def placed(overrides: list[str]):
    """A config whose automatic resource shares are filled in from a (started) local Ray
    of 2 CPUs, checked to fit: what `grpo train` does before it creates actors."""
    from cluster.config import load_config
    from cluster.commands.train import place

    return place(load_config(None, ["cluster.num_cpus=2", *overrides]), log=lambda msg: None)


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session: a CLI run started with start_new_session=True
    and the local Ray it started (only ours: never `ray stop`, which stops every Ray)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getsid(int(pid)) == sid:
                os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
