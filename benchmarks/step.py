"""Step time of the default job, broken down: waiting for the batch / train / sync /
idle as the driver sees them, against the compute inside the actors measured in the
same steps (the slowest generator's engine steps, the learner's train step). With
max_staleness 0 the driver waits for all of generation and scoring; with S > 0 the
generators work while the learner trains, and the wait shrinks. Everything else is
orchestration overhead: Ray calls and transfers, waiting on rewards, the weight sync,
the driver's own bookkeeping.

    grpo bench step [--steps 12] [--warmup 2] [key.sub=value ...]

Runs the real `grpo train` loop (cluster/commands/train.py) with run.steps=--steps on the
default job's model (the cached cold start of `grpo train`, built if missing).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT, log, median, report

PHASES = ["wait_batch", "train", "sync", "idle"]


def breakdown(rows: list[dict[str, Any]], warmup: int) -> list[dict[str, float]]:
    """Per measured step: its period (start to the next step's start) split into the
    driver's phases, and the compute inside the actors."""
    out = []
    for row, nxt in zip(rows[warmup:], rows[warmup + 1 :]):
        period = nxt["time/started"] - row["time/started"]
        phases = {p: row[f"time/{p}"] for p in PHASES[:-1]}
        phases["idle"] = period - sum(phases.values())  # the driver's own work between steps
        compute = {"generate": row["time/generate_engine"], "train": row["train/seconds"]}
        out.append({
            "step": row["step"], "period_s": period, **{f"{p}_s": v for p, v in phases.items()},
            "generate_compute_s": compute["generate"], "train_compute_s": compute["train"],
            "overhead_s": period - compute["generate"] - compute["train"],
            "samples": row["samples"], "tokens": row["tokens"],
        })
    return out


def plot(steps: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    parts = [
        ("waiting for the batch", lambda s: s["wait_batch_s"], "tab:blue"),
        ("learner compute", lambda s: s["train_compute_s"], "tab:orange"),
        ("train: rest", lambda s: s["train_s"] - s["train_compute_s"], "navajowhite"),
        ("weight sync", lambda s: s["sync_s"], "tab:red"),
        ("idle (driver)", lambda s: s["idle_s"], "lightgrey"),
    ]
    fig, ax = plt.subplots(figsize=(9.5, 4))
    xs = [s["step"] for s in steps]
    bottom = [0.0] * len(steps)
    for label, fn, color in parts:
        vals = [max(fn(s), 0.0) for s in steps]
        ax.bar(xs, vals, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    share = median([s["overhead_s"] / s["period_s"] for s in steps])
    ax.set_title(f"step time (engine busy {median([s['generate_compute_s'] / s['period_s'] for s in steps]):.0%}, "
                 f"overhead {share:.1%} of a step)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="grpo bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out (engine warm-up)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for grpo train")
    args = parser.parse_args(argv)
    if args.steps < args.warmup + 2:
        parser.error("--steps must be at least --warmup + 2 (a step's period ends at the next step's start)")
    import ray

    from benchmarks.common import start_ray
    from cluster.config import load_config
    from cluster.commands.train import train
    from cluster.commands.cold_start import prepare_model

    started = time.perf_counter()
    cfg = load_config(None, [f"run.steps={args.steps}", *args.overrides])
    cfg.model.path = prepare_model(cfg, log)  # the default job's model (cached cold start)
    start_ray()
    cfg.run.output_dir = str(Path(args.out) / "_runs")
    cfg.run.name = time.strftime("step-%Y%m%d-%H%M%S")
    try:
        summary = train(cfg, log=log)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    samples = cfg.run.prompts_per_step * cfg.rollout.n
    for row in rows:
        row["tokens"] = row["response_length"] * row["samples"]
    steps = breakdown(rows, args.warmup)
    med = {k: median([s[k] for s in steps]) for k in steps[0] if k != "step"}
    period = med["period_s"]
    result = {
        "measured_steps": [s["step"] for s in steps], "median": med, "steps": steps,
        "samples_per_s": samples / period, "tokens_per_s": med["tokens"] / period,
        "overhead_share": median([s["overhead_s"] / s["period_s"] for s in steps]),
        "generator_busy_share": median([s["generate_compute_s"] / s["period_s"] for s in steps]),
        "learner_busy_share": median([s["train_compute_s"] / s["period_s"] for s in steps]),
        "run_dir": summary["run_dir"],
    }
    headers = ["", "step", *PHASES, "vLLM", "learner", "overhead"]
    row = [period, *[med[f"{p}_s"] for p in PHASES], med["generate_compute_s"], med["train_compute_s"], med["overhead_s"]]
    table = [["seconds", *row], ["share of step", *[v / period for v in row]]]
    log(f"{len(steps)} steps measured: {period:.2f} s per step, {result['samples_per_s']:.0f} samples/s, "
        f"overhead {result['overhead_share']:.1%}")
    summary_out = {"step/seconds": period, "step/samples_per_s": result["samples_per_s"],
                   "step/overhead_share": result["overhead_share"]}
    config = {"args": vars(args), "config": cfg.model_dump(mode="json")}
    return report("step", args.out, config, result, summary_out, headers, table, lambda p: plot(steps, p), started)


if __name__ == "__main__":
    main()
