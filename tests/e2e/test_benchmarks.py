"""The benchmarks as a product: short real runs through `grpo bench` that must write a
complete report (figures are not asserted: this machine is shared and noisy; the
ratios are checked against their own raw figures)."""
from __future__ import annotations

import json
import subprocess
import sys


def _bench(tmp_path, *args, timeout=400):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _report(tmp_path, name):
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert data["machine"]["cores"] >= 1 and data["machine"]["memory_gib"] > 0
    assert all(data["versions"][k] for k in ("torch", "vllm", "ray", "deepspeed"))
    return data


def test_weight_sync_bench_reports_against_its_limits(tmp_path):
    proc = _bench(tmp_path, "weight-sync", "--sizes", "1M", "--generators", "1", "--reps", "1", "sync.bucket_mb=1",
                  "--modes", "full", "delta", "lora-adapter", timeout=600)
    data = _report(tmp_path, "weight_sync")
    (r,) = data["results"]
    # The learner sent exactly the model's parameter bytes (fp32, tied head once), in 1 MiB buckets.
    assert r["bytes"] == 4 * r["parameters"] == 4_256_256 and r["buckets"] == 5
    assert all(run["bytes"] == r["bytes"] for run in r["runs"])  # every sync sent the whole model
    # The generator's own account of the sync (measured in another process) fits inside the learner's.
    assert 0 < r["generator_wait_s"] <= r["generator_receive_s"] < r["sync_s"]
    assert 0 < r["generator_load_s"] <= r["generator_pause_s"] <= r["generator_finish_s"] < r["sync_s"]
    assert all(run["sync/receive"] + run["sync/finish"] < run["seconds"] for run in r["runs"])
    assert data["config"]["sync"]["bucket_mb"] == 1
    assert "sync/raw" in proc.stdout and "1M" in proc.stdout

    # the ways of pushing, each after a real learner step: what travels is what each mode says
    modes = {m["mode"]: m for m in _report(tmp_path, "push_modes")["results"]}
    assert modes["full"]["bytes"] == r["bytes"] and modes["full"]["bytes_vs_full"] == 1
    assert modes["delta"]["first_push_bytes"] == r["bytes"]  # a group's first push is full
    assert 0.99 <= modes["delta"]["changed_frac"] <= 1 and modes["delta"]["bytes"] <= r["bytes"]  # fp32: all change
    adapter = modes["lora-adapter"]  # exactly the adapters (rank 16 of a 128-wide model: 0.18x of it)
    assert adapter["bytes"] == 4 * adapter["trainable_elements"] and adapter["bytes_vs_full"] < 0.25
    assert adapter["grad_plus_optimizer_bytes"] < 0.25 * modes["full"]["grad_plus_optimizer_bytes"]
    assert all(m["generate_s"] > 0 and m["ratio_to_full_raw_plus_load"] > 0 for m in modes.values())


def test_generation_bench_samples_the_same_tokens_as_raw_vllm(tmp_path):
    _bench(tmp_path, "generation", "--models", "0.5M", "--prompts", "2", "--reps", "1", "rollout.n=2")
    (r,) = _report(tmp_path, "generation")["results"]
    assert r["samples"] == 4 and r["same_tokens"]  # same seeds, same engine arguments: same tokens
    assert r["runs"]["actor"][0]["tokens"] == r["runs"]["raw"][0]["tokens"] > 0
    # the actor's engine time (measured inside the actor) is part of what the driver waited for
    assert all(0 < run["engine_seconds"] < run["seconds"] for run in r["runs"]["actor"])


def test_rewards_bench(tmp_path):
    _bench(tmp_path, "rewards", "--verifiers", "countdown", "--samples", "64")
    (r,) = _report(tmp_path, "rewards")["results"]
    assert r["samples"] == 64 and r["inline_per_s"] > 0
    # the dispatch path training uses scores exactly what the verifier scores inline: half right
    assert r["mean_score_inline"] == r["mean_score_workers"]["1"] == r["mean_score_workers"]["2"] == 0.5
