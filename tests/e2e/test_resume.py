"""Kill a run after a checkpoint, resume it, and end with the same parameters as a run
that was never interrupted."""
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tests.helpers import FULL_RUN, grpo, kill_session


def test_kill_and_resume_equals_uninterrupted(runs_dir: Path, full_run):
    cut_dir = runs_dir / "cut"
    proc = subprocess.Popen(grpo("train", *FULL_RUN, "run.name=cut", f"run.output_dir={runs_dir}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (cut_dir / "checkpoints" / "step-2" / "run_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    kill_session(proc.pid)  # the driver and the local Ray it started (and nothing else)
    proc.wait()
    assert not (cut_dir / "final").exists()
    steps_before = len((cut_dir / "metrics.jsonl").read_text().splitlines())
    assert steps_before < 12

    resumed = subprocess.run(grpo("train", "--resume", str(cut_dir)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    rows = [json.loads(line) for line in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["policy_version"] for r in rows] == list(range(12))
    kept = sorted(p.name for p in (cut_dir / "checkpoints").iterdir())
    assert kept == ["step-10", "step-12"]  # keep_checkpoints=2

    a = load_file(str(runs_dir / "full" / "final" / "model.safetensors"))
    b = load_file(str(cut_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    start = load_file(str(Path(json.loads((runs_dir / "full" / "summary.json").read_text())["model_start"]) / "model.safetensors"))
    assert max(np.abs(a[k] - start[k]).max() for k in a) > 1e-4  # training moved the weights
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-5
    # the uninterrupted run's reward trajectory is reproduced step for step
    full_rows = [json.loads(line) for line in (runs_dir / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in full_rows]
