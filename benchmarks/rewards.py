"""Reward throughput: verifications per second through 1 and 2 reward-worker actors
(each call in a separate, killable verifier process) against calling the verifier
inline in one process, measured side by side in the same run.

    python -m benchmarks.rewards [--verifiers math countdown] [--samples 2000] [--out bench_results]

Prints a table and writes rewards.json and rewards.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path


def cases(verifier: str, count: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Distinct completions (so no cache can help), half of them correct."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        right = i % 2 == 0
        if verifier == "countdown":
            expr = f"({a} + {b}) * 2" if right else f"{a} * {b} - 2"
            out.append((f"<think>try {i}</think><answer>{expr}</answer>", {"numbers": [a, b, 2], "target": (a + b) * 2}))
        else:
            answer = f"\\frac{{{a}}}{{{b}}}" if right else f"{a + 1}/{b}"
            out.append((f"<think>step {i}</think><answer>{answer}</answer>", {"answer": f"{a}/{b}"}))
    return out


def inline_rate(verifier: str, data: list[tuple[str, dict]]) -> float:
    from rewards.api import resolve, run_one

    fn = resolve(verifier)
    run_one(fn, *data[0], {})  # warm imports
    t0 = time.perf_counter()
    for completion, fields in data:
        run_one(fn, completion, fields, {})
    return len(data) / (time.perf_counter() - t0)


def workers_rate(verifier: str, data: list[tuple[str, dict]], num_workers: int, group_size: int = 16) -> float:
    import ray

    from rewards.config import RewardConfig
    from rewards.worker import RewardWorker
    from rollout.types import Group, Sample

    cfg = RewardConfig(num_workers=num_workers, verifiers={verifier: 1.0}, cache_size=0)
    actor = ray.remote(RewardWorker)
    workers = [actor.options(num_cpus=0).remote(cfg, i) for i in range(num_workers)]
    groups = [
        Group([1], "p", fields, [Sample([1], [0.0], completion, "stop", 0)])
        for completion, fields in data
    ]
    # Warm up: each worker's verifier process imports its verifier.
    ray.get([w.score.remote(groups[:1]) for w in workers])
    batches = [groups[i : i + group_size] for i in range(0, len(groups), group_size)]
    t0 = time.perf_counter()
    refs = [workers[i % num_workers].score.remote(batch) for i, batch in enumerate(batches)]
    ray.get(refs)
    elapsed = time.perf_counter() - t0
    for w in workers:
        ray.kill(w)
    return len(data) / elapsed


def machine() -> dict:
    import ray
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = ["inline", "1 worker", "2 workers"]
    width = 0.8 / len(results)
    for k, r in enumerate(results):
        values = [r["inline_per_s"], r["workers_per_s"]["1"], r["workers_per_s"]["2"]]
        ax.bar([i + k * width for i in range(3)], values, width, label=r["verifier"])
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(3)], labels)
    ax.set_ylabel("verifications / s")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("reward throughput (same run, same machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rewards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verifiers", nargs="+", default=["math", "countdown"])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    results = []
    try:
        for verifier in args.verifiers:
            data = cases(verifier, args.samples)
            inline = inline_rate(verifier, data)
            per_worker = {str(k): workers_rate(verifier, data, k) for k in (1, 2)}
            results.append({
                "verifier": verifier, "samples": len(data), "inline_per_s": inline, "workers_per_s": per_worker,
                "ratio_to_inline": {k: v / inline for k, v in per_worker.items()},
            })
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "rewards", "machine": machine(), "config": vars(args), "results": results,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "rewards.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "rewards.png")
    print(f"{'verifier':<12}{'inline/s':>12}{'1 worker/s':>14}{'2 workers/s':>14}{'1w/inline':>11}{'2w/inline':>11}")
    for r in results:
        w, q = r["workers_per_s"], r["ratio_to_inline"]
        print(f"{r['verifier']:<12}{r['inline_per_s']:>12.0f}{w['1']:>14.0f}{w['2']:>14.0f}{q['1']:>11.2f}{q['2']:>11.2f}")
    print(f"wrote {out / 'rewards.json'} and {out / 'rewards.png'}")
    return report


if __name__ == "__main__":
    main()
