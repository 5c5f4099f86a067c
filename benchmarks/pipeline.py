"""Synchronous against asynchronous training, in one run, on a cluster in miniature:
the generator and the learner each pinned to a core of their own (two vLLM-CPU and
DeepSpeed-CPU "nodes" on one machine), the same job run with run.max_staleness 0
(lock-step: each waits for the other) and S = 1, 2 (the generators sample the next
steps' prompts while the learner trains).

    grpo bench pipeline [--staleness 0 1 2] [--steps 14] [--warmup 4] [key.sub=value ...]

The limit the asynchronous figure is measured against is the synchronous one of the
same run: speedup = samples/s at the best S / samples/s at S = 0. Its cap is what perfect
overlap of the synchronous run's two computations would give, (generate + train) / the
larger: 2x when they are equal (the report gives their ratio, the cap and the share of it
reached).
The default job's model (the cached cold start of `grpo train`) is used unless
model.path is set.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT, log, median, report

MINIATURE = ["cluster.generator_cpus=1", "cluster.learner_cpus=1", "cluster.reward_cpus=0",
             "cluster.generator_threads=1", "cluster.learner_threads=1", "cluster.pin_cpus=true",
             "rollout.num_generators=1"]


def measure(rows: list[dict[str, Any]], warmup: int, samples: int) -> dict[str, Any]:
    """A run's metrics -> its steady-state figures (steps after `warmup`)."""
    measured = rows[warmup:]
    periods = [b["time/started"] - a["time/started"] for a, b in zip(measured, measured[1:])]
    period = median(periods)

    def med(key: str) -> float:
        return median([r.get(key, 0.0) for r in measured])

    return {
        "period_s": period, "samples_per_s": samples / period, "steps_measured": len(periods),
        "wait_batch_s": med("time/wait_batch"), "train_s": med("time/train"), "sync_s": med("time/sync"),
        "generate_engine_s": med("time/generate_engine"), "learner_compute_s": med("train/seconds"),
        "sync_pause_s": med("time/sync_pause"),
        "generator_busy_share": med("time/generate_engine") / period, "learner_busy_share": med("train/seconds") / period,
        "staleness_mean": sum(r["staleness/mean"] for r in measured) / len(measured),
        "staleness_max": max(r["staleness/max"] for r in measured),
        "accuracy_mean": sum(r["accuracy"] for r in measured) / len(measured),
        "periods": periods,
    }


def run_one(cfg, staleness: int, out: Path) -> list[dict[str, Any]]:
    from cluster.commands.train import train

    run_cfg = cfg.model_copy(deep=True)
    run_cfg.run.max_staleness = staleness
    run_cfg.run.name = time.strftime(f"pipeline-S{staleness}-%Y%m%d-%H%M%S")
    run_cfg.run.output_dir = str(out / "_runs")
    summary = train(run_cfg, log=log)
    return [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def plot(results: dict[str, dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(results)
    ax.bar(names, [results[n]["samples_per_s"] for n in names], color=["grey"] + ["tab:blue"] * (len(names) - 1))
    for i, n in enumerate(names):
        ax.annotate(f"{results[n]['samples_per_s'] / results[names[0]]['samples_per_s']:.2f}x",
                    (i, results[n]["samples_per_s"]), ha="center", va="bottom")
    ax.set_ylabel("samples / s")
    ax.set_title("throughput, steady state (same run, same machine)")
    width = 0.38
    xs = range(len(names))
    ax2.bar([x - width / 2 for x in xs], [results[n]["generator_busy_share"] for n in names], width, label="generator engine")
    ax2.bar([x + width / 2 for x in xs], [results[n]["learner_busy_share"] for n in names], width, label="learner")
    ax2.set_xticks(list(xs), names)
    ax2.set_ylim(0, 1.1)
    ax2.set_ylabel("busy share of a step")
    ax2.legend(fontsize=8)
    ax2.set_title("who is busy: overlap keeps both working")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="grpo bench pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--staleness", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out (engine warm-up, pipeline fill)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for grpo train")
    args = parser.parse_args(argv)
    if 0 not in args.staleness or len(args.staleness) < 2:
        parser.error("--staleness needs 0 (the synchronous limit) and at least one S > 0")
    if args.steps < args.warmup + 3:
        parser.error("--steps must be at least --warmup + 3")
    import ray

    from cluster.config import load_config
    from cluster.commands.cold_start import prepare_model

    started = time.perf_counter()
    cfg = load_config(None, [f"run.steps={args.steps}", "run.progress=false", *MINIATURE, *args.overrides])
    cfg.model.path = prepare_model(cfg, log)
    samples = cfg.run.prompts_per_step * cfg.rollout.n
    results: dict[str, dict] = {}
    for s in args.staleness:
        try:
            rows = run_one(cfg, s, Path(args.out))
        finally:
            ray.shutdown()
        results[f"S={s}"] = measure(rows, args.warmup, samples)
        log(f"S={s}: {results[f'S={s}']['period_s']:.2f} s per step, {results[f'S={s}']['samples_per_s']:.0f} samples/s")
    sync = results["S=0"]
    best = max((k for k in results if k != "S=0"), key=lambda k: results[k]["samples_per_s"])
    result = {
        "samples_per_s_sync": sync["samples_per_s"], "samples_per_s_async": results[best]["samples_per_s"],
        "best": best, "speedup": results[best]["samples_per_s"] / sync["samples_per_s"],
        "train_to_generate_ratio": sync["learner_compute_s"] / sync["generate_engine_s"],
        "runs": results,
    }
    # the cap: perfect overlap of the synchronous run's two computations (their sum over the larger)
    gen, learn = sync["generate_engine_s"], sync["learner_compute_s"]
    result["cap"] = (gen + learn) / max(gen, learn, 1e-9)
    result["speedup_of_cap"] = result["speedup"] / result["cap"]
    log(f"speedup {result['speedup']:.2f}x ({best} against S=0) = {result['speedup_of_cap']:.0%} of the cap "
        f"{result['cap']:.2f}x; learner / generator compute in the synchronous run: {result['train_to_generate_ratio']:.2f}")
    headers = ["", "s/step", "samples/s", "x sync", "wait batch", "train", "sync", "engine busy", "learner busy",
               "staleness mean/max"]
    table = [[k, r["period_s"], r["samples_per_s"], r["samples_per_s"] / sync["samples_per_s"], r["wait_batch_s"],
              r["train_s"], r["sync_s"], r["generator_busy_share"], r["learner_busy_share"],
              f"{r['staleness_mean']:.2f}/{r['staleness_max']}"] for k, r in results.items()]
    summary = {"pipeline/speedup": result["speedup"], "pipeline/speedup_of_cap": result["speedup_of_cap"],
               "pipeline/samples_per_s_sync": result["samples_per_s_sync"],
               "pipeline/samples_per_s_async": result["samples_per_s_async"]}
    config = {"args": vars(args), "config": cfg.model_dump(mode="json")}
    return report("pipeline", args.out, config, result, summary, headers, table, lambda p: plot(results, p), started)


if __name__ == "__main__":
    main()
