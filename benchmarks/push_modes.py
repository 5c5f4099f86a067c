"""What one push carries and costs in each way of pushing (`grpo bench weight-sync
--modes ...`): full weights (fp32 and bf16), a LoRA policy's merged layers or its
adapter alone (served by vLLM's LoRA support), and
delta pushes (sync.delta) in fp32 and bf16. Each timed push follows one real learner
step (a synthetic batch, the config's learning rate), so a delta carries what a step
really changes; the limit is the full push's raw broadcast plus the engine's own load,
measured in the same run (weight_sync.compare_with_limits)."""
from __future__ import annotations

import random
import time
from typing import Any

from benchmarks.common import log, median

MODES: dict[str, list[str]] = {
    "full": [],
    "full-bf16": ["learner.dtype=bfloat16"],
    "lora-merged": ["learner.lora.rank=16", "learner.lora.alpha=32"],
    "lora-merged-qv": ["learner.lora.rank=16", "learner.lora.alpha=32", "learner.lora.target_modules=[q_proj,v_proj]"],
    "lora-adapter": ["learner.lora.rank=16", "learner.lora.alpha=32", "learner.lora.push=adapter"],
    "delta": ["sync.delta=true"],
    "delta-bf16": ["sync.delta=true", "learner.dtype=bfloat16"],
}


def batch(vocab: int, seed: int, groups: int = 8, n: int = 8) -> list[Any]:
    """Scored groups of random ids (prompt 8-16 tokens, completion 8-32): a learner step's input."""
    from rollout.types import Group, Sample

    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 16))]
        samples = []
        for _ in range(n):
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]
            samples.append(Sample(ids, [-2.0 - rng.random() for _ in ids], "", "stop", [(0, 0)]))
        out.append(Group(prompt, "", {}, samples, rewards=[float(rng.random() < 0.5) for _ in range(n)], key=g))
    return out


def generation_seconds(gen: Any, vocab: int, prompts: int = 32, n: int = 8, tokens: int = 32) -> float:
    """Seconds the generator takes for one fixed batch after the pushes (the faster of two)."""
    import ray

    rng = random.Random(0)
    rows = [{"prompt": [rng.randrange(3, vocab) for _ in range(12)]} for _ in range(prompts)]
    seeds = [[i * n + j for j in range(n)] for i in range(prompts)]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        ray.get(gen.generate.remote(rows, seeds, {"max_tokens": tokens}), timeout=900)
        times.append(time.perf_counter() - t0)
    return min(times)


def mode_rows(size: str, path: str, params: int, modes: list[str], reps: int, overrides: list[str]) -> list[dict[str, Any]]:
    """For each mode: a learner and one generator, `reps` (step, timed push) pairs after
    a first (full) push."""
    import ray
    from transformers import AutoConfig

    from benchmarks.common import resolved
    from cluster.actors.factory import ActorFactory
    from cluster.config import load_config

    vocab = AutoConfig.from_pretrained(path).vocab_size
    rows = []
    for mode in modes:
        # fp32 unless the mode says bf16 (learner.dtype's default, auto, is bf16 on a bf16 CPU)
        cfg = resolved(load_config(None, ["rollout.num_generators=1", "learner.lr_schedule=constant",
                                          "learner.dtype=float32", *overrides, *MODES[mode]]))
        factory = ActorFactory.for_job(cfg, path)
        [gen], learners = factory.generators(), factory.learner_group()
        try:
            ray.get([gen.ready.remote(), *[r.ready.remote() for r in learners.ranks]], timeout=900)
            learners.connect([gen])
            first = learners.push(1)
            runs = []
            for rep in range(reps):
                learners.train(batch(vocab, rep))
                t0 = time.perf_counter()
                sent = learners.push(rep + 2)
                runs.append({"seconds": time.perf_counter() - t0, **sent,
                             **ray.get(gen.take_timings.remote())})
            held = ray.get(learners.ranks[0].trainable.remote())
            generate_s = generation_seconds(gen, vocab)
        finally:
            ray.kill(gen)
            learners.kill()
        seconds = median([r["seconds"] for r in runs])
        nbytes = median([r["sync/bytes"] for r in runs])
        row = {"model": size, "parameters": params, "mode": mode, "overrides": MODES[mode], "reps": reps,
               "lr": cfg.learner.lr, "first_push_bytes": first["sync/bytes"], "bytes": nbytes, "push_s": seconds,
               "generator_load_s": median([r.get("sync/load", 0.0) for r in runs]),
               "generate_s": generate_s,
               # the learner rank: gradients + optimizer state counted from the tensors, and its peak RSS
               "grad_plus_optimizer_bytes": held["gradient_bytes"] + held["optimizer_state_bytes"],
               "trainable_elements": held["trainable_elements"], "learner_peak_rss_bytes": held["peak_rss_bytes"],  # what serving this way costs the sampler (LoRA: punica kernels, no compile)
               "runs": runs}
        if "sync/changed_frac" in runs[0]:
            row["changed_frac"] = median([r["sync/changed_frac"] for r in runs])
        rows.append(row)
        log(f"{size} {mode}: {nbytes / 2**20:.2f} MiB per push in {seconds * 1e3:.0f} ms"
            + (f", {row['changed_frac']:.1%} of the elements changed" if "changed_frac" in row else ""))
    full = next((r for r in rows if r["mode"] == "full"), None)
    for r in rows:  # against the fp32 full push of the same model
        if full is not None:
            r["bytes_vs_full"] = r["bytes"] / full["bytes"]
            r["seconds_vs_full"] = r["push_s"] / full["push_s"]
            r["grad_plus_optimizer_vs_full"] = r["grad_plus_optimizer_bytes"] / full["grad_plus_optimizer_bytes"]
    return rows


def add_limits(rows: list[dict[str, Any]], limits: dict[str, float]) -> None:
    """limits: the full push's raw broadcast and engine load seconds (same run)."""
    floor = limits["raw_broadcast_s"] + limits["engine_load_s"]
    for r in rows:
        r.update({"full_raw_broadcast_s": limits["raw_broadcast_s"], "full_engine_load_s": limits["engine_load_s"],
                  "ratio_to_full_raw_plus_load": r["push_s"] / floor})


def plot(rows: list[dict[str, Any]], path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model']}\n{r['mode']}" for r in rows]
    xs = range(len(rows))
    ax.bar(xs, [r["bytes"] / 2**20 for r in rows], color="tab:blue")
    ax.set_ylabel("MiB per push (after a step)")
    ax.set_title("bytes per push")
    ax2.bar(xs, [r["push_s"] * 1e3 for r in rows], color="tab:orange", label="push")
    ax2.plot(xs, [(r["full_raw_broadcast_s"] + r["full_engine_load_s"]) * 1e3 for r in rows], "k_", ms=30,
             label="full push's raw broadcast + load")
    ax2.set_ylabel("ms per push")
    ax2.set_title("seconds per push")
    ax2.legend(fontsize=7)
    for a in (ax, ax2):
        a.set_xticks(list(xs), labels, fontsize=7, rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for r in rows:
        out[f"push_modes/{r['model']}/{r['mode']}/bytes_vs_full"] = r.get("bytes_vs_full")
        if "changed_frac" in r:
            out[f"push_modes/{r['model']}/{r['mode']}/changed_frac"] = r["changed_frac"]
    return out


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["model"], r["mode"], r["bytes"] / 2**20, r.get("bytes_vs_full", float("nan")),
             r.get("changed_frac", float("nan")), r["push_s"] * 1e3, r["generator_load_s"] * 1e3,
             r["ratio_to_full_raw_plus_load"], r["generate_s"], r["grad_plus_optimizer_bytes"] / 2**20,
             r["learner_peak_rss_bytes"] / 2**30] for r in rows]


HEADERS = ["model", "mode", "MiB/push", "bytes/full", "changed", "push ms", "load ms", "push/(full raw+load)",
           "generate s (32x8x32)", "grad+optim MiB", "learner peak RSS GiB"]
