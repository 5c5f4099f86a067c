"""End to end through the real CLI: a short `grpo train` locally, then the same
entrypoint submitted with `ray job submit` to a head this test starts."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SHORT_RUN = [
    "model.cold_start.steps=150",
    "run.steps=3",
    "run.prompts_per_step=4",
    "rollout.n=4",
    "rollout.num_generators=2",
    "learner.lr=1e-3",
    "run.progress=false",
]


@pytest.fixture
def out_dir(runs_dir) -> Path:
    return runs_dir


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_train_cli_trains_every_parameter(out_dir):
    import torch
    from transformers import AutoModelForCausalLM

    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", *SHORT_RUN, "run.name=local", f"run.output_dir={out_dir}",
         "cluster.num_cpus=2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summary: 3 steps" in proc.stdout
    run_dir = out_dir / "local"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["policy_version"] for r in rows] == [0, 1, 2]  # each step samples the previous update's weights
    for r in rows:
        for key in ("reward_mean", "accuracy", "format_rate", "response_length", "kl", "clip_frac", "reward/timeouts", "reward/errors",
                    "gen_tokens_per_s", "time/generate", "time/reward", "time/train", "time/sync"):
            assert key in r, key
        assert 0.0 <= r["accuracy"] <= 1.0 and r["response_length"] > 0 and r["gen_tokens_per_s"] > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "plot.png").stat().st_size > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())

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
        f"g = Generator({summary['checkpoint']!r}, RolloutConfig(n=8, temperature=0.6, top_p=0.95))\n"
        "groups = g.generate([{'prompt': '3+4=', 'answer': '7'}], seed=0)\n"
        "print('FORMAT', sum(format_reward(s.text, {}) for s in groups[0].samples))\n"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("FORMAT")[-1]) >= 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_same_entrypoint(out_dir):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    gcs, dash = _free_port(), _free_port()
    subprocess.run(
        [ray_cli, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=120,
    )
    try:
        entrypoint = " ".join([sys.executable, "-m", "cluster.cli", "train", *SHORT_RUN, "run.name=job",
                               f"run.output_dir={out_dir}"])
        proc = subprocess.run(
            [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--", *entrypoint.split()],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "succeeded" in proc.stdout
        assert "summary: 3 steps" in proc.stdout
        rows = read_metrics(out_dir / "job")
        assert [r["policy_version"] for r in rows] == [0, 1, 2]
        assert (out_dir / "job" / "final" / "model.safetensors").is_file()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
