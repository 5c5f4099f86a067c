"""Reward throughput: verifications per second through 1 and 2 reward-worker actors
(each call in a separate, killable verifier process) against calling the verifier
inline in one process, measured side by side in the same run.

    grpo bench rewards [--verifiers math countdown] [--samples 2000]

Isolation costs one msgpack round trip to the verifier process per call, so cheap
verifiers are IPC-bound while expensive ones (math) scale with workers.
"""
from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import DEFAULT_OUT, log, report, start_ray


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


def plot(results: list[dict], path: Path) -> None:
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
    parser = argparse.ArgumentParser(prog="grpo bench rewards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verifiers", nargs="+", default=["math", "countdown"])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import ray

    started = time.perf_counter()
    start_ray()
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
            log(f"{verifier}: inline {inline:,.0f}/s, 1 worker {per_worker['1']:,.0f}/s, 2 workers {per_worker['2']:,.0f}/s")
    finally:
        ray.shutdown()
    rows = [[r["verifier"], r["inline_per_s"], r["workers_per_s"]["1"], r["workers_per_s"]["2"],
             r["ratio_to_inline"]["1"], r["ratio_to_inline"]["2"]] for r in results]
    summary = {f"rewards/{r['verifier']}/{k}worker_ratio_to_inline": v
               for r in results for k, v in r["ratio_to_inline"].items()}
    return report("rewards", args.out, {"args": vars(args)}, results, summary,
                  ["verifier", "inline/s", "1 worker/s", "2 workers/s", "1w/inline", "2w/inline"],
                  rows, lambda path: plot(results, path), started)


if __name__ == "__main__":
    main()
