"""The R1 recipe's other stages through the real CLI: `grpo eval` on the generators and
reward workers, `grpo sft` on the learner's DeepSpeed set-up, `grpo distill` end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.artifacts.eval_report import pass_at_k
from tests.helpers import grpo

SMALL = ["cluster.num_cpus=2", "rollout.max_tokens=48"]


def load_vllm_and_sample(model: Path, prompt: str) -> str:
    """The model serves in vLLM (a fresh process): -> one greedy-ish completion."""
    code = (
        "from rollout.config import RolloutConfig\n"
        "from rollout.generator import Generator\n"
        f"g = Generator({str(model)!r}, RolloutConfig(n=1, temperature=0.01, max_tokens=24))\n"
        f"groups = g.generate([{{'prompt': {prompt!r}, 'answer': ''}}], [[0]], {{}})\n"
        "print('TEXT' + groups[0].samples[0].text)\n"
        "g.close()\n"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("TEXT", 1)[1]


def test_grpo_eval_through_the_generators(full_run, tmp_path):
    run_dir, _ = full_run
    out = tmp_path / "eval"
    proc = subprocess.run(grpo("eval", str(run_dir), "--k", "4", "--output", str(out), "eval.max_prompts=12", *SMALL),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert report["k"] == 4 and report["n_prompts"] == len(rows) == 12
    assert report["sampling"]["temperature"] == 0.6 and report["sampling"]["top_p"] == 0.95  # R1's evaluation
    assert all(len(r["completions"]) == len(r["scores"]) == len(r["extracted"]) == 4 for r in rows)
    assert all(s in (0.0, 1.0) for r in rows for s in r["scores"])
    # the figures follow from the samples: pass@1 is the mean score, pass@j the unbiased estimator
    assert report["pass@1"] == pytest.approx(sum(sum(r["scores"]) for r in rows) / 48)
    for j in (2, 4):
        want = sum(pass_at_k(4, int(sum(r["scores"])), j) for r in rows) / 12
        assert report[f"pass@{j}"] == pytest.approx(want)
    # a majority vote is right only where some sample is right
    assert report["cons@4"] <= sum(max(r["scores"]) for r in rows) / 12
    # the held-out prompts are the built-in task's eval split, scored against their true sums
    for r in rows:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert r["answer"] == str(a + b)
        assert r["scores"] == [float(x == str(a + b)) for x in r["extracted"]]
    assert report["mean_length"] > 0 and len(report["accuracy_by_length"]) == 4
    assert (out / "eval.png").stat().st_size > 10_000
    assert "pass@1" in proc.stdout and "cons@4" in proc.stdout


def test_grpo_sft_lowers_the_loss_and_the_result_serves_in_vllm(tiny_model, tmp_path):
    from cluster.data import DataConfig, arithmetic_split

    rows = arithmetic_split(DataConfig())["sft"][:64]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["reference"]}) + "\n" for r in rows))
    out = tmp_path / "sft-out"
    proc = subprocess.run(grpo("sft", "--data", str(data), "--model", str(tiny_model), "--output", str(out),
                               "--steps", "60", "--batch-size", "32", "--lr", "3e-3", *SMALL),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((out / "sft.json").read_text())
    assert result["steps"] == 60 and math.isfinite(result["loss_last"])
    assert result["loss_last"] < 0.5 * result["loss_first"]
    assert (out / "config.json").is_file()
    # the random model writes noise; after SFT it writes the task's format
    text = load_vllm_and_sample(out, rows[0]["prompt"])
    assert text.startswith("<think>"), text


def test_grpo_distill_end_to_end(full_run, tiny_model, tmp_path):
    """Teacher: the session's trained run; student: a random tiny model. Only verified
    answers are kept (at most --keep per prompt), the student is fine-tuned on them and
    scored on held-out prompts before and after."""
    run_dir, _ = full_run
    prompts = tmp_path / "prompts.jsonl"
    # prompts of the teacher's own RL split (the built-in task's defaults, as the session's run
    # trained on them), where it answers about half correctly: enough verified examples
    from cluster.data import DataConfig, arithmetic_split

    rl = arithmetic_split(DataConfig())["rl"][:16]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rl))
    out = tmp_path / "distill"
    proc = subprocess.run(grpo("distill", "--teacher", str(run_dir), "--student", str(tiny_model), "--data",
                               str(prompts), "--k", "4", "--keep", "2", "--steps", "60", "--batch-size", "16",
                               "--lr", "3e-3", "--output", str(out), "eval.max_prompts=8", "eval.k=2", *SMALL),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((out / "distill.json").read_text())
    kept = [json.loads(line) for line in (out / "distill.jsonl").read_text().splitlines()]
    assert report["examples_kept"] == len(kept) > 0 and report["prompts"] == 16
    per_prompt: dict[str, int] = {}
    for row in kept:  # every kept completion is verified correct
        a, b = map(int, row["prompt"][:-1].split("+"))
        assert row["completion"].rsplit("<answer>", 1)[1].split("</answer>")[0].strip() == str(a + b)
        per_prompt[row["prompt"]] = per_prompt.get(row["prompt"], 0) + 1
    assert max(per_prompt.values()) <= 2
    assert report["sft"]["loss_last"] < 0.5 * report["sft"]["loss_first"]
    assert report["held_out_prompts"] == 8 and report["student_pass@1_before"] == 0.0  # a random model
    assert (out / "student" / "config.json").is_file()
    text = load_vllm_and_sample(out / "student", "1+2=")
    assert text.startswith("<think>"), text
