"""What a user sees of a run: the quiet console, TensorBoard, the recorded
rollouts, `grpo samples` and `grpo replay` (on the session's short real run)."""
import json
import os
import shutil
import subprocess

import msgpack
import pytest

from tests.helpers import grpo, read_metrics

NOISY = ["Triton", "FutureWarning", "NUMA", "Loading safetensors", "Writing model shards", "DeprecationWarning",
         "Token authentication", "(pid=", "INFO worker.py", "numa", "UserWarning"]


def test_the_console_shows_our_lines_only(full_run):
    run_dir, proc = full_run
    console = proc.stdout + proc.stderr
    assert not [w for w in NOISY if w in console], console[-3000:]
    lines = [line for line in console.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(("sft:", "grpo:"))]  # progress bars
    assert len(lines) <= 15, "\n".join(lines)
    assert any(line.startswith("summary: 12 steps") for line in lines)
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert "generator-0.log" in logs and "learner-0.log" in logs and "reward-worker-0.log" in logs, logs
    assert (run_dir / "logs" / "generator-0.log").stat().st_size > 0  # what the actors print went here


def test_an_actor_exception_reaches_the_console(tiny_model, runs_dir, tmp_path):
    """A model whose config names an unknown activation fails inside the actors: the
    console shows that cause (not only "actor died"), and the run exits non-zero fast."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_act"] = "no_such_activation_fn"
    (broken / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(grpo("train", f"model.path={broken}", "run.steps=2", "run.progress=false",
                               "cluster.num_cpus=2", "cluster.start_timeout_s=120", f"run.output_dir={tmp_path}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no_such_activation_fn" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_tensorboard_holds_every_step_of_the_metrics(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = full_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = read_metrics(run_dir)
    for key in ("reward_mean", "accuracy", "train/loss", "train/entropy", "time/step"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    texts = acc.Tensors("samples/text_summary")
    assert len(texts) == len(rows)
    assert b"<answer>" in texts[-1].tensor_proto.string_val[0]


def test_recorded_rollouts_round_trip_and_match_the_metrics(full_run):
    from cluster.artifacts.record import load, read_step, steps, to_groups

    run_dir, _ = full_run
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert steps(run_dir) == sorted(rows)
    for step, row in rows.items():
        record = load(run_dir, step)
        raw = msgpack.unpackb((run_dir / "rollouts" / f"step-{step:06d}.msgpack").read_bytes(), raw=False)
        assert raw["format"] == "grpo-rollouts/1" and raw["step"] == step  # plain msgpack, readable by anyone
        trained = [g for g in record["groups"] if g["trained"]]
        samples = [s for g in trained for s in g["samples"]]
        assert len(samples) == row["samples"]
        assert sum(s["reward"] for s in samples) / len(samples) == pytest.approx(row["reward_mean"])
        assert sum(s["scores"]["accuracy"] for s in samples) / len(samples) == pytest.approx(row["accuracy"])
        for g in trained:
            assert sum(s["advantage"] for s in g["samples"]) == pytest.approx(0.0, abs=1e-5)
            for s in g["samples"]:
                assert len(s["token_ids"]) == len(s["logprobs"]) > 0 and all(lp <= 0 for lp in s["logprobs"])
                assert row["policy_version"] - row["staleness/max"] <= s["versions"][0][0] <= row["policy_version"]
                assert s["finish_reason"] in ("stop", "length") and "extracted" in s["info"]["accuracy"]
        groups = to_groups(record)
        assert [g.key for g in groups] == [g["key"] for g in trained]
        assert groups[0].samples[0].completion_ids == trained[0]["samples"][0]["token_ids"]
        assert read_step(run_dir / "rollouts" / f"step-{step:06d}.msgpack") == record


def test_grpo_samples_on_a_real_run(full_run):
    from cluster.artifacts.record import load

    run_dir, _ = full_run
    proc = subprocess.run(grpo("samples", str(run_dir), "--step", "6", "--best", "3", "--json"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(items) == 3 and all(i["step"] == 6 for i in items)
    assert [i["reward"] for i in items] == sorted((i["reward"] for i in items), reverse=True)
    assert items[0]["reward"] == max(s["reward"] for g in load(run_dir, 6)["groups"] for s in g["samples"])
    text = subprocess.run(grpo("samples", str(run_dir), "--worst", "2", "--verifier", "accuracy"),
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "<answer>" in text.stdout and "advantage" in text.stdout and "accuracy" in text.stdout
    bad = subprocess.run(grpo("samples", str(run_dir), "--verifier", "nope"), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "nope" in bad.stdout + bad.stderr


def test_grpo_replay_reproduces_three_recorded_steps(full_run):
    run_dir, _ = full_run
    proc = subprocess.run(grpo("replay", str(run_dir), "--from-step", "4", "--steps", "3", "cluster.num_cpus=2"),
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((run_dir / "replay-4-3.json").read_text())
    assert [r["step"] for r in result["rows"]] == [4, 5, 6]
    for r in result["rows"]:
        assert r["replay/train/loss"] == pytest.approx(r["recorded/train/loss"], abs=1e-6)
        assert r["replay/train/grad_norm"] == pytest.approx(r["recorded/train/grad_norm"], rel=1e-5)
