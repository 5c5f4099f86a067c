"""Per-step metrics: JSONL on disk, a PNG plot, and the end-of-run summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rewards.api import correctness_verifier
from cluster.artifacts.files import RunDirError, write_atomic
from rollout.types import Group, num_completion_tokens


class MetricsLog:
    """metrics.jsonl of a run. keep_steps > 0 (a resume) keeps the rows of the steps
    up to the checkpoint and drops any written after it (they are done again). The
    fault counters of dropped rows are carried into the next row written: a fault is
    counted once, however often the steps around it are done again."""

    def __init__(self, path: Path, keep_steps: int = 0, log: Callable[[str], None] = print) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.carried: dict[str, float] = {}
        if keep_steps and path.is_file():
            self.rows = read_rows(path, log)
        self.truncate(keep_steps)

    def truncate(self, steps: int) -> None:
        """Forget the rows after `steps` (they are done again after a learner restart)."""
        for row in (r for r in self.rows if r["step"] > steps):
            for key, value in row.items():
                if key.startswith("faults/"):
                    self.carried[key] = self.carried.get(key, 0.0) + value
        self.rows = [r for r in self.rows if r["step"] <= steps]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        for key, value in self.carried.items():
            row[key] = row.get(key, 0.0) + value
        self.carried = {}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_rows(path: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A torn last line (a crash mid-write) is dropped, and
    said; any other bad line is an error naming the file and line."""
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: unreadable ({e})") from None
    rows = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row with an integer `step`")
        except ValueError as e:
            if i == last:
                log(f"{path}: dropped its torn last line {i + 1} ({len(line)} bytes, left by a crash)")
                break
            raise RunDirError(f"{path}:{i + 1}: {e}") from None
        rows.append(row)
    return rows


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
    judge = correctness_verifier(groups[0].reward_parts)
    out["accuracy"] = float("nan") if judge is None else out[f"rewards/{judge}"]
    out["format_rate"] = out.get("rewards/format", float("nan"))
    out["kl"] = learner.get("train/kl", 0.0)
    out["clip_frac"] = learner.get("train/clip_frac", 0.0)
    out.update(episode_metrics(groups))
    out.update(learner)
    return out


EPISODE_OUTCOMES = ("done", "max_turns", "max_tokens", "timeout", "error", "abandoned")


def episode_metrics(groups: list[Group]) -> dict[str, float]:
    """Multi-turn episodes (Group.episode; none for single-turn groups): per episode, the
    mean model turns, tool calls and observation tokens; over the step, the counts of
    tool errors, re-runs and timeouts, the share of each way an episode ended, and
    time/env, the seconds spent in environment calls summed over episodes (they run in
    parallel over reward workers and their processes, so it can exceed the step)."""
    eps = [g.episode for g in groups if g.episode is not None]
    if not eps:
        return {}
    n = sum(len(e["turns"]) for e in eps)

    def total(key: str) -> float:
        return float(sum(sum(e[key]) for e in eps))

    out = {"env/turns": total("turns") / n, "env/tool_calls": total("tool_calls") / n,
           "env/observation_tokens": total("observation_tokens") / n, "env/tool_errors": total("tool_errors"),
           "env/reruns": total("reruns"), "env/timeouts": total("timeouts"), "env/errors": total("errors"),
           "env/reward": total("env_reward") / n, "time/env": total("env_seconds")}
    for outcome in EPISODE_OUTCOMES:
        out[f"env/outcome_{outcome}"] = sum(o == outcome for e in eps for o in e["outcome"]) / n
    return out


def slowest_generator(per_actor: list[dict[str, float]]) -> dict[str, float]:
    """Generators' take_timings() -> the step's metrics (the slowest generator per phase)."""
    phases = {"generate/engine": "time/generate_engine", "generate/convert": "time/generate_convert"}
    out = {key: max(t.get(phase, 0.0) for t in per_actor) for phase, key in phases.items()}
    sync_phases = ("sync/start", "sync/receive", "sync/finish")  # wait, load and pause are parts of these
    out["time/sync_generator"] = max(sum(t.get(k, 0.0) for k in sync_phases) for t in per_actor)
    out["time/sync_pause"] = max(t.get("sync/pause", 0.0) for t in per_actor)
    # how full the engines' steps were: sequences in flight per engine step, and the steps
    steps = sum(t.get("generate/steps", 0.0) for t in per_actor)
    out["generate/engine_steps"] = max(t.get("generate/steps", 0.0) for t in per_actor)
    out["generate/batch_mean"] = sum(t.get("generate/sequences", 0.0) for t in per_actor) / steps if steps else 0.0
    return out


def summarize_training(rows: list[dict[str, Any]], window: int = 5) -> dict[str, Any]:
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


PANELS = [
    ("reward", ["reward_mean"]),
    ("accuracy (sampled; eval: held-out)", ["accuracy"]),
    ("response length (tokens)", ["response_length"]),
    ("entropy", ["train/entropy"]),
    ("KL to reference / sampler mismatch KL", ["train/kl", "train/mismatch_kl"]),
    ("clip fraction / IS-masked fraction", ["train/clip_frac", "train/is_masked_frac"]),
    ("seconds per step", []),  # stacked: waiting for the batch, train, weight sync
    ("staleness (policy versions)", ["staleness/mean", "staleness/max"]),
]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (NaNs skipped)."""
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def plot_training(rows: list[dict[str, Any]], path: Path, evals: list[dict[str, Any]] = ()) -> None:
    """Eight panels per step: reward, accuracy (with the held-out evaluations), length,
    entropy, KL, clip fraction, the time split, staleness. Past 50 steps each curve is a
    trailing mean (window steps/50, at least 5) over faint raw points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(5, len(rows) // 50) if len(rows) > 50 else 1
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            values = [float(r.get(key, float("nan"))) for r in rows]
            if window > 1:
                ax.plot(steps, values, ".", ms=2, alpha=0.25)
                ax.plot(steps, smooth(values, window), linewidth=1.2, label=f"{key} (mean of {window})")
            else:
                ax.plot(steps, values, marker=".", linewidth=1, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    acc = axes.flat[1]
    for key in sorted({k for e in evals for k in e if k.startswith(("eval/pass@1", "eval/cons@"))}):
        acc.plot([e["step"] for e in evals], [e[key] for e in evals], "s--", label=key)
    times = axes.flat[6]
    bottom = [0.0] * len(rows)
    for key, color in (("time/wait_batch", "tab:blue"), ("time/train", "tab:orange"), ("time/sync", "tab:red")):
        values = [max(float(r.get(key, 0.0)), 0.0) for r in rows]
        times.bar(steps, values, bottom=bottom, width=1.0, color=color, label=key.split("/")[1])
        bottom = [b + v for b, v in zip(bottom, values)]
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
