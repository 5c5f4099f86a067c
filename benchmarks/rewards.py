"""Reward throughput: verifications per second through 1 and 2 reward-worker actors
(each call in a separate, killable verifier process, `rewards.concurrency` of them
per worker), fed the way training feeds them (one group per call, to the least-loaded
worker: cluster/flow/reward_pool.py's RewardPool), against calling the verifier inline in one
process, measured side by side in the same run.

    grpo bench rewards [--verifiers math countdown] [--samples 2000]

Isolation costs one msgpack round trip to the verifier process per call, so cheap
verifiers are IPC-bound while expensive ones (math) scale with workers.
"""
from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import CALL_TIMEOUT_S, DEFAULT_OUT, log, report, start_ray


def cases(verifier: str, count: int, n: int = 8, seed: int = 0) -> list[tuple[dict, list[str]]]:
    """count // n groups: one row each and n distinct completions of it (so no cache can
    help), half of them correct, as a training group holds them."""
    rng = random.Random(seed)
    out = []
    for g in range(count // n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        if verifier == "countdown":
            fields = {"numbers": [a, b, 2], "target": (a + b) * 2}
            texts = [f"<think>try {g}.{k}</think><answer>{f'({a} + {b}) * 2' if k % 2 == 0 else f'{a} * {b} - 2'}</answer>"
                     for k in range(n)]
        else:
            fields = {"answer": f"{a}/{b}"}
            texts = [f"<think>step {g}.{k}</think><answer>{f'{chr(92)}frac{{{a}}}{{{b}}}' if k % 2 == 0 else f'{a + 1}/{b}'}</answer>"
                     for k in range(n)]
        out.append((fields, texts))
    return out


def inline_rate(verifier: str, data: list[tuple[dict, list[str]]]) -> tuple[float, float]:
    """-> (verifications / s, mean score) calling the verifier in this process."""
    from rewards.api import resolve, run_one

    fn = resolve(verifier)
    run_one(fn, data[0][1][0], data[0][0], {})  # warm imports
    t0 = time.perf_counter()
    scores = [run_one(fn, completion, fields, {}).value for fields, texts in data for completion in texts]
    return len(scores) / (time.perf_counter() - t0), sum(scores) / len(scores)


def workers_rate(verifier: str, data: list[tuple[dict, list[str]]], num_workers: int,
                 concurrency: int) -> tuple[float, float]:
    """-> (verifications / s, mean score) through reward-worker actors."""
    import ray

    from cluster.flow.reward_pool import RewardPool
    from rewards.config import RewardConfig
    from rewards.worker import RewardWorker
    from rollout.types import Group, Sample

    cfg = RewardConfig(num_workers=num_workers, verifiers={verifier: 1.0}, cache_size=0, concurrency=concurrency)
    actor = ray.remote(RewardWorker)
    workers = [actor.options(num_cpus=0).remote(cfg, i) for i in range(num_workers)]
    groups = [Group([1], "p", fields, [Sample([1], [0.0], c, "stop", [(0, 0)]) for c in texts]) for fields, texts in data]
    # warm-up: verifier processes import their verifier
    ray.get([w.score.remote(groups[0]) for w in workers], timeout=CALL_TIMEOUT_S)
    pool = RewardPool(workers)
    t0 = time.perf_counter()
    pending, scores = [pool.submit(g) for g in groups], []
    while pending:  # consumed as they finish, as the pipeline does
        done, pending = ray.wait(pending, num_returns=1, timeout=CALL_TIMEOUT_S)
        if not done:
            raise TimeoutError(f"rewards bench: no group scored within {CALL_TIMEOUT_S:g} s")
        pool.done(done[0])
        scores += ray.get(done[0], timeout=CALL_TIMEOUT_S)[0].rewards
    elapsed = time.perf_counter() - t0
    for w in workers:
        ray.kill(w)
    return len(scores) / elapsed, sum(scores) / len(scores)


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
    parser.add_argument("--concurrency", type=int, default=2, help="verifier processes per worker (rewards.concurrency)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import ray

    started = time.perf_counter()
    start_ray()
    results = []
    try:
        for verifier in args.verifiers:
            data = cases(verifier, args.samples)
            inline, inline_score = inline_rate(verifier, data)
            measured = {str(k): workers_rate(verifier, data, k, args.concurrency) for k in (1, 2)}
            per_worker = {k: v[0] for k, v in measured.items()}
            results.append({
                "verifier": verifier, "samples": sum(len(t) for _, t in data), "concurrency": args.concurrency,
                "mean_score_inline": inline_score, "mean_score_workers": {k: v[1] for k, v in measured.items()}, "inline_per_s": inline, "workers_per_s": per_worker,
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
