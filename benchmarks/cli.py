"""`grpo bench NAME [options]` (or `python -m benchmarks NAME`): one benchmark, or
`all` of them in turn, each in its own process, then one summary of every headline
figure against its target (summary.json, summary.md, summary.png)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = {
    "generation": ("benchmarks.generation", "rollout actor vs raw vllm.LLM.generate, two model sizes"),
    "weight-sync": ("benchmarks.weight_sync", "learner -> generators vs raw broadcast, engine load, memcpy"),
    "rewards": ("benchmarks.rewards", "reward workers (isolated verifier processes) vs inline"),
    "step": ("benchmarks.step", "the default job's step: wait for the batch / train / sync / idle, overhead share"),
    "pipeline": ("benchmarks.pipeline", "synchronous (S=0) against asynchronous (S=1, 2) training, pinned cores"),
    "peer": ("benchmarks.peer", "the same job under TRL's GRPOTrainer, then ours (needs the bench extra)"),
}
RESULT_FILE = {"generation": "generation", "weight-sync": "weight_sync", "rewards": "rewards", "step": "step",
               "pipeline": "pipeline", "peer": "peer"}

USAGE = "usage: grpo bench {" + ",".join([*BENCHMARKS, "all", "summary"]) + "} [options]\n\n" + "\n".join(
    f"  {name:<12} {text}" for name, (_, text) in BENCHMARKS.items()
) + """
  all          every benchmark in turn (about 12 minutes on 2 cores), then the summary
  summary      summary.md / .json / .png of the reports in --out (after re-running one)

Each writes <out>/<name>.json (machine, versions, config, raw figures, ratios) and
<name>.png, and prints a table; `grpo bench NAME --help` lists its options.
`all` and `summary` take --out DIR (default bench_results) and nothing else."""


def targets(results: dict[str, dict]) -> list[list[str]]:
    """Headline rows: figure, value, target, met."""
    rows = []
    gen = results.get("generation")
    if gen:
        for r in gen["results"]:
            v = r["ratio_actor_to_raw"]
            rows.append([f"rollout actor / raw vLLM tokens/s, {r['model']} model", f"{v:.3f}", ">= 0.95", _yes(v >= 0.95)])
    ws = results.get("weight_sync")
    if ws:
        for r in ws["results"]:
            v = r["ratio_sync_to_raw"]
            rows.append([f"weight sync / raw broadcast, {r['model']} ({r['bytes'] / 2**20:.0f} MiB) to {r['generators']} "
                         f"generator(s) [/ (raw + vLLM load): {r['ratio_sync_to_raw_plus_load']:.2f}]",
                         f"{v:.2f}", "<= 1.5", _yes(v <= 1.5)])
    step = results.get("step")
    if step:
        v = step["results"]["overhead_share"]
        r = step["results"]
        period = r.get("mean_period_s", r["median"]["period_s"])  # since 2026-12-04: over the whole measured span
        rate = r.get("samples_per_s_mean", r["samples_per_s"])
        rows.append([f"orchestration overhead share of a step ({period:.2f} s, {rate:.0f} samples/s)", f"{v:.1%}",
                     "<= 10%", _yes(v <= 0.10)])
        if "in_job_vs_raw_vllm" in r:
            v = r["in_job_vs_raw_vllm"]
            rows.append([f"in-job generation / raw vLLM, the same batch and cores ({r.get('generate_per_batch_s', r['median']['generate_compute_s']):.2f} "
                         f"vs {r['raw_vllm_s']:.2f} s; HF generate {r['hf_generate_s']:.2f} s)", f"{v:.2f}", "<= 1.15",
                         _yes(v <= 1.15)])
    peer = results.get("peer")
    if peer:
        v = peer["results"]["speedup_vs_trl"]
        r = peer["results"]
        means = (f"; by mean step times {r['ours_mean_s']:.2f} vs {r['trl_mean_s']:.2f} s: {r['speedup_vs_trl_mean']:.2f}x"
                 if "speedup_vs_trl_mean" in r else "")
        rows.append([f"samples/s vs TRL GRPOTrainer, the same job ({r['ours_median_s']:.2f} vs "
                     f"{r['trl_median_s']:.2f} s/step, medians{means})", f"{v:.2f}", ">= 1.0", _yes(v >= 1.0)])
    pipe = results.get("pipeline")
    if pipe:
        r = pipe["results"]
        v, of_cap = r["speedup"], r.get("speedup_of_cap")
        cap = f"; {of_cap:.0%} of its cap {r['cap']:.2f}x" if of_cap is not None else ""
        rows.append([f"async / sync samples/s, pinned cores ({r['best']}: "
                     f"{r['samples_per_s_async']:.0f} vs {r['samples_per_s_sync']:.0f}{cap})",
                     f"{v:.2f}", ">= 1.6 or >= 85% of cap", _yes(v >= 1.6 or (of_cap or 0) >= 0.85)])
    rew = results.get("rewards")
    if rew:
        for r in rew["results"]:
            rows.append([f"reward verifications/s, {r['verifier']}: 2 workers / inline ({r['workers_per_s']['2']:,.0f}/s)",
                         f"{r['ratio_to_inline']['2']:.2f}", "(none)", ""])
    return rows


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def markdown(rows: list[list[str]], machine: dict, versions: dict) -> str:
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, GPU: {machine['gpu'] or 'none'}; "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v), "",
             "| figure | value | target | met |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def montage(out: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [out / f"{n}.png" for n in names if (out / f"{n}.png").is_file()]
    if not images:
        return
    fig, axes = plt.subplots(len(images), 1, figsize=(11, 4.2 * len(images)))
    for ax, path in zip(axes if len(images) > 1 else [axes], images):
        ax.imshow(plt.imread(str(path)))
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=90)
    plt.close(fig)


def run_all(out: Path) -> int:
    t0 = time.perf_counter()
    failed = []
    for name, (module, _) in BENCHMARKS.items():
        if name == "peer" and importlib.util.find_spec("trl") is None:
            print("\n=== grpo bench peer: skipped (TRL not installed: pip install 'grpo-cluster[bench]')", flush=True)
            continue
        print(f"\n=== grpo bench {name} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        if subprocess.run([sys.executable, "-m", module, "--out", str(out)]).returncode:
            failed.append(name)
    status = summarize(out, skip=failed, seconds=time.perf_counter() - t0)
    if failed:
        print(f"grpo bench all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return status


def summarize(out: Path, skip: list[str] = (), seconds: float | None = None) -> int:
    """summary.md / .json / .png from the reports in `out` (`grpo bench summary`
    rebuilds it after re-running one benchmark)."""
    results = {}
    for name, stem in RESULT_FILE.items():
        path = out / f"{stem}.json"
        if name not in skip and path.is_file():
            results[stem] = json.loads(path.read_text())
    if not results:
        print(f"grpo bench: no benchmark report in {out}", file=sys.stderr)
        return 1
    rows = targets(results)
    first = next(iter(results.values()))
    md = markdown(rows, first["machine"], first["versions"])
    if seconds is None:
        seconds = sum(r["seconds"] for r in results.values())
    (out / "summary.md").write_text(md + f"\nbenchmarks: {seconds:.0f} s\n")
    (out / "summary.json").write_text(json.dumps(
        {"seconds": seconds, "machine": first["machine"], "versions": first["versions"],
         "figures": [dict(zip(["figure", "value", "target", "met"], r)) for r in rows],
         "summaries": {k: v["summary"] for k, v in results.items()}}, indent=2))
    montage(out, list(results))
    print(f"\n{md}\nbenchmarks: {seconds:.0f} s; wrote {out / 'summary.md'}, summary.json, summary.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in ("all", "summary"):
        import argparse

        parser = argparse.ArgumentParser(prog=f"grpo bench {name}")
        parser.add_argument("--out", default="bench_results")
        out = Path(parser.parse_args(rest).out)
        return run_all(out) if name == "all" else summarize(out)
    if name not in BENCHMARKS:
        print(f"grpo bench: unknown benchmark {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from cluster.config import ConfigError

    try:
        importlib.import_module(BENCHMARKS[name][0]).main(rest)
    except ConfigError as e:  # raised before any actor starts
        print(f"grpo bench {name}: {e}", file=sys.stderr)
        return 2
    return 0
