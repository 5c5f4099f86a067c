"""Weight-sync time: the learner streaming its weights into 1 and 2 generators (the
whole sync as the driver runs it, the engines' reload included) against a raw
broadcast of the same buckets over the same backend between plain actors with the
same resources, and against one memcpy of the same bytes.

    grpo bench weight-sync [--sizes 1M 10M 50M 150M] [--generators 1 2] [--reps 3] [key.sub=value ...]
    grpo bench weight-sync --sizes 25M --generators 1 --modes full full-bf16 lora-merged delta delta-bf16

--modes adds bytes and seconds per push after a real learner step, for each way of
pushing (benchmarks/push_modes.py), to push_modes.json. It takes every word after it:
put config overrides before it.

Overrides reach the real config, e.g. `sync.bucket_mb=16` or `learner.zero_stage=3
learner.num_ranks=2 run.prompts_per_step=2` (ZeRO-3 streaming).
"""
from __future__ import annotations

import argparse
import itertools
import time
from typing import Any, Iterator

from benchmarks import push_modes
from benchmarks.common import CALL_TIMEOUT_S, DEFAULT_OUT, MODEL_SIZES, log, median, random_model, report, resolved, start_ray


class RawPeer:
    """One end of a plain broadcast: preallocated buckets, no packing, no loading."""

    def __init__(self, backend: str) -> None:
        import torch

        self.backend = backend
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")
        self.group = None
        self.buffers: list[Any] = []

    def free_port(self) -> int:
        from rollout.weight_sync import rendezvous_port

        return rendezvous_port()

    def address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def open(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        from rollout.weight_sync import open_group

        self.close()
        self.group = open_group(host, port, rank, world, self.backend, timeout_s)

    def allocate(self, sizes: list[int]) -> None:
        import torch

        self.buffers = [torch.ones(n, dtype=torch.uint8, device=self.device) for n in sizes]

    def run(self) -> float:
        from rollout.weight_sync import broadcast

        t0 = time.perf_counter()
        for buf in self.buffers:
            broadcast(self.group, buf)
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def memcpy(self, reps: int) -> float:
        """Median seconds of one copy of all the buckets' bytes into another buffer."""
        import torch

        src = torch.cat(self.buffers)
        dst = torch.empty_like(src)
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            dst.copy_(src)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return median(times[1:])

    def close(self) -> None:
        if self.group is not None:
            from rollout.weight_sync import close_group

            close_group(self.group)
            self.group = None


class EngineLoad:
    """A vLLM engine like a generator's, loading the learner's buckets from its own
    memory through the same reload path (no transfer): the loader's own limit."""

    def __init__(self, model_path: str, cfg: Any) -> None:
        from rollout.engine import start_engine

        self.model_path = model_path
        self.llm = start_engine(model_path, cfg)

    def ready(self) -> bool:
        return True

    def load(self, bucket_mb: float, reps: int) -> list[float]:
        """Seconds of start + load of every bucket + finish, per rep (after a warm-up)."""
        import torch
        from transformers import AutoModelForCausalLM

        from learner.broadcast import parameter_metas
        from rollout.buckets import pack, plan_buckets, unpack

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        metas = parameter_metas(model)
        params = [p.detach() for _, p in model.named_parameters()]
        buckets = plan_buckets(metas, int(bucket_mb * 2**20))
        flats = [pack([params[i] for i in b]).clone() for b in buckets]

        def run(worker) -> list[float]:
            engine = worker.weight_transfer_engine  # ours: the same reload the syncs use
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                engine.start_weight_update()
                engine.begin_reload()
                for bucket, flat in zip(buckets, flats):
                    engine.model.load_weights(unpack(flat, [metas[i] for i in bucket]))
                engine.finish_weight_update()
                times.append(time.perf_counter() - t0)
            return times[1:]

        return self.llm.collective_rpc(run)[0]


def bucket_sizes(model_path: str, bucket_mb: float) -> list[int]:
    """The learner's buckets for this model (same metadata, same plan), from a
    meta-device copy: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from learner.broadcast import parameter_metas
    from rollout.buckets import plan_buckets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)
    metas = parameter_metas(model)
    return [sum(metas[i].nbytes for i in b) for b in plan_buckets(metas, int(bucket_mb * 2**20))]


def make_peers(cfg: Any, receivers: int) -> list[Any]:
    """A sender with the learner's Ray resources and receivers with the generators'."""
    import ray

    from cluster.actors.factory import generator_options
    from cluster.actors.placement import alive_nodes, core_sets, thread_env

    cores = core_sets(cfg.cluster, cfg.rollout.num_generators, cfg.learner.num_ranks, alive_nodes())
    learner_like = {"num_cpus": cfg.cluster.learner_cpus, "num_gpus": cfg.cluster.learner_gpus,
                    "runtime_env": {"env_vars": thread_env(cfg.cluster.learner_threads)}}
    peer = ray.remote(RawPeer)
    return [peer.options(**learner_like).remote(cfg.sync.backend)] + [
        peer.options(**generator_options(cfg.rollout, cfg.cluster, 0, cores.get("generator 0"))).remote(cfg.sync.backend)
        for _ in range(receivers)
    ]


def raw_broadcast(peers: list[Any], sizes: list[int], receivers: int, cfg: Any, reps: int) -> list[float]:
    import ray

    group = peers[: receivers + 1]
    port = ray.get(group[0].free_port.remote(), timeout=CALL_TIMEOUT_S)
    host = cfg.sync.master_address or ray.get(group[0].address.remote(), timeout=CALL_TIMEOUT_S)
    ray.get([p.open.remote(host, port, rank, len(group), cfg.sync.timeout_s)
             for rank, p in enumerate(group)])
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        ray.get([p.run.remote() for p in group], timeout=CALL_TIMEOUT_S)
        times.append(time.perf_counter() - t0)
    return times[1:]


def measure_size(size: str, args: argparse.Namespace, cfg: Any) -> list[dict[str, Any]]:
    """The real sync for each generator count, then (with those actors gone, their
    resources free) the raw broadcasts and memcpy."""
    path, params = random_model(size, args.out)
    sizes = bucket_sizes(path, cfg.sync.bucket_mb)
    nbytes = sum(sizes)
    # Small syncs are short and noisy: more reps for them (about 200 MiB moved per figure).
    reps = max(args.reps, min(15, round(200 * 2**20 / nbytes)))
    out = real_syncs(size, path, params, sizes, reps, args.generators, cfg)
    compare_with_limits(out, size, path, sizes, reps, max(args.generators), cfg)
    return out


def real_syncs(size: str, path: str, params: int, sizes: list[int], reps: int, counts: list[int],
               cfg: Any) -> list[dict[str, Any]]:
    """The learner's whole sync into the first k generators, for each k in counts
    (the actors are gone afterwards)."""
    import ray

    from cluster.actors.factory import ActorFactory

    nbytes = sum(sizes)
    t0 = time.perf_counter()
    factory = ActorFactory.for_job(cfg, path)
    gens, learners = factory.generators(), factory.learner_group()
    ray.get([a.ready.remote() for a in gens + learners.ranks], timeout=900)
    log(f"{size}: {params:,} parameters, {nbytes / 2**20:.0f} MiB in {len(sizes)} bucket(s); "
        f"learner and {len(gens)} generators ready in {time.perf_counter() - t0:.0f} s")
    out = []
    versions = itertools.count(1)
    for k in counts:
        learners.connect(gens[:k])
        runs = sync_runs(learners, gens[:k], reps, versions)
        if any(r["bytes"] != nbytes for r in runs):
            raise RuntimeError(f"{size}: the learner sent {runs[0]['bytes']} bytes, the plan says {nbytes}")
        ours_s = median([r["seconds"] for r in runs])
        out.append({
            "model": size, "parameters": params, "bytes": nbytes, "buckets": len(sizes), "generators": k, "reps": reps,
            "sync_s": ours_s, "sync_gb_per_s": nbytes / ours_s / 1e9,
            # Inside the slowest generator: set-up, the transfer (on CPU the engine may keep
            # sampling), then the pause that loads it.
            "generator_start_s": median([r["sync/start"] for r in runs]),
            "generator_receive_s": median([r["sync/receive"] for r in runs]),
            "generator_wait_s": median([r["sync/wait"] for r in runs]),  # of receive: on the wire
            "generator_load_s": median([r["sync/load"] for r in runs]),  # of receive: vLLM's loader
            "generator_finish_s": median([r["sync/finish"] for r in runs]),
            "generator_pause_s": median([r["sync/pause"] for r in runs]),  # sampling stopped: the load
            "runs": runs,
        })
    for a in gens:
        ray.kill(a)
    learners.kill()
    return out


def sync_runs(learners: Any, gens: list[Any], reps: int, versions: Iterator[int]) -> list[dict[str, float]]:
    """reps timed pushes (after a warm-up), each with the slowest generator's phases."""
    import ray

    runs = []
    for rep in range(reps + 1):  # the first is a warm-up
        t = time.perf_counter()
        sent = learners.push(next(versions))
        seconds = time.perf_counter() - t
        inside = ray.get([g.take_timings.remote() for g in gens], timeout=CALL_TIMEOUT_S)
        if rep:
            runs.append({"seconds": seconds, "learner_seconds": sent["sync/seconds"], "bytes": sent["sync/bytes"],
                         **{key: max(t.get(key, 0.0) for t in inside)
                            for key in ("sync/start", "sync/receive", "sync/wait", "sync/load", "sync/finish",
                                        "sync/pause")}})
    return runs


def compare_with_limits(out: list[dict[str, Any]], size: str, path: str, sizes: list[int], reps: int,
                        receivers: int, cfg: Any) -> None:
    """Add to each result the engine's own load of the same buckets (alone on the
    machine), the raw broadcast to as many receivers, and one memcpy."""
    import ray

    from cluster.actors.factory import ActorFactory, generator_options

    nbytes = sum(sizes)
    cores = ActorFactory.for_job(cfg, path).cores().get("generator 0")
    loader = ray.remote(EngineLoad).options(**generator_options(cfg.rollout, cfg.cluster, 0, cores)).remote(
        path, cfg.rollout)
    load_s = median(ray.get(loader.load.remote(cfg.sync.bucket_mb, reps), timeout=900))
    ray.kill(loader)
    peers = make_peers(cfg, receivers)
    ray.get([p.allocate.remote(sizes) for p in peers], timeout=900)
    memcpy_s = ray.get(peers[0].memcpy.remote(reps), timeout=CALL_TIMEOUT_S)
    for result in out:
        raw = raw_broadcast(peers, sizes, result["generators"], cfg, reps)
        raw_s, ours_s = median(raw), result["sync_s"]
        result.update({
            "raw_broadcast_s": raw_s, "memcpy_s": memcpy_s, "engine_load_s": load_s,
            "raw_gb_per_s": nbytes / raw_s / 1e9, "memcpy_gb_per_s": nbytes / memcpy_s / 1e9,
            "engine_load_gb_per_s": nbytes / load_s / 1e9,
            "ratio_sync_to_raw": ours_s / raw_s, "ratio_raw_to_memcpy": raw_s / memcpy_s,
            # Floors of a sync that must also load: transfer then load, or both fully overlapped.
            "ratio_sync_to_raw_plus_load": ours_s / (raw_s + load_s),
            "ratio_sync_to_overlap_floor": ours_s / max(raw_s, load_s),
            "raw_runs": raw,
        })
        log(f"{size} -> {result['generators']} generator(s): sync {ours_s * 1e3:.0f} ms "
            f"({result['sync_gb_per_s']:.2f} GB/s), raw broadcast {raw_s * 1e3:.0f} ms, engine load "
            f"{load_s * 1e3:.0f} ms, memcpy {memcpy_s * 1e3:.0f} ms: {result['ratio_sync_to_raw']:.2f}x raw, "
            f"{result['ratio_sync_to_raw_plus_load']:.2f}x raw + load")
    for p in peers:
        ray.kill(p)


def plot(results: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in sorted({r["generators"] for r in results}):
        rs = [r for r in results if r["generators"] == k]
        xs = [r["bytes"] / 2**20 for r in rs]
        ax.plot(xs, [r["sync_gb_per_s"] for r in rs], "o-", label=f"sync, {k} generator(s)")
        ax.plot(xs, [r["raw_gb_per_s"] for r in rs], "s--", label=f"raw broadcast, {k} receiver(s)")
        ax2.plot(xs, [r["ratio_sync_to_raw"] for r in rs], "o-", label=f"/ raw broadcast, {k} generator(s)")
        ax2.plot(xs, [r["ratio_sync_to_raw_plus_load"] for r in rs], "s:", label=f"/ (raw + engine load), {k} generator(s)")
    first = [r for r in results if r["generators"] == results[0]["generators"]]
    xs = [r["bytes"] / 2**20 for r in first]
    ax.plot(xs, [r["engine_load_gb_per_s"] for r in first], "^-.", color="tab:red", label="vLLM load alone")
    ax.plot(xs, [r["memcpy_gb_per_s"] for r in first], "k:", label="memcpy")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("weights sent (MiB)")
        a.legend(fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("GB/s")
    ax.set_title("learner -> generators weight sync")
    ax2.axhline(1.5, color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("sync time / limit")
    ax2.set_title("sync time against its limits (target <= 1.5x raw)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="grpo bench weight-sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "50M", "150M"], choices=list(MODEL_SIZES))
    parser.add_argument("--generators", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=3, help="at least this many of each measurement (more for small models)")
    parser.add_argument("--modes", nargs="*", default=[], choices=list(push_modes.MODES),
                        help="also: bytes and seconds per push after a learner step, in these ways of pushing "
                             "(written to push_modes.json)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (sync.*, learner.*, cluster.*)")
    args = parser.parse_args(argv)
    import ray

    from cluster.config import load_config

    started = time.perf_counter()
    # fp32 unless the overrides say otherwise: its plan counts 4 bytes per parameter
    cfg = load_config(None, [f"rollout.num_generators={max(args.generators)}", "learner.dtype=float32", *args.overrides])
    start_ray()
    cfg = resolved(cfg)
    results, modes = [], []
    try:
        for size in args.sizes:
            rows = measure_size(size, args, cfg)
            results += rows
            if args.modes:
                path, params = random_model(size, args.out)
                by_mode = push_modes.mode_rows(size, path, params, args.modes, max(args.reps, 3), args.overrides)
                push_modes.add_limits(by_mode, next(r for r in rows if r["generators"] == min(args.generators)))
                modes += by_mode
    finally:
        ray.shutdown()
    rows = [[r["model"], r["bytes"] / 2**20, r["generators"], r["sync_s"] * 1e3, r["raw_broadcast_s"] * 1e3,
             r["engine_load_s"] * 1e3, r["memcpy_s"] * 1e3, r["sync_gb_per_s"], r["raw_gb_per_s"],
             r["ratio_sync_to_raw"], r["ratio_sync_to_raw_plus_load"]]
            for r in results]
    summary = {f"weight_sync/{r['model']}/{r['generators']}gen/ratio_sync_to_raw": r["ratio_sync_to_raw"] for r in results}
    config = {"args": vars(args), "sync": cfg.sync.model_dump(), "learner": cfg.learner.model_dump(),
              "rollout": cfg.rollout.model_dump(), "cluster": cfg.cluster.model_dump()}
    if modes:
        report("push_modes", args.out, config, modes, push_modes.summary(modes), push_modes.HEADERS,
               push_modes.table_rows(modes), lambda p: push_modes.plot(modes, p), started)
    return report("weight_sync", args.out, config, results, summary,
                  ["model", "MiB", "gens", "sync ms", "raw bcast ms", "load ms", "memcpy ms", "sync GB/s", "raw GB/s",
                   "sync/raw", "sync/(raw+load)"],
                  rows, lambda p: plot(results, p), started)


if __name__ == "__main__":
    main()
