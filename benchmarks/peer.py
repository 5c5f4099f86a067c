"""Ours against a peer on the same job: TRL's GRPOTrainer (HF generate and training in one
process) and `grpo train`, one after the other on this machine.

    grpo bench peer [--steps 15] [--warmup 5] [--repeats 1] [--size default|25M] [key.sub=value ...]

The protocol is fixed and written into peer.json with TRL's full arguments, and neither side
is tuned against the other:
- the same cold-started model (the default job's, or a random 25M-parameter model), the same
  RL prompts, the same verifiers and weights (scored in-process on TRL's side);
- run.prompts_per_step prompts x rollout.n completions (32 x 8 by default), rollout.max_tokens
  (48), temperature 1, one optimizer step per step, the same lr and schedule (cosine over the
  run, no warm-up), no KL;
- ours: the default job's placement (or what the overrides say); TRL: its own defaults for
  threads (torch uses every core) and precision (GRPOConfig turns bf16 mixed precision on
  unless fp16 is: autocast on the CPU too), both written to peer.json next to ours
  (learner.dtype: auto by default, bf16 on a CPU with bf16 instructions, as TRL's; the one
  our learner resolved to is written too);
- the figure: the median step time after the first --warmup steps, for both, and its ratio;
  next to it the mean step time over the same steps (the throughput: with S >= 1 our steps
  alternate between two modes, and a median of a few can land on either), and its ratio;
- --repeats N runs the pair N times (TRL first in every other pair: this machine drifts
  by 20% and more between runs) and reports, for each figure, the median over the pairs:
  the ratios are the median of each pair's own ratio, so they need not equal the ratio of
  the medianed seconds. The step times at the top level and the plot are the last pair's;
  every pair's are under "runs".

TRL goes in the optional `bench` extra (pip install 'grpo-cluster[bench]'), never a core
dependency; TRL's side runs in a child process of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT, log, median, random_model, report


def trl_arguments(cfg, steps: int, out_dir: str) -> dict[str, Any]:
    """GRPOConfig's arguments for the job of `cfg` (everything else: TRL's defaults)."""
    batch = cfg.run.prompts_per_step * cfg.rollout.n
    return dict(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                generation_batch_size=batch, num_generations=cfg.rollout.n, num_iterations=1,
                max_completion_length=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, top_p=1.0,
                learning_rate=cfg.learner.lr, lr_scheduler_type=cfg.learner.lr_schedule, warmup_steps=0,
                beta=cfg.learner.kl_coef, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, seed=cfg.run.seed, reward_weights=None)


def trl_child(spec_path: str) -> None:
    """TRL's side, in its own process: train spec["steps"] steps, write each step's end time."""
    spec = json.loads(Path(spec_path).read_text())
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.api import resolve, run_one

    verifiers = [(name, resolve(name), weight) for name, weight in spec["verifiers"].items()]

    def reward(prompts, completions, **columns) -> list[float]:
        out = []
        for i, text in enumerate(completions):
            fields = {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            out.append(sum(w * run_one(fn, text, fields, {}).value for _, fn, w in verifiers))
        return out

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(spec["model"]), reward_funcs=reward,
                          args=GRPOConfig(**spec["trl_args"]), train_dataset=Dataset.from_list(spec["rows"]),
                          processing_class=tok, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    precision = "bf16 mixed" if trainer.args.bf16 else "fp16 mixed" if trainer.args.fp16 else "fp32"
    Path(spec["result"]).write_text(json.dumps({"start": start, "ends": ends, "threads": _threads(),
                                                "precision": precision}))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def ours(cfg, steps: int, out: Path) -> tuple[list[float], str]:
    """`grpo train` on the job; -> each step's period (start to the next step's start), and
    the precision its learner trained in (learner.dtype resolved: auto names the one it chose)."""
    import ray

    from benchmarks.common import start_ray
    from cluster.commands.train import train

    start_ray()
    cfg.run.output_dir, cfg.run.name = str(out / "_runs"), time.strftime("peer-%Y%m%d-%H%M%S")
    try:
        summary = train(cfg, log=log, verbose=False)
    finally:
        ray.shutdown()
    run_dir = Path(summary["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r["time/started"] for r in rows]
    dtype = json.loads((run_dir / "actors.json").read_text())["learner rank 0"]["dtype"]
    return [b - a for a, b in zip(starts, starts[1:])], dtype


def peer(cfg, steps: int, out: Path) -> tuple[list[float], dict[str, Any]]:
    """TRL's side in a child process; -> each step's time, TRL's arguments and threads."""
    from cluster.data import rl_rows

    with tempfile.TemporaryDirectory() as tmp:
        args = trl_arguments(cfg, steps, str(Path(tmp) / "trl"))
        spec = {"model": cfg.model.path, "rows": rl_rows(cfg.data), "trl_args": args, "steps": steps,
                "verifiers": {k: (v if isinstance(v, float) else v.weight) for k, v in cfg.rewards.verifiers.items()},
                "result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}  # TRL's own thread defaults
        subprocess.run([sys.executable, "-m", "benchmarks.peer", "--trl-child", str(Path(tmp) / "spec.json")],
                       check=True, env=env)
        result = json.loads(Path(spec["result"]).read_text())
    marks = [result["start"], *result["ends"]]
    return [b - a for a, b in zip(marks, marks[1:])], {"trl_args": args, "trl_threads": result["threads"],
                                                       "trl_precision": result["precision"]}


def figures(mine: list[float], theirs: list[float], warmup: int, batch: int) -> dict[str, float]:
    """One pair of runs (each step's period, ours and TRL's) -> medians, means, ratios."""
    ours_m, trl_m = median(mine[warmup:]), median(theirs[warmup:])
    ours_mean, trl_mean = (sum(t[warmup:]) / len(t[warmup:]) for t in (mine, theirs))
    return {"ours_median_s": ours_m, "trl_median_s": trl_m, "ours_mean_s": ours_mean, "trl_mean_s": trl_mean,
            "ours_samples_per_s": batch / ours_m, "trl_samples_per_s": batch / trl_m,
            "ours_samples_per_s_mean": batch / ours_mean, "trl_samples_per_s_mean": batch / trl_mean,
            "speedup_vs_trl": trl_m / ours_m, "speedup_vs_trl_mean": trl_mean / ours_mean}


def combine(pairs: list[dict[str, float]]) -> dict[str, float]:
    """Several pairs -> the median of each figure over them (ratios: of each pair's own ratio)."""
    return {k: median([p[k] for p in pairs]) for k in pairs[0]}


def plot(times: dict[str, list[float]], warmup: int, path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, ts in times.items():
        ax.plot(range(1, len(ts) + 1), ts, marker="o", ms=3, label=f"{label} (median {median(ts[warmup:]):.2f} s)")
    ax.axvline(warmup + 0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds per step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("the same GRPO job: grpo-cluster vs TRL GRPOTrainer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--trl-child"]:
        trl_child(argv[1])
        return {}
    parser = argparse.ArgumentParser(prog="grpo bench peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating; medians over them")
    parser.add_argument("--size", choices=["default", "25M"], default="default",
                        help="the default job's cold-started model, or a random 25M-parameter model")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--config", help="YAML config of our side's job (as grpo train --config), e.g. "
                        "examples/cpu/compute-bound.yaml; TRL's side takes its job settings from it too")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides of our side's job")
    args = parser.parse_args(argv)
    if args.steps < args.warmup + 3:
        parser.error("--steps must be at least --warmup + 3")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        import trl  # noqa: F401
    except ImportError:
        parser.error("TRL is not installed: pip install 'grpo-cluster[bench]'")
    from cluster.commands.cold_start import prepare_model
    from cluster.config import load_config

    started = time.perf_counter()
    out = Path(args.out)
    cfg = load_config(args.config, [f"run.steps={args.steps}", "eval.every=0", "run.progress=false", *args.overrides])
    cfg.model.path = prepare_model(cfg, log) if args.size == "default" else random_model("25M", out)[0]
    batch = cfg.run.prompts_per_step * cfg.rollout.n
    pairs, runs = [], []

    def trl_side(tag: str) -> tuple[list[float], dict]:
        log(f"TRL: {args.steps} steps of GRPOTrainer{tag}")
        return peer(cfg, args.steps, out)

    for r in range(args.repeats):
        tag = f" (pair {r + 1} of {args.repeats})" if args.repeats > 1 else ""
        if r % 2:  # every other pair TRL goes first: drift within a pair favours neither side
            theirs, trl_info = trl_side(tag)
        log(f"ours: {args.steps} steps of `grpo train` ({cfg.cluster.placement}, S={cfg.run.max_staleness}){tag}")
        mine, precision = ours(cfg.model_copy(deep=True), args.steps, out)
        if not r % 2:
            theirs, trl_info = trl_side(tag)
        pairs.append(figures(mine, theirs, args.warmup, batch))
        runs.append({"ours_step_s": mine, "trl_step_s": theirs})
        if args.repeats > 1:
            log(f"pair {r + 1}: {pairs[-1]['speedup_vs_trl']:.2f}x TRL (medians), "
                f"{pairs[-1]['speedup_vs_trl_mean']:.2f}x (means)")
    fig = combine(pairs)
    result = {"size": args.size, "samples_per_step": batch, **runs[-1], "runs": runs, "pairs": pairs, **fig,
              **trl_info, "ours_precision": precision}
    log(f"ours {fig['ours_median_s']:.2f} s/step median, {fig['ours_mean_s']:.2f} mean (learner {precision}); "
        f"TRL {fig['trl_median_s']:.2f} / {fig['trl_mean_s']:.2f} ({trl_info['trl_precision']}, its default): "
        f"{fig['speedup_vs_trl']:.2f}x TRL's samples/s by medians, {fig['speedup_vs_trl_mean']:.2f}x by means"
        + (f" (medians over {args.repeats} pairs)" if args.repeats > 1 else ""))
    headers = ["", "s/step (median)", "s/step (mean)", "samples/s (mean)", "vs TRL (medians)", "vs TRL (means)"]
    rows = [["grpo-cluster", fig["ours_median_s"], fig["ours_mean_s"], fig["ours_samples_per_s_mean"],
             fig["speedup_vs_trl"], fig["speedup_vs_trl_mean"]],
            ["TRL GRPOTrainer", fig["trl_median_s"], fig["trl_mean_s"], fig["trl_samples_per_s_mean"], 1.0, 1.0]]
    config = {"args": vars(args), "config": cfg.model_dump(mode="json")}
    name = "peer" if args.size == "default" else f"peer_{args.size}"
    summary = {"peer/speedup_vs_trl": fig["speedup_vs_trl"], "peer/speedup_vs_trl_mean": fig["speedup_vs_trl_mean"]}
    return report(name, out, config, result, summary, headers, rows,
                  lambda p: plot({"grpo-cluster": mine, "TRL": theirs}, args.warmup, p), started)


if __name__ == "__main__":
    main()
