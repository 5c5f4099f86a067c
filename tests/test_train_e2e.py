"""End to end through the real CLI: a short `grpo train` locally, then the same
entrypoint submitted with `ray job submit` to a head this test starts."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import kill_session

SHORT_RUN = [
    "model.cold_start.steps=150",
    "run.steps=3",
    "run.prompts_per_step=4",
    "rollout.n=4",
    "rollout.temperature=0.7",
    "learner.lr=1e-3",
    "run.progress=false",
    "run.max_staleness=0",
]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_train_cli_trains_every_parameter(full_run):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, proc = full_run
    assert "summary: 6 steps" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["policy_version"] for r in rows] == [0, 1, 2, 3, 4, 5]  # each step samples the previous update's weights
    for r in rows:
        # the reward is the configured weighted sum of the verifiers (accuracy 1.0, format 0.2)
        assert r["reward_mean"] == pytest.approx(r["rewards/accuracy"] + 0.2 * r["rewards/format"])
        assert r["accuracy"] == r["rewards/accuracy"] and r["format_rate"] == r["rewards/format"]
        assert r["samples"] == 16 and 0 < r["response_length"] <= 48
        # behaviour logprobs are the sampler's at temperature 0.7, as the learner scores them
        assert r["train/sampler_logprob_diff"] < 1e-4 and r["train/skipped_updates"] == 0
        assert r["train/entropy"] > 0 and r["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert r["staleness/max"] == 0 and r["reward/timeouts"] == 0 and r["reward/errors"] == 0
        assert r["time/step"] >= r["time/train"] > 0 and r["time/generate_engine"] > 0
    assert max(r["train/grad_norm"] for r in rows) > 0  # (a step whose groups all tie has no gradient)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "plot.png").stat().st_size > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["prompts"] == {"taken": 24, "trained": 24, "unfinished": 0}
    assert summary["accuracy_first5"] == pytest.approx(sum(r["accuracy"] for r in rows[:5]) / 5)

    start = AutoModelForCausalLM.from_pretrained(summary["model_start"], dtype=torch.float32)
    final = AutoModelForCausalLM.from_pretrained(summary["checkpoint"], dtype=torch.float32)
    start_params = dict(start.named_parameters())
    unchanged = [n for n, p in final.named_parameters() if p.requires_grad and torch.equal(p, start_params[n])]
    assert unchanged == []
    assert len(start_params) > 10

    # vLLM serves the exported checkpoint too, and the cold-started policy answers in format
    code = (
        "from rollout.config import RolloutConfig\n"
        "from rollout.generator import Generator\n"
        "from rewards.verifiers import format_reward\n"
        f"g = Generator({summary['checkpoint']!r}, RolloutConfig(n=8, temperature=0.6))\n"
        "groups = g.generate([{'prompt': '3+4=', 'answer': '7'}], [list(range(8))], {'top_p': 0.95})\n"
        "print('FORMAT', sum(format_reward(s.text, {}) for s in groups[0].samples))\n"
        "g.close()\n"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("FORMAT")[-1]) >= 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_agent(dash: int, timeout_s: float = 180) -> None:
    """Until the head's job agent takes submissions (it comes up after the dashboard):
    submit a no-op job and wait for it to finish."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            assert "No available agent" in str(e) and time.monotonic() < deadline, str(e)
            time.sleep(1)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the no-op job did not finish"
        time.sleep(0.5)


def own_ports() -> list[str]:
    """Free ports for a node's agents: two Ray nodes on one machine would otherwise both
    want the fixed defaults (the dashboard agent's 52365), and the second has no agent."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]


def start_head(tmp_path, num_cpus=2, resources=None, node_ip="127.0.0.1"):
    """A Ray head of our own (own ports and temp dir, in its own session, so that only it
    is stopped afterwards) with a dashboard for `ray job submit`. -> (process, dashboard
    port, GCS address)."""
    import time
    import urllib.request

    gcs, dash = _free_port(), _free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
           f"--node-ip-address={node_ip}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
           f"--temp-dir={tempfile.mkdtemp(prefix='ray-', dir='/tmp')}",  # short: socket paths have a length limit
           f"--ray-client-server-port={_free_port()}", "--object-store-memory=300000000", *own_ports()]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    head = subprocess.Popen(cmd, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.5)
        wait_for_job_agent(dash)
    except BaseException:
        kill_session(head.pid)
        raise
    return head, dash, f"{node_ip}:{gcs}"


def test_ray_job_submit_survives_a_lost_generator_and_a_resubmission_resumes(runs_dir, tmp_path):
    """Under `ray job submit`: a generator SIGKILLed mid-step is replaced inside the job;
    then the job's driver is stopped (`ray job stop`), and resubmitting the same command
    with `--resume RUN_DIR` continues from the last checkpoint."""
    import signal
    import time

    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head, dash, _ = start_head(tmp_path)
    address = f"--address=http://127.0.0.1:{dash}"
    run_dir = runs_dir / "job"
    try:
        entry = [sys.executable, "-m", "cluster.cli", "train", *SHORT_RUN, "run.steps=8", "run.checkpoint_every=2",
                 "run.name=job", f"run.output_dir={runs_dir}"]
        first = subprocess.Popen([ray_cli, "job", "submit", address, "--submission-id=grpo-job-1", "--", *entry],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 600

        def wait_steps(k):
            while not ((run_dir / "metrics.jsonl").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= k):
                assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
                time.sleep(0.1)

        wait_steps(1)
        os.kill(json.loads((run_dir / "actors.json").read_text())["generator 0"]["pid"], signal.SIGKILL)
        while not (run_dir / "checkpoints" / "step-4" / "run_state.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.1)
        subprocess.run([ray_cli, "job", "stop", address, "grpo-job-1"], env=env, capture_output=True, timeout=120)
        first.wait(timeout=120)
        assert not (run_dir / "final").exists()
        rows = read_metrics(run_dir)
        assert sum(r["faults/generator_restarts"] for r in rows) == 1  # replaced inside the job

        resumed = subprocess.run([ray_cli, "job", "submit", address, "--", sys.executable, "-m", "cluster.cli", "train",
                                  "--resume", str(run_dir)], capture_output=True, text=True, env=env, timeout=600)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert "succeeded" in resumed.stdout and "resumed from" in resumed.stdout
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, 9))
        assert [r["policy_version"] for r in rows] == list(range(8))
        assert (run_dir / "final" / "model.safetensors").is_file()
    finally:
        kill_session(head.pid)
