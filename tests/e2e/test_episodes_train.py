"""`grpo train` with multi-turn episodes, end to end, on one short real run: the
external example environment (examples/retry_env.py, a program speaking msgpack on
stdio) answers a wrong <answer> with feedback and a second try. The run's metrics, its
recorded rollouts, `grpo samples` and `grpo replay` are all read from that one run."""
import json
import re
import subprocess
import sys

import pytest

from tests.helpers import EXAMPLES, grpo, read_metrics

FEEDBACK = " wrong, try again: "
EPISODE_RUN = [
    "model.cold_start.steps=150", "run.steps=4", "run.checkpoint_every=2", "run.prompts_per_step=8", "rollout.n=4",
    "run.max_staleness=0", "run.progress=false", "cluster.num_cpus=2", "eval.every=0", "env.name=retry",
    f"env.external={{command: [{sys.executable}, {EXAMPLES / 'retry_env.py'}]}}", "env.stop=[</answer>]",
    "env.max_turns=3", "env.max_episode_tokens=96", "learner.dtype=float32",  # logprobs compared exactly
]


@pytest.fixture(scope="module")
def episode_run(runs_dir):
    proc = subprocess.run(grpo("train", *EPISODE_RUN, "run.name=episodes", f"run.output_dir={runs_dir}"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return runs_dir / "episodes"


def test_episodes_are_recorded_turn_by_turn_and_the_metrics_count_them(episode_run):
    from transformers import AutoTokenizer

    from cluster.artifacts.record import load, steps

    tok = AutoTokenizer.from_pretrained(str(episode_run / "final"))
    feedback = tok(FEEDBACK, add_special_tokens=False)["input_ids"]  # template none: plain text, on its own
    rows = read_metrics(episode_run)
    assert steps(episode_run) == [r["step"] for r in rows] == [1, 2, 3, 4]
    two_turns = 0
    for row in rows:
        samples = [s for g in load(episode_run, row["step"])["groups"] for s in g["samples"]]
        assert len(samples) == row["samples"] == 32
        for s in samples:
            ep = s["episode"]
            assert "".join(text for text, _ in ep["segments"]) == s["text"]
            assert [by_model for _, by_model in ep["segments"]] == [1, 0] * (ep["turns"] - 1) + [1]
            assert all(text == FEEDBACK for text, by_model in ep["segments"] if not by_model)
            mask = s.get("loss_mask") or [1] * len(s["token_ids"])
            hidden = [t for t, m in zip(s["token_ids"], mask) if not m]
            assert hidden == feedback * (ep["turns"] - 1) == [t for t, m in zip(s["token_ids"], mask) if m == 0]
            assert ep["observation_tokens"] == len(hidden) and ep["outcome"] == "done"
            assert all(lp <= 0 for lp, m in zip(s["logprobs"], mask) if m)
            assert all(lp == 0.0 for lp, m in zip(s["logprobs"], mask) if not m)  # carries no behaviour logprob
            assert ep["reruns"] == 0 and ep["tool_errors"] == 0
            two_turns += ep["turns"] > 1
        n = len(samples)
        assert row["env/turns"] == pytest.approx(sum(s["episode"]["turns"] for s in samples) / n)
        assert row["env/observation_tokens"] == pytest.approx(sum(s["episode"]["observation_tokens"] for s in samples) / n)
        assert row["env/outcome_done"] == 1.0 and row["time/env"] > 0
        assert row["train/sampler_logprob_diff"] < 1e-4  # the learner agrees with the sampler on model tokens
    assert two_turns > 0  # some first answers were wrong: the feedback turn was exercised


def test_a_first_answer_that_is_right_ends_the_episode(episode_run):
    """The environment's rule, checked from the records: an episode goes on past turn 1
    exactly when turn 1's answer is wrong, and the accuracy verifier scores its last answer."""
    from cluster.artifacts.record import load

    checked = 0
    for step in (1, 2, 3, 4):
        for g in load(episode_run, step)["groups"]:
            for s in g["samples"]:
                first = s["episode"]["segments"][0][0]
                said = [a.strip() for a in re.findall(r"<answer>(.*?)</answer>", first, re.S)]
                assert (s["episode"]["turns"] == 1) == (said[-1:] == [g["row"]["answer"]]), (first, g["row"]["answer"])
                checked += 1
    assert checked == 4 * 32


def test_grpo_samples_shows_an_episode_with_its_observations_marked(episode_run):
    proc = subprocess.run(grpo("samples", str(episode_run), "--worst", "2"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[model turn 2]" in proc.stdout and "[observation · from the environment · not trained on]" in proc.stdout
    assert "|  wrong, try again:" in proc.stdout and "episode: 2 model turn(s)" in proc.stdout
    items = [json.loads(line) for line in subprocess.run(
        grpo("samples", str(episode_run), "--best", "3", "--json"), capture_output=True, text=True,
        timeout=120).stdout.splitlines()]
    assert len(items) == 3 and all("segments" in i["episode"] for i in items)


def test_grpo_replay_reproduces_an_episode_run(episode_run):
    proc = subprocess.run(grpo("replay", str(episode_run), "--from-step", "3", "--steps", "2", "cluster.num_cpus=2"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((episode_run / "replay-3-2.json").read_text())
    assert [r["step"] for r in result["rows"]] == [3, 4]
    for r in result["rows"]:
        assert r["replay/train/loss"] == pytest.approx(r["recorded/train/loss"], abs=1e-6)
        assert r["replay/train/grad_norm"] == pytest.approx(r["recorded/train/grad_norm"], rel=1e-5)
