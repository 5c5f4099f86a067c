"""Chaos on short real runs: SIGKILL a generator mid-step, SIGKILL a reward worker,
SIGSTOP a generator (a hang), SIGKILL a learner rank (2 ranks, ZeRO-2). Every run
finishes all its steps and exits 0, loses no prompt to a generator or reward-worker
fault, redoes only the steps after the last checkpoint for a learner fault, counts
exactly the injected faults, and ends with weights that transformers and vLLM load."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import grpo

CHAOS = ["model.cold_start.steps=150", "run.prompts_per_step=4", "rollout.n=4", "rollout.temperature=0.7",
         "learner.lr=1e-3", "run.progress=false", "cluster.num_cpus=2", "run.checkpoint_every=2",
         "faults.health_interval_s=1", "faults.health_timeout_s=5", "eval.every=0"]


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def pid_of(run_dir: Path, name: str) -> int:
    return json.loads((run_dir / "actors.json").read_text())[name]["pid"]


def chaos_run(runs_dir: Path, name: str, overrides: list[str], faults: dict[int, tuple[str, int]]) -> tuple[Path, str]:
    """Start `grpo train`, and once step k has completed send faults[k] = (actor, signal)
    to that actor's process (read from RUN/actors.json). -> (run dir, the CLI's output)."""
    run_dir = runs_dir / name
    proc = subprocess.Popen(grpo("train", *CHAOS, *overrides, f"run.name={name}", f"run.output_dir={runs_dir}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 900
    pending = dict(faults)
    while pending:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the run did not get far enough"
        k = min(pending)
        if steps_done(run_dir) >= k:
            actor, sig = pending.pop(k)
            os.kill(pid_of(run_dir, actor), sig)
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return run_dir, out


def check_final_weights_load(run_dir: Path) -> None:
    code = ("import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'final')!r})\n"
            "assert all(torch.isfinite(p).all() for p in m.parameters())\n"
            "from rollout.config import RolloutConfig\nfrom rollout.generator import Generator\n"
            f"g = Generator({str(run_dir / 'final')!r}, RolloutConfig(n=2))\n"
            "[group] = g.generate([{'prompt': '3+4='}], [[1, 2]])\n"
            "assert len(group.samples) == 2 and group.samples[0].completion_ids\ng.close()\nprint('LOADED')\n")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "LOADED" in proc.stdout, proc.stderr[-3000:]


def test_generator_and_reward_worker_faults_lose_no_prompt(runs_dir):
    # asynchronous (S=1), two generators: kill one mid-step, kill the reward worker,
    # then stop (hang) the other generator; each is replaced and the run goes on.
    faults = {1: ("generator 0", signal.SIGKILL), 3: ("reward worker 0", signal.SIGKILL),
              5: ("generator 1", signal.SIGSTOP)}
    run_dir, _ = chaos_run(runs_dir, "chaos-workers", ["run.steps=8", "run.max_staleness=1",
                                                       "rollout.num_generators=2"], faults)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert sum(r["faults/generator_restarts"] for r in rows) == 2
    assert sum(r["faults/reward_worker_restarts"] for r in rows) == 1
    assert sum(r["faults/learner_restarts"] for r in rows) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    kinds = [(f["kind"], f["index"]) for f in summary["faults"]["faults"]]
    assert sorted(kinds) == [("generator", 0), ("generator", 1), ("reward worker", 0)]
    hang = next(f for f in summary["faults"]["faults"] if f["index"] == 1 and f["kind"] == "generator")
    assert "health probe" in hang["cause"]
    assert all(f["recovered_s"] is not None and f["recovered_s"] > 0 for f in summary["faults"]["faults"])
    # no prompt lost: every prompt taken was trained on (the lost ones were sampled again)
    prompts = summary["prompts"]
    assert prompts["taken"] == prompts["trained"] == 8 * 4 and prompts.get("unfinished", 0) == 0
    assert prompts["requeued"] >= 1 and sum(r["faults/requeued_prompts"] for r in rows) == prompts["requeued"]
    assert all(r["staleness/max"] <= 1 for r in rows)
    check_final_weights_load(run_dir)


def test_a_lost_learner_rank_restarts_the_group_from_the_last_checkpoint(runs_dir):
    # synchronous (S=0), two ranks under ZeRO-2: kill rank 1 after step 3; the group
    # restarts from step 2's checkpoint and only steps 3.. are done again
    run_dir, out = chaos_run(runs_dir, "chaos-learner", ["run.steps=6", "learner.num_ranks=2", "learner.zero_stage=2",
                                                             "run.max_staleness=0"],
                             {3: ("learner rank 1", signal.SIGKILL)})
    assert "learner group restarted from" in out and "step-2" in out.split("learner group restarted from")[1][:200]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the redone steps replace the lost ones
    assert [r["policy_version"] for r in rows] == [0, 1, 2, 3, 4, 5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["faults"]["counts"] == {"learner": 1}
    assert sum(r["faults/learner_restarts"] for r in rows) == 1
    # only what came after the step-2 checkpoint was taken again (steps 3-4 at most)
    assert 0 < summary["prompts_redone_after_restarts"] <= 2 * 4
    # learner.dtype's default, auto, as the ranks resolved it (bf16 on a CPU with bf16
    # instructions) is the run's from then on: in its config.yaml, and the restarted group's
    from cluster.config import load_config
    from learner.precision import resolve

    want = resolve("auto", "cpu")[0]
    assert load_config(run_dir / "config.yaml").learner.dtype == want
    actors = json.loads((run_dir / "actors.json").read_text())
    assert [actors[f"learner rank {i}"]["dtype"] for i in (0, 1)] == [want, want]
    check_final_weights_load(run_dir)


def generator_pids(sid: int) -> list[int]:
    """Pids of the generator actors (Ray names their processes ray::Generator...) of one session."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Generator"):
                out.append(int(pid))
        except (OSError, ProcessLookupError):
            pass
    return sorted(out)


def test_grpo_eval_survives_a_generator_killed_mid_evaluation(full_run, tmp_path):
    """`grpo eval` samples through the training pipeline and supervisor: a generator lost
    while it holds prompts is replaced, its prompts go to the other, nothing is lost."""
    run_dir, _ = full_run
    out = tmp_path / "eval"
    proc = subprocess.Popen(grpo("eval", str(run_dir), "--k", "8", "--output", str(out), "cluster.num_cpus=2",
                                 "rollout.num_generators=2", "faults.health_interval_s=1", "faults.health_timeout_s=5"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:  # "eval: N prompts x 8 samples on 2 generator(s)": sampling starts now
        lines.append(line)
        if line.startswith("eval:") and "generator(s)" in line:
            break
    time.sleep(0.5)
    pids = generator_pids(proc.pid)
    assert len(pids) == 2, "".join(lines)
    os.kill(pids[0], signal.SIGKILL)
    rest, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, ("".join(lines) + rest)[-4000:]
    report = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert report["faults"]["counts"] == {"generator": 1}
    assert report["requeued_prompts"] >= 1  # it held prompts when it died
    assert report["n_prompts"] == len(rows) == 90 and all(len(r["completions"]) == 8 for r in rows)
    assert report["pass@1"] == pytest.approx(sum(sum(r["scores"]) for r in rows) / (90 * 8))
    assert "fault: generator" in rest


def test_a_periodic_evaluation_survives_a_generator_killed_mid_evaluation(runs_dir):
    """Training's own evaluation after step 2 goes through the same pipeline: a generator
    killed while it evaluates is replaced; the run and every evaluation complete."""
    name = "chaos-eval"
    run_dir = runs_dir / name
    proc = subprocess.Popen(grpo("train", *[o for o in CHAOS if not o.startswith("eval.")], "run.steps=4",
                                 "eval.every=2", "eval.k=8", "rollout.num_generators=2", "run.max_staleness=0",
                                 f"run.name={name}", f"run.output_dir={runs_dir}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 900
    # step 2's rollouts are recorded before its evaluation starts, its metrics row after it ends
    while not ((run_dir / "rollouts" / "step-000002.msgpack").is_file() and steps_done(run_dir) == 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(generator_pids(proc.pid)[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(0.0 <= e["eval/pass@1"] <= 1.0 for e in evals)
    assert evals[1]["eval/requeued_prompts"] >= 1  # the generator held evaluation prompts when it died
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["faults"]["counts"] == {"generator": 1}
    assert [f["step"] for f in summary["faults"]["faults"]] == [2]  # during step 2's evaluation
    assert sum(r["faults/generator_restarts"] for r in rows) == 1
    assert summary["prompts"]["taken"] == summary["prompts"]["trained"] == 4 * 4
