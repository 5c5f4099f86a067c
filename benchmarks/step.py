"""Step time of the default job, broken down: waiting for the batch / train / sync /
idle as the driver sees them, against the compute inside the actors measured in the
same steps (the slowest generator's engine steps, the learner's train step). With
max_staleness 0 the driver waits for all of generation and scoring; with S > 0 the
generators work while the learner trains, and the wait shrinks. Everything else is
orchestration overhead: Ray calls and transfers, waiting on rewards, the weight sync,
the driver's own bookkeeping.

    grpo bench step [--steps 12] [--warmup 2] [key.sub=value ...]

Runs the real `grpo train` loop (cluster/commands/train.py) with run.steps=--steps on the
default job's model (the cached cold start of `grpo train`, built if missing). Then the last
step's batch (its recorded prompts and seeds) is generated again outside the job, by raw
`vllm.LLM.generate` and by HF `generate` (with scores), each in an actor on the
generator's cores and threads: the in-job engine time against both, side by side.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT, log, median, report

PHASES = ["wait_batch", "train", "sync", "idle"]


class HFEngine:
    """transformers' `generate` on the generator's cores and threads: the same prompts,
    n samples each, the same temperature and length, with the scores kept (logprobs)."""

    def __init__(self, model_path: str, cfg: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rollout.host import pin_from_env

        pin_from_env()
        self.cfg, self.torch = cfg, torch
        self.tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def generate(self, prompt_ids: list[list[int]], seeds: list[list[int]]) -> dict[str, float]:
        torch, pad = self.torch, self.tok.pad_token_id or 0
        ids = [p for p, s in zip(prompt_ids, seeds) for _ in s]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        torch.manual_seed(seeds[0][0])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=x, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                      temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_tokens,
                                      output_scores=True, return_dict_in_generate=True, pad_token_id=pad)
            self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        seconds = time.perf_counter() - t0
        eos, tokens = self.tok.eos_token_id, 0
        for row in out.sequences[:, width:].tolist():  # up to and with the first EOS
            tokens += row.index(eos) + 1 if eos in row else len(row)
        return {"seconds": seconds, "tokens": tokens, "samples": len(ids)}

    def ready(self) -> bool:
        return True


class RawTorchStep:
    """The learner's limit: a bare torch forward + backward + AdamW step of a recorded
    batch (prompt + completion ids), micro-batches of learner.micro_batch_size sequences
    padded to their longest, on the learner rank's cores and threads, in the precision the
    job's learner trained in (bf16: weights, activations and AdamW all in bf16, without
    DeepSpeed's fp32 master weights: a lower bound); no DeepSpeed, no advantages, no
    proximal pass, no metrics."""

    def __init__(self, model_path: str, micro: int, lr: float, weight_decay: float = 0.0,
                 dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from rollout.host import pin_from_env

        pin_from_env()
        self.torch, self.micro = torch, micro
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self, seqs: list[list[int]], prompt_lens: list[int]) -> dict[str, float]:
        torch = self.torch
        micros = []  # the padded tensors are built before the clock starts: only compute is timed
        for i in range(0, len(seqs), self.micro):
            part, plen = seqs[i : i + self.micro], prompt_lens[i : i + self.micro]
            width = max(map(len, part))
            x = torch.tensor([s + [0] * (width - len(s)) for s in part])
            attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in part])
            mask = torch.tensor([[float(p - 1 <= t < len(s) - 1) for t in range(width - 1)] for s, p in zip(part, plen)])
            micros.append((x, attn, mask))
        tokens = sum(len(s) for s in seqs)
        t0 = time.perf_counter()
        for x, attn, mask in micros:
            logp = torch.log_softmax(self.model(input_ids=x, attention_mask=attn).logits[:, :-1].float(), -1)
            logp = logp.gather(-1, x[:, 1:, None])[..., 0]
            (-(logp * mask).sum() / tokens).backward()
        self.opt.step()
        self.opt.zero_grad()
        return {"seconds": time.perf_counter() - t0, "tokens": tokens}

    def ready(self) -> bool:
        return True


def raw_learner_step(cfg, groups: list[dict], reps: int, dtype: str) -> dict[str, float]:
    """RawTorchStep on the recorded batch, in an actor on learner rank 0's cores and
    threads (one rank: compare with a one-rank learner) -> median seconds, tokens."""
    import ray

    from benchmarks.common import CALL_TIMEOUT_S, resolved
    from cluster.actors.placement import alive_nodes, core_sets, thread_env

    c = resolved(cfg).cluster
    cores = core_sets(c, cfg.rollout.num_generators, cfg.learner.num_ranks, alive_nodes()).get("learner 0")
    seqs = [g["prompt_ids"] + s["token_ids"] for g in groups for s in g["samples"]]
    plens = [len(g["prompt_ids"]) for g in groups for _ in g["samples"]]
    actor = ray.remote(RawTorchStep).options(
        num_cpus=c.learner_cpus, runtime_env={"env_vars": thread_env(c.learner_threads, cores)}
    ).remote(cfg.model.path, cfg.learner.micro_batch_size, cfg.learner.lr, cfg.learner.weight_decay, dtype)
    ray.get(actor.ready.remote(), timeout=CALL_TIMEOUT_S)
    runs = [ray.get(actor.step.remote(seqs, plens), timeout=CALL_TIMEOUT_S) for _ in range(reps + 1)]
    ray.kill(actor)
    out = {"raw_torch_step_s": median([r["seconds"] for r in runs[1:]]), "batch_tokens": float(runs[0]["tokens"])}
    log(f"raw torch forward+backward ({dtype}): {out['raw_torch_step_s']:.2f} s for the batch's "
        f"{out['batch_tokens']:.0f} tokens")
    return out


def same_batch(cfg, run_dir: Path, step: int, reps: int) -> dict[str, float]:
    """Step `step`'s recorded prompts and seeds, generated outside the job by raw vLLM and
    by HF generate, each in an actor with the job's generator options (cores, threads):
    -> the median seconds of each."""
    import ray

    from benchmarks.common import CALL_TIMEOUT_S, resolved
    from benchmarks.generation import RawEngine
    from cluster.actors.factory import generator_options
    from cluster.actors.placement import alive_nodes, core_sets
    from cluster.artifacts.record import load

    groups = load(run_dir, step)["groups"]
    prompts, ids = [g["prompt"] for g in groups], [g["prompt_ids"] for g in groups]
    seeds = [[s["seed"] for s in g["samples"]] for g in groups]
    c = resolved(cfg).cluster
    options = generator_options(cfg.rollout, c, 0, core_sets(c, 1, cfg.learner.num_ranks, alive_nodes()).get("generator 0"))
    out = {}
    for name, cls, args in (("raw_vllm", RawEngine, prompts), ("hf_generate", HFEngine, ids)):
        actor = ray.remote(cls).options(**options).remote(cfg.model.path, cfg.rollout)
        ray.get(actor.ready.remote(), timeout=CALL_TIMEOUT_S)
        times = [ray.get(actor.generate.remote(args, seeds), timeout=CALL_TIMEOUT_S)["seconds"] for _ in range(reps + 1)]
        out[f"{name}_s"] = median(times[1:])  # the first call warms the engine up
        ray.kill(actor)
        log(f"{name}: {out[f'{name}_s']:.2f} s for step {step}'s batch ({reps} reps)")
    dtype = json.loads((run_dir / "actors.json").read_text())["learner rank 0"]["dtype"]  # learner.dtype resolved
    out.update(raw_learner_step(cfg, groups, reps, dtype))
    return out


def breakdown(rows: list[dict[str, Any]], warmup: int, overlapped: bool = False) -> list[dict[str, float]]:
    """Per measured step: its period (start to the next step's start) split into the
    driver's phases, and the compute inside the actors. overhead_s: the part of the period
    in which the side that bounds it was not computing: the period less generation plus
    training when they take turns (S = 0), less the larger of the two when they overlap."""
    out = []
    for row, nxt in zip(rows[warmup:], rows[warmup + 1 :]):
        period = nxt["time/started"] - row["time/started"]
        phases = {p: row[f"time/{p}"] for p in PHASES[:-1]}
        phases["idle"] = period - sum(phases.values())  # the driver's own work between steps
        compute = {"generate": row["time/generate_engine"], "train": row["train/seconds"]}
        out.append({
            "step": row["step"], "period_s": period, **{f"{p}_s": v for p, v in phases.items()},
            "generate_compute_s": compute["generate"], "train_compute_s": compute["train"],
            "overhead_s": period - (max(compute.values()) if overlapped else sum(compute.values())),
            "samples": row["samples"], "tokens": row["tokens"],
        })
    return out


def figures(rows: list[dict[str, Any]], warmup: int, samples: int, overlapped: bool,
            outside: dict[str, float]) -> dict[str, Any]:
    """The job's metrics rows and the same batch measured outside it -> the figures (the
    measured steps under "steps", each column's median and mean over them). One batch is generated per step, but not within it: with S >= 1 a
    step's engine time alternates between batches that took a weight update mid-flight and
    batches that did not, so a per-step median can land on either mode. A batch's
    generation is the engine's total over the measured steps divided by them, and the
    overhead is taken over the whole measured span."""
    for row in rows:
        row["tokens"] = row["response_length"] * row["samples"]
    steps = breakdown(rows, warmup, overlapped)
    med = {k: median([s[k] for s in steps]) for k in steps[0] if k != "step"}
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0] if k != "step"}
    period = med["period_s"]
    per_batch, mean_train, mean_period = mean["generate_compute_s"], mean["train_compute_s"], mean["period_s"]
    bound = max(per_batch, mean_train) if overlapped else per_batch + mean_train
    learner_s = rows[-1]["train/seconds"]  # the last batch's train step, against a bare torch step of it
    return {
        "measured_steps": [s["step"] for s in steps], "median": med, "mean": mean, "steps": steps,
        "samples_per_s": samples / period, "tokens_per_s": med["tokens"] / period,
        "mean_period_s": mean_period, "samples_per_s_mean": samples / mean_period,
        "generate_per_batch_s": per_batch, "overhead_share": 1 - bound / mean_period,
        "generator_busy_share": median([s["generate_compute_s"] / s["period_s"] for s in steps]),
        "learner_busy_share": median([s["train_compute_s"] / s["period_s"] for s in steps]),
        **outside,
        "in_job_vs_raw_vllm": per_batch / outside["raw_vllm_s"],
        "in_job_vs_hf_generate": per_batch / outside["hf_generate_s"],
        "learner_step_s": learner_s,
        "learner_tokens_per_s": outside["batch_tokens"] / learner_s,
        "raw_torch_tokens_per_s": outside["batch_tokens"] / outside["raw_torch_step_s"],
        "learner_vs_raw_torch": learner_s / outside["raw_torch_step_s"],
    }


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
    parser.add_argument("--reps", type=int, default=3, help="raw vLLM / HF generate repetitions of the last batch")
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
    start_ray()  # the job's actors are gone: the same batch again, raw, on the generator's cores
    try:
        outside = same_batch(cfg, Path(summary["run_dir"]), args.steps, args.reps)
    finally:
        ray.shutdown()
    result = figures(rows, args.warmup, cfg.run.prompts_per_step * cfg.rollout.n, cfg.run.max_staleness > 0, outside)
    result["run_dir"] = summary["run_dir"]
    steps, mean, period = result["steps"], result["mean"], result["median"]["period_s"]
    per_batch, mean_period = result["generate_per_batch_s"], result["mean_period_s"]
    # the table: means over the measured steps (what the headline figures are), so its columns agree
    headers = ["", "step", *PHASES, "vLLM", "learner", "overhead", "raw vLLM", "HF generate"]
    row = [mean_period, *[mean[f"{p}_s"] for p in PHASES], per_batch, mean["train_compute_s"],
           mean_period * result["overhead_share"], outside["raw_vllm_s"], outside["hf_generate_s"]]
    table = [["seconds (mean)", *row], ["share of step", *[v / mean_period for v in row]]]
    log(f"a batch's generation: in the job {per_batch:.2f} s (engine steps, mean over the measured steps), raw vLLM "
        f"{outside['raw_vllm_s']:.2f} s, HF generate {outside['hf_generate_s']:.2f} s, same cores")
    log(f"the learner on that batch: {result['learner_step_s']:.2f} s ({result['learner_tokens_per_s']:.0f} tokens/s) "
        f"vs raw torch {outside['raw_torch_step_s']:.2f} s ({result['raw_torch_tokens_per_s']:.0f} tokens/s): "
        f"{result['learner_vs_raw_torch']:.2f}x")
    log(f"{len(steps)} steps measured: {period:.2f} s per step (median; mean {mean_period:.2f} s), "
        f"{result['samples_per_s']:.0f} samples/s (at the mean: {result['samples_per_s_mean']:.0f}), "
        f"overhead {result['overhead_share']:.1%}")
    summary_out = {"step/seconds": period, "step/samples_per_s": result["samples_per_s"],
                   "step/samples_per_s_mean": result["samples_per_s_mean"],
                   "step/overhead_share": result["overhead_share"],
                   "step/in_job_vs_raw_vllm": result["in_job_vs_raw_vllm"],
                   "step/in_job_vs_hf_generate": result["in_job_vs_hf_generate"],
                   "step/learner_vs_raw_torch": result["learner_vs_raw_torch"]}
    config = {"args": vars(args), "config": cfg.model_dump(mode="json")}
    return report("step", args.out, config, result, summary_out, headers, table, lambda p: plot(steps, p), started)


if __name__ == "__main__":
    main()
