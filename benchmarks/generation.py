"""Generation throughput: the rollout actor (a Generator: vLLM inside a Ray actor,
returning Groups with token ids, logprobs and versions) against raw
`vllm.LLM.generate` on the same model, prompts and sampling, in an identical actor
(same Ray resources, threads and engine arguments), measured side by side.

    grpo bench generation [--models 0.5M 50M] [--prompts 16] [--reps 3] [key.sub=value ...]

The raw figure is the time inside `LLM.generate` alone: the library's limit. The
rollout actor's is what the driver sees: the call through Ray, the conversion into
Groups and the transfer of the result. Both sample the same tokens (per-prompt seeds),
which the benchmark checks.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.common import CALL_TIMEOUT_S, DEFAULT_OUT, MODEL_SIZES, log, median, random_model, report, resolved, start_ray


class RawEngine:
    """vllm.LLM built from the generator's own engine arguments, called directly."""

    def __init__(self, model_path: str, cfg: Any) -> None:
        from rollout.engine import start_engine

        self.cfg = cfg
        self.llm = start_engine(model_path, cfg)

    def generate(self, prompts: list[str], seeds: list[list[int]]) -> dict[str, float]:
        """The same requests the rollout actor makes: one per sample, with its seed."""
        from rollout.engine import sample_params

        texts = [p for p, s in zip(prompts, seeds) for _ in s]
        params = [sample_params(self.cfg, seed) for s in seeds for seed in s]
        t0 = time.perf_counter()
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        completions = [c for out in outputs for c in out.outputs]
        return {"seconds": seconds, "tokens": sum(len(c.token_ids) for c in completions), "samples": len(completions)}

    def ready(self) -> bool:
        return True


def measure(model: str, model_path: str, params: int, cfg: Any, prompts: list[dict], reps: int,
            min_seconds: float) -> dict[str, Any]:
    import ray

    from cluster.actors.factory import ActorFactory, generator_options
    from rollout.seeds import sample_seeds
    from rollout.types import num_completion_tokens

    t0 = time.perf_counter()
    factory = ActorFactory.for_job(cfg, model_path)
    actor = factory.generator(0)
    raw = ray.remote(RawEngine).options(**generator_options(cfg.rollout, cfg.cluster, 0,
                                                           factory.cores().get("generator 0"))).remote(model_path,
                                                                                                       cfg.rollout)
    ray.get([actor.ready.remote(), raw.ready.remote()], timeout=CALL_TIMEOUT_S)
    log(f"{model}: rollout actor and raw engine ready in {time.perf_counter() - t0:.0f} s")
    texts = [r["prompt"] for r in prompts]

    def seeds(base: int) -> list[list[int]]:
        return [sample_seeds(base, "bench", i, cfg.rollout.n) for i in range(len(prompts))]

    def run_actor(seed: int) -> dict[str, float]:
        t = time.perf_counter()
        groups = ray.get(actor.generate.remote(prompts, seeds(seed)), timeout=CALL_TIMEOUT_S)
        seconds = time.perf_counter() - t
        inside = ray.get(actor.take_timings.remote(), timeout=CALL_TIMEOUT_S)  # outside the timed call
        return {"seconds": seconds, "tokens": num_completion_tokens(groups),
                "samples": sum(len(g.samples) for g in groups),
                "engine_seconds": inside["generate/engine"], "convert_seconds": inside["generate/convert"]}

    def run_raw(seed: int) -> dict[str, float]:
        t = time.perf_counter()
        out = ray.get(raw.generate.remote(texts, seeds(seed)), timeout=CALL_TIMEOUT_S)
        out["wall_seconds"] = time.perf_counter() - t
        return out

    run_actor(999), run_raw(999)  # warm-up: the first generate after start-up is slow
    actor_runs, raw_runs = [], []
    rep = 0
    # Interleaved, alternating who goes first, so drift hits both alike; at least
    # `reps` pairs and at least `min_seconds` of each (short calls are noisy).
    while rep < reps or (sum(r["seconds"] for r in raw_runs) < min_seconds and rep < 30):
        pair = [(actor_runs, run_actor), (raw_runs, run_raw)]
        for runs, fn in pair if rep % 2 == 0 else pair[::-1]:
            runs.append(fn(1000 + rep))
        rep += 1
    ray.kill(actor)
    ray.kill(raw)
    same_tokens = all(a["tokens"] == r["tokens"] for a, r in zip(actor_runs, raw_runs))
    if not same_tokens:
        log(f"{model}: WARNING the actor and the raw engine sampled different token counts")
    tokens = median([r["tokens"] for r in raw_runs])
    actor_s, raw_s = median([r["seconds"] for r in actor_runs]), median([r["seconds"] for r in raw_runs])
    samples = actor_runs[0]["samples"]
    result = {
        "model": model, "parameters": params, "prompts": len(prompts), "samples": samples,
        "tokens_per_call": tokens, "same_tokens": same_tokens,
        "raw_tokens_per_s": tokens / raw_s, "actor_tokens_per_s": tokens / actor_s,
        "raw_samples_per_s": samples / raw_s, "actor_samples_per_s": samples / actor_s,
        "ratio_actor_to_raw": raw_s / actor_s,
        # Where the actor's time goes, medians over reps: inside vLLM, building Groups,
        # and the rest (the Ray call and moving the result to the driver).
        "actor_engine_s": median([r["engine_seconds"] for r in actor_runs]),
        "actor_convert_s": median([r["convert_seconds"] for r in actor_runs]),
        "actor_transfer_s": median([r["seconds"] - r["engine_seconds"] - r["convert_seconds"] for r in actor_runs]),
        # The actor's own cost (outside vLLM) as a share of its call; the rest of any gap
        # to raw is the two identical engines' run-to-run noise (raw / actor's engine).
        "actor_outside_vllm_share": median([1 - r["engine_seconds"] / r["seconds"] for r in actor_runs]),
        "ratio_engine_to_raw": raw_s / median([r["engine_seconds"] for r in actor_runs]),
        "actor_s": actor_s, "raw_s": raw_s, "reps": len(actor_runs),
        "raw_wall_s": median([r["wall_seconds"] for r in raw_runs]),
        "runs": {"actor": actor_runs, "raw": raw_runs},
    }
    log(f"{model}: raw {result['raw_tokens_per_s']:,.0f} tok/s, actor {result['actor_tokens_per_s']:,.0f} tok/s "
        f"({result['ratio_actor_to_raw']:.3f}x)")
    return result


def plot(results: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(results))
    raw = [r["raw_tokens_per_s"] for r in results]
    act = [r["actor_tokens_per_s"] for r in results]
    ax.bar([x - 0.2 for x in xs], raw, 0.4, label="raw vllm.LLM.generate")
    ax.bar([x + 0.2 for x in xs], act, 0.4, label="rollout actor (through Ray)")
    for x, r in zip(xs, results):
        ax.annotate(f"{r['ratio_actor_to_raw']:.2f}x", (x + 0.2, r["actor_tokens_per_s"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), [f"{r['model']} ({r['parameters']:,} params)" for r in results])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"generation: {results[0]['prompts']} prompts x n={results[0]['samples'] // results[0]['prompts']}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="grpo bench generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["0.5M", "50M"], choices=list(MODEL_SIZES))
    parser.add_argument("--prompts", type=int, default=16, help="prompts per call (default: one generator's share of a default step)")
    parser.add_argument("--reps", type=int, default=3, help="at least this many calls of each")
    parser.add_argument("--min-seconds", type=float, default=4.0, help="and at least this long in each (max 30 calls)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (rollout.*, cluster.*)")
    args = parser.parse_args(argv)
    from cluster.config import load_config
    from cluster.data import rl_rows

    started = time.perf_counter()
    cfg = load_config(None, ["rollout.num_generators=1", *args.overrides])
    prompts = rl_rows(cfg.data)[: args.prompts]
    start_ray()
    cfg = resolved(cfg)
    results = []
    try:
        for model in args.models:
            path, params = random_model(model, args.out)
            results.append(measure(model, path, params, cfg, prompts, args.reps, args.min_seconds))
    finally:
        import ray

        ray.shutdown()
    rows = [[r["model"], r["parameters"], r["raw_tokens_per_s"], r["actor_tokens_per_s"],
             r["ratio_actor_to_raw"], r["actor_samples_per_s"], r["actor_convert_s"] * 1e3, r["actor_transfer_s"] * 1e3,
             r["actor_outside_vllm_share"], r["reps"]]
            for r in results]
    summary = {f"generation/{r['model']}/ratio_actor_to_raw": r["ratio_actor_to_raw"] for r in results}
    summary.update({f"generation/{r['model']}/actor_tokens_per_s": r["actor_tokens_per_s"] for r in results})
    config = {"args": vars(args), "rollout": cfg.rollout.model_dump(),
              "cluster": cfg.cluster.model_dump()}
    return report("generation", args.out, config, results, summary,
                  ["model", "params", "raw tok/s", "actor tok/s", "actor/raw", "actor samples/s", "convert ms", "ray ms",
                   "outside vLLM", "calls"],
                  rows, lambda p: plot(results, p), started)


if __name__ == "__main__":
    main()
