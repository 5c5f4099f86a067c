"""Per-step metrics: JSONL on disk, a PNG plot, and the end-of-run summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rollout.types import Group, num_completion_tokens


class MetricsLog:
    """metrics.jsonl of a run. keep_steps > 0 (a resume) keeps the rows of the steps
    up to the checkpoint and drops any written after it (they are done again)."""

    def __init__(self, path: Path, keep_steps: int = 0) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if keep_steps and path.is_file():
            old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in old if r["step"] <= keep_steps]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def step_metrics(groups: list[Group], learner: dict[str, float]) -> dict[str, Any]:
    """One step's row: reward, accuracy, format, length and verifier counts over every
    group sampled for it (dropped ones included), then the learner's metrics."""
    samples = [s for g in groups for s in g.samples]
    rewards = [r for g in groups for r in g.rewards]
    out: dict[str, Any] = {
        "reward_mean": sum(rewards) / len(rewards),
        "response_length": num_completion_tokens(groups) / len(samples),
        "truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "policy_version": min(s.version for s in samples),
        "samples": len(samples),
    }
    for name in groups[0].reward_parts:
        values = [v for g in groups for v in g.reward_parts[name]]
        out[f"rewards/{name}"] = sum(values) / len(values)
    for stat in ("timeouts", "errors", "cache_hits"):
        out[f"reward/{stat}"] = sum(g.reward_stats[stat] for g in groups)
    out["accuracy"] = out.get("rewards/accuracy", out.get("rewards/math", float("nan")))
    out["format_rate"] = out.get("rewards/format", float("nan"))
    out["kl"] = learner.get("train/kl", 0.0)
    out["clip_frac"] = learner.get("train/clip_frac", 0.0)
    out.update(learner)
    return out


def summarize(rows: list[dict[str, Any]], window: int = 5) -> dict[str, Any]:
    """Accuracy over the first and last `window` steps, and what changed."""
    def mean(key: str, part: list[dict[str, Any]]) -> float:
        values = [r[key] for r in part if key in r]
        return sum(values) / len(values) if values else float("nan")

    first, last = rows[:window], rows[-window:]
    out = {"steps": len(rows)}
    for key in ("accuracy", "reward_mean", "format_rate", "response_length"):
        out[f"{key}_first{window}"] = mean(key, first)
        out[f"{key}_last{window}"] = mean(key, last)
    out["accuracy_gain"] = out[f"accuracy_last{window}"] - out[f"accuracy_first{window}"]
    out["seconds_total"] = sum(r.get("time/step", 0.0) for r in rows)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Reward, accuracy and response length per step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [("reward_mean", "reward"), ("accuracy", "accuracy"), ("response_length", "response length (tokens)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker=".", linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
