"""Values that cannot work fail at load, before Ray, in well under 5 s, naming the key,
with no traceback (issue 19, item 12). Each case runs the real CLI in a subprocess."""
import subprocess
import time

import pytest

from tests.helpers import grpo

CASES = {
    "cluster.num_cpus=0": "cluster.num_cpus",
    "cluster.num_cpus=-2": "cluster.num_cpus",
    "rewards.verifiers={accuracy: .nan}": "rewards.verifiers.accuracy",
    "rewards.verifiers={accuracy: .inf, format: 0.2}": "rewards.verifiers.accuracy",
    "learner.betas=[0.9, 1.0]": "learner.betas",
    "learner.betas=[-0.1, 0.99]": "learner.betas",
    "run.steps=true": "run.steps",
    "data.path=''": "data.path",
    "run.name=/tmp/elsewhere": "run.name",
    "run.name=..": "run.name",
    "data.max_operand=100000": "data.max_operand",
    "model.path=/nonexistent/model": "model.path",
}


def run_fast(args: list[str]) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run(grpo(*args), capture_output=True, text=True, timeout=60)
    proc.seconds = time.perf_counter() - t0
    return proc


@pytest.mark.parametrize("override", sorted(CASES))
def test_a_value_that_cannot_work_exits_2_fast_naming_its_key(override, tmp_path):
    proc = run_fast(["train", override, f"run.output_dir={tmp_path}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert CASES[override] in out and "Traceback" not in out, out[-2000:]
    assert proc.seconds < 5, proc.seconds
    assert not any(tmp_path.iterdir())  # nothing was written


def test_replay_steps_0_and_a_missing_student_fail_before_anything_starts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    proc = run_fast(["replay", str(run), "--from-step", "1", "--steps", "0"])
    assert proc.returncode == 2 and "--steps" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_fast(["distill", "--teacher", str(tmp_path / "no-teacher"), "--student", "tiny", "--output",
                     str(tmp_path / "out")])
    assert proc.returncode == 2 and "no-teacher" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    proc = run_fast(["distill", "--teacher", str(teacher), "--student", str(tmp_path / "no-student"),
                     "--output", str(tmp_path / "out")])
    assert proc.returncode == 2 and "no-student" in proc.stderr and proc.seconds < 5, proc.stderr
    assert "Traceback" not in proc.stderr


def test_samples_with_a_bad_count_or_a_bad_record_say_so(tmp_path):
    run = tmp_path / "run"
    (run / "rollouts").mkdir(parents=True)
    (run / "rollouts" / "step-000001.msgpack").write_bytes(b"\x92\x01")  # a msgpack list, not a record
    (run / "rollouts" / "step-abc.msgpack").write_bytes(b"junk")
    proc = run_fast(["samples", str(run), "--best", "-3"])
    assert proc.returncode == 2 and "at least 1" in proc.stderr, proc.stderr
    proc = run_fast(["samples", str(run)])
    assert proc.returncode == 2 and "step-000001.msgpack" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr
    proc = run_fast(["sft", "--data", str(tmp_path), "--model", str(run), "--output", str(tmp_path / "o")])
    assert proc.returncode == 2 and "is not a file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
