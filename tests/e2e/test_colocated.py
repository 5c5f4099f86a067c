"""Colocated placement on real runs (cluster.placement=colocated, S=0): generator 0 and
learner rank 0 share both cores and take turns. One colocated run, with its generator
SIGKILLed after step 2, is watched from /proc while it runs; a disaggregated run of the same
seed and thread counts is its reference. They must train on the same samples with the same
losses, the colocated weight updates (through the learner's shared buffer, sync.transport=
shared, where the reference uses the gloo group) must land exactly (vLLM's logprobs = the learner's),
the actors must take turns on both cores (each sleeping through the other's phase), and the
killed generator must be replaced with nothing lost."""
import json
import os
from statistics import median
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import grpo, read_metrics

STEPS = 5
JOB = ["model.cold_start.steps=150", f"run.steps={STEPS}", "run.prompts_per_step=32", "rollout.n=8",
       "rollout.temperature=0.7", "learner.lr=1e-3", "run.max_staleness=0", "run.checkpoint_every=2",
       "run.progress=false", "cluster.num_cpus=2", "eval.every=0", "faults.health_interval_s=1",
       "faults.health_timeout_s=5", "learner.dtype=float32"]  # logprobs and losses compared exactly
CORES = sorted(os.sched_getaffinity(0))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Watcher(threading.Thread):
    """Samples, every 50 ms, the CPU time of the run's generator 0 and learner rank 0 (as
    RUN/actors.json names them: a replaced generator is followed) and their affinity."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.stop, self.samples, self.affinity, self.pids = run_dir, threading.Event(), [], {}, set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                actors = json.loads((self.run_dir / "actors.json").read_text())
                pids = {"generator": actors["generator 0"]["pid"], "learner": actors["learner rank 0"]["pid"]}
                now = {role: cpu_seconds(pid) for role, pid in pids.items()}
                for role, pid in pids.items():
                    self.affinity[role] = sorted(os.sched_getaffinity(pid))
                self.pids.add(pids["generator"])
                self.samples.append((time.monotonic(), pids["generator"], now))
            except (FileNotFoundError, ProcessLookupError, KeyError, json.JSONDecodeError, OSError):
                pass
            time.sleep(0.05)

    def rates(self, window_s: float = 0.25) -> list[dict[str, float]]:
        """CPU cores used by each actor over consecutive windows (one generator process each)."""
        out, start = [], 0
        for i, (t, gen, _) in enumerate(self.samples):
            t0, gen0, cpu0 = self.samples[start]
            if gen != gen0:
                start = i
                continue
            if t - t0 >= window_s:
                cpu = self.samples[i][2]
                out.append({role: (cpu[role] - cpu0[role]) / (t - t0) for role in cpu})
                start = i
        return out


def run(runs_dir: Path, name: str, overrides: list[str], kill_after: int | None = None) -> tuple[Path, Watcher]:
    run_dir = runs_dir / name
    watcher = Watcher(run_dir)
    proc = subprocess.Popen(grpo("train", *JOB, *overrides, f"run.name={name}", f"run.output_dir={runs_dir}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watcher.start()
    deadline = time.monotonic() + 900
    while kill_after is not None:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            os.kill(json.loads((run_dir / "actors.json").read_text())["generator 0"]["pid"], 9)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=900)
    watcher.stop.set()
    watcher.join()
    assert proc.returncode == 0, out[-4000:]
    return run_dir, watcher


def recorded(run_dir: Path) -> dict[int, dict[int, list[list[int]]]]:
    from cluster.artifacts.record import load

    return {step: {g["key"]: [s["token_ids"] for s in g["samples"]] for g in load(run_dir, step)["groups"]}
            for step in range(1, STEPS + 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if len(CORES) < 2:
        pytest.skip("needs 2 cores")
    runs_dir = tmp_path_factory.mktemp("colocated")
    colocated = run(runs_dir, "colocated", ["cluster.placement=colocated"], kill_after=2)
    # the reference: its own cores per actor, with the same thread counts (float reductions alike)
    reference = run(runs_dir, "disaggregated", ["cluster.generator_threads=2", "cluster.learner_threads=2"])
    return colocated, reference


def test_colocated_and_disaggregated_train_on_the_same_samples_with_the_same_losses(runs):
    (colo, _), (ref, _) = runs
    assert recorded(colo) == recorded(ref)
    a, b = read_metrics(colo), read_metrics(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-4, abs=1e-7), x["step"]
        assert x["reward_mean"] == y["reward_mean"]


def test_colocated_weight_updates_land_exactly_after_moving_the_policy(runs):
    (colo, _), (ref, _) = runs
    import yaml

    # colocated pushes through the learner's shared buffer (sync.transport=auto), the reference
    # through the gloo group: the same losses above say both deliver the same weights
    assert yaml.safe_load((colo / "config.yaml").read_text())["sync"]["transport"] == "shared"
    assert yaml.safe_load((ref / "config.yaml").read_text())["sync"]["transport"] == "collective"
    peer = json.loads((colo / "actors.json").read_text())["generator 0"]["sync_peer"]
    assert peer.startswith("shared@"), peer  # the replacement of the killed generator, too
    rows = read_metrics(colo)
    # every batch after the first was sampled by vLLM under updated weights: same logprobs as the learner's
    assert all(r["train/sampler_logprob_diff"] < 1e-4 for r in rows[1:]), [r["train/sampler_logprob_diff"] for r in rows]
    # ... and the updates moved the policy: the same completions under the start and step-4 weights
    import torch
    from transformers import AutoModelForCausalLM

    [start] = (colo.parent / "_cache").glob("tiny-*")
    from cluster.artifacts.record import load

    group = load(colo, 5)["groups"][0]
    ids = [group["prompt_ids"] + s["token_ids"] for s in group["samples"]]

    def logprobs(path):
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        out = []
        with torch.no_grad():
            for seq in ids:
                x = torch.tensor([seq])
                lp = torch.log_softmax(model(x).logits[0, :-1] / 0.7, -1).gather(-1, x[0, 1:, None])[:, 0]
                out.append(lp[len(group["prompt_ids"]) - 1:])
        return torch.cat(out)

    moved = (logprobs(start) - logprobs(colo / "checkpoints" / "step-4" / "hf")).abs().mean().item()
    assert moved > 1e-2, moved


def test_colocated_phases_each_use_every_core_and_take_turns(runs):
    (_, watcher), _ = runs
    assert watcher.affinity == {"generator": CORES, "learner": CORES}
    rates = watcher.rates()
    assert len(rates) > 20
    # what the processes did, from /proc: the learner's phase runs on both cores; the
    # generator's keeps one busy (on this 0.5M model vLLM's step is mostly serial Python and
    # ops below torch's parallel grain: its second thread finds little to do, measured 1.0-1.1)
    assert max(r["learner"] for r in rates) > 1.4, rates
    assert max(r["generator"] for r in rates) > 0.8, rates
    # and they take turns: while one works, the other's threads sleep (no spinning). A window
    # that straddles a change of phase holds some of both (one such measured 1.03 + 0.40).
    training = [r["generator"] for r in rates if r["learner"] > 1.3]
    generating = [r["learner"] for r in rates if r["generator"] > 0.8]
    assert training and median(training) < 0.1 and sum(x > 0.35 for x in training) <= len(training) / 10, training
    assert generating and median(generating) < 0.1 and sum(x > 0.35 for x in generating) <= len(generating) / 10


def test_a_killed_colocated_generator_is_replaced_and_nothing_is_lost(runs):
    (colo, watcher), _ = runs
    rows = read_metrics(colo)
    assert len(watcher.pids) == 2  # the killed generator and its replacement
    assert sum(r["faults/generator_restarts"] for r in rows) == 1
    assert sum(r["faults/requeued_prompts"] for r in rows) > 0  # what it held was sampled again, by the new one
    assert [r["samples"] for r in rows] == [32 * 8] * STEPS
    assert all(r["policy_version_trained"] == r["step"] for r in rows)
    replaced = json.loads((colo / "actors.json").read_text())["generator 0"]
    assert replaced["cores"] == CORES
