"""Helpers shared by tests of several tiers (test modules import this, never each
other). Nothing heavy at import time: each helper imports what it needs."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EXAMPLES = ROOT / "examples"

# The short real run that several e2e tests read (the CLI end to end, observability,
# the recipe's eval and distill, the resume test's uninterrupted reference, the held-out
# pass@1 gain): run once per session by the `full_run` fixture of tests/conftest.py.
# 12 steps of 16 prompts x 8 at the learner's default lr: the fewest here that raise the
# held-out pass@1 by 0.1 with a margin (6 steps of 4 x 4 at lr 1e-3 lowered it).
FULL_RUN = [
    "model.cold_start.steps=150", "run.steps=12", "run.checkpoint_every=2", "run.keep_checkpoints=2",
    "run.prompts_per_step=16", "rollout.n=8", "rollout.temperature=0.7", "learner.lr=2e-4",
    "run.progress=false", "cluster.num_cpus=2", "run.loggers=[jsonl,tensorboard]",
    "run.max_staleness=0",  # synchronous: the resume test compares parameters exactly
    # fp32 (not the default auto: bf16 on a CPU with bf16 instructions): the tests read
    # vLLM's logprobs equal to the learner's (< 1e-4) and compare resumed parameters exactly
    "learner.dtype=float32",
]


def grpo(*args: str) -> list[str]:
    """The command line of the `grpo` CLI, run by this interpreter."""
    return [sys.executable, "-m", "cluster.cli", *args]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_evals(run_dir: Path) -> list[dict]:
    path = run_dir / "evals.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# Integration tests compare the learner's numbers exactly (with vLLM's, across ranks and
# ZeRO stages): they train in fp32 unless they ask otherwise (learner.dtype's default, auto,
# is bf16 on a CPU with bf16 instructions).
FP32 = "learner.dtype=float32"


def placed(overrides: list[str]):
    """A config whose automatic resource shares are filled in from a (started) local Ray
    of 2 CPUs, checked to fit: what `grpo train` does before it creates actors. fp32
    unless the overrides set learner.dtype."""
    from cluster.actors.placement import place
    from cluster.config import load_config

    return place(load_config(None, ["cluster.num_cpus=2", FP32, *overrides]), log=lambda msg: None)


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


# ------------------------------------------------------------ Ray heads of our own
def free_port() -> int:
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
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def start_head(tmp_path, num_cpus=2, resources=None, node_ip="127.0.0.1"):
    """A Ray head of our own (own ports and temp dir, in its own session, so that only it
    is stopped afterwards) with a dashboard for `ray job submit`. -> (process, dashboard
    port, GCS address)."""
    import time
    import urllib.request

    gcs, dash = free_port(), free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
           f"--node-ip-address={node_ip}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
           f"--temp-dir={tempfile.mkdtemp(prefix='ray-', dir='/tmp')}",  # short: socket paths have a length limit
           f"--ray-client-server-port={free_port()}", "--object-store-memory=300000000", *own_ports()]
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


# ------------------------------------------------------- learner and weight checks
SEQ = [20, 21, 14, 26, 32, 31, 87, 75, 76, 81, 78, 33, 23, 87, 33]
"""A token sequence whose prompt logprobs vLLM and transformers are compared on."""


def synthetic_groups(num_groups=4, n=4, seed=0):
    """Scored groups of random token ids of unequal lengths (no generator needed)."""
    from rollout.types import Group, Sample

    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [rng.randrange(3, 90) for _ in range(rng.randint(3, 6))]
        samples = []
        for _ in range(n):
            ids = [rng.randrange(3, 90) for _ in range(rng.randint(2, 9))]  # unequal lengths
            samples.append(Sample(ids, [-1.0 - 0.1 * rng.random() for _ in ids], "", "stop", [(0, 0)]))
        groups.append(Group(prompt, "", {}, samples, rewards=[float(rng.random() < 0.5) + 0.1 * i for i in range(n)],
                            key=g))
    return groups


def hf_logprobs(model_dir, state: dict, ids: list[int], temperature: float = 1.0):
    """transformers' logprobs of `ids` (each token given the ones before) under `state`."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).numpy()
