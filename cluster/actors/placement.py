"""Putting the actors on a Ray cluster: generators, reward workers, learner ranks.

Every actor gets its resources from ClusterConfig; learner ranks share one placement
group (PACK) so they land together. What the job asks for is compared with what the
cluster has before any actor is created, and every actor must come up within
`cluster.start_timeout_s`: a job that cannot be placed fails at once, naming the
role and the resources, instead of waiting forever. The same code serves CPU and
GPU clusters.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster.config import ClusterConfig, Config
from rollout.host import CPU_SET_ENV, LOG_FILE_ENV, LOG_MAX_ENV


class PlacementError(RuntimeError):
    """The job cannot be placed on this cluster, or an actor did not come up."""


_log_dir: Path | None = None
_log_max_bytes = 0


def set_log_dir(path: Path | None, max_mb: float = 64.0) -> None:
    """Actors created from now on write what they print to <path>/<actor>.log, each file
    kept under max_mb by rotation (None: to Ray's own logs, streamed to the console when
    Ray was started verbose)."""
    global _log_dir, _log_max_bytes
    _log_dir, _log_max_bytes = path, int(max_mb * 2**20)


def log_env(name: str) -> dict[str, str]:
    if _log_dir is None:
        return {}
    return {LOG_FILE_ENV: str((_log_dir / f"{name}.log").resolve()), LOG_MAX_ENV: str(_log_max_bytes)}


def start_ray(cfg: ClusterConfig, verbose: bool = False) -> None:
    """Join `cfg.address`, the cluster a `ray job submit` entrypoint runs in
    (RAY_ADDRESS), or start a local Ray. Not verbose: actors' output stays out of the
    console (their errors still reach it, raised where they are called)."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose, logging_level=level)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=verbose,
            logging_level=level,
            configure_logging=verbose,
        )


REWARD_CPUS = 0.1


def alive_nodes() -> list[dict[str, float]]:
    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def resolve_resources(cfg: Config, nodes: list[dict[str, float]]) -> Config:
    """A copy of cfg with every `None` (auto) share of `cluster:` filled in from the
    cluster: CPU-only, the CPUs left after the reward workers' (0.1 each, or less when
    that would leave a generator or learner rank without a whole core) are split evenly
    between generators and learner ranks (at most 8 each); with GPUs, one CPU per GPU
    actor. Threads per actor: its share's whole cores (whole_cores), at least 1."""
    c = cfg.cluster.model_copy()
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    if c.placement == "colocated":
        return cfg.model_copy(update={"cluster": _colocated_shares(c, cfg, cpus)})
    # GPUs, several nodes or roles pinned to node pools: shares of the whole would not say
    # where they fit, so each generator and learner rank asks for one CPU (check_fits tells).
    gpu_job = bool(c.generator_gpus or c.learner_gpus or len(nodes) > 1 or c.generator_resources
                   or c.learner_resources or c.reward_resources)
    heavy = cfg.rollout.num_generators + cfg.learner.num_ranks
    if c.reward_cpus is None:  # 0.1 each, less (down to 0) where that would cost the others a whole core
        spare = max(cpus - heavy, 0.0) / cfg.rewards.num_workers
        c.reward_cpus = REWARD_CPUS if gpu_job else int(min(REWARD_CPUS, spare) * 100) / 100
    fixed = c.reward_cpus * cfg.rewards.num_workers
    fixed += (c.generator_cpus or 0.0) * cfg.rollout.num_generators + (c.learner_cpus or 0.0) * cfg.learner.num_ranks
    auto = (c.generator_cpus is None) * cfg.rollout.num_generators + (c.learner_cpus is None) * cfg.learner.num_ranks
    share = 1.0 if gpu_job else min(8.0, int(max(cpus - fixed, 0.0) / max(auto, 1) * 100) / 100)
    if c.generator_cpus is None:
        c.generator_cpus = share
    if c.learner_cpus is None:
        c.learner_cpus = share
    if c.generator_threads is None:
        c.generator_threads = whole_cores(c.generator_cpus)
    if c.learner_threads is None:
        c.learner_threads = whole_cores(c.learner_cpus)
    return cfg.model_copy(update={"cluster": c})


def resolve_transport(cfg: Config) -> Config:
    """sync.transport=auto: shared (one buffer the generators open by handle) when the
    generators sit with their learner (colocated), a collective otherwise."""
    if cfg.sync.transport != "auto":
        return cfg
    transport = "shared" if cfg.cluster.placement == "colocated" else "collective"
    return cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"transport": transport})})


def whole_cores(share: float) -> int:
    """Threads for a CPU share: its whole cores, counting a core the reward workers'
    tenths only nibble at (1.98 -> 2), at least 1."""
    return max(1, int(share + 0.1))


def _colocated_shares(c: ClusterConfig, cfg: Config, cpus: float) -> ClusterConfig:
    """Colocated: one pair (generator i, learner rank i) per rank. CPU only: each pair's
    bundle is an even share of what the reward workers leave, and each of its two actors
    asks for half of it from Ray; but both run as many threads as the whole bundle has
    cores, since they take turns on them. With GPUs (one GPU per pair), one CPU each."""
    pairs = cfg.learner.num_ranks
    if c.generator_gpus or c.learner_gpus:
        c.reward_cpus = REWARD_CPUS if c.reward_cpus is None else c.reward_cpus
        c.generator_cpus = 1.0 if c.generator_cpus is None else c.generator_cpus
        c.learner_cpus = 1.0 if c.learner_cpus is None else c.learner_cpus
        c.generator_threads = c.generator_threads or whole_cores(c.generator_cpus)
        c.learner_threads = c.learner_threads or whole_cores(c.learner_cpus)
        return c
    if c.reward_cpus is None:  # as disaggregated: only what does not cost a pair a whole core
        spare = max(cpus - pairs * int(cpus / pairs), 0.0) / cfg.rewards.num_workers
        c.reward_cpus = int(min(REWARD_CPUS, spare) * 100) / 100
    bundle = min(16.0, int(max(cpus - c.reward_cpus * cfg.rewards.num_workers, 0.0) / pairs * 100) / 100)
    half = int(bundle / 2 * 100) / 100
    if c.generator_cpus is None:
        c.generator_cpus = half
    if c.learner_cpus is None:
        c.learner_cpus = half
    threads = whole_cores(c.generator_cpus + c.learner_cpus)
    if c.generator_threads is None:
        c.generator_threads = threads
    if c.learner_threads is None:
        c.learner_threads = threads
    return c


def pair_bundle(c: ClusterConfig) -> dict[str, float]:
    """The resources of one colocated pair: what its generator and learner rank ask for together."""
    gpus = {"GPU": c.generator_gpus + c.learner_gpus} if c.generator_gpus or c.learner_gpus else {}
    return {"CPU": c.generator_cpus + c.learner_cpus, **gpus, **c.learner_resources}


def learner_only(cfg: Config) -> Config:
    """cfg for a job of learner ranks alone (SFT): no generator takes a share of the CPUs."""
    return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"num_generators": 0}),
                                  "cluster": cfg.cluster.model_copy(update={"placement": "disaggregated"})})


def core_sets(c: ClusterConfig, num_generators: int, num_ranks: int,
              nodes: list[dict[str, float]]) -> dict[str, list[int]]:
    """Cores each generator ("generator i") and learner rank ("learner i") pins itself
    to: only on one CPU-only node where every actor gets cores of its own (as many as
    its threads, and at least its CPU share); else nothing is pinned."""
    if not c.pin_cpus or len(nodes) != 1 or c.generator_gpus or c.learner_gpus:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if c.placement == "colocated":  # a pair's two actors take turns on the same cores
        n = max(c.generator_threads, c.learner_threads)
        if n * num_ranks > len(cores):
            return {}
        pairs = {i: cores[i * n : (i + 1) * n] for i in range(num_ranks)}
        return {**{f"learner {i}": pairs[i] for i in range(num_ranks)},
                **{f"generator {i}": pairs[i] for i in range(min(num_generators, num_ranks))}}
    wants = [(f"learner {i}", c.learner_threads, c.learner_cpus) for i in range(num_ranks)]
    wants += [(f"generator {i}", c.generator_threads, c.generator_cpus) for i in range(num_generators)]
    if sum(n for _, n, _ in wants) > len(cores) or any(whole_cores(share) < n for _, n, share in wants):
        return {}
    out, at = {}, 0
    for name, n, _ in wants:
        out[name], at = cores[at : at + n], at + n
    return out


def thread_env(threads: int, cores: list[int] | None = None, colocated: bool = False) -> dict[str, str]:
    """colocated: idle OpenMP threads spin only briefly (GOMP_SPINCOUNT=10000, a few tens of
    microseconds) and then sleep, so the actor whose phase it is not leaves the shared cores
    to the other one. Measured on the default job (2 cores, 16 steps, s/step): 1.96 with it,
    2.13 with libgomp's default spin, 3.48 with OMP_WAIT_POLICY=PASSIVE (every parallel region
    pays a wake-up), 11 with ACTIVE (the idle actor spins through the other's phase). An
    exported GOMP_SPINCOUNT or OMP_WAIT_POLICY wins."""
    n = str(threads)
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    if colocated:
        env["GOMP_SPINCOUNT"] = os.environ.get("GOMP_SPINCOUNT", "10000")
        if "OMP_WAIT_POLICY" in os.environ:
            env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    if cores:
        env[CPU_SET_ENV] = ",".join(map(str, cores))
    return env


@dataclass
class Role:
    name: str
    count: int
    resources: dict[str, float]


def demand(cfg: Config) -> list[Role]:
    """What the job asks of the cluster, per actor, by role: CPUs, GPUs and the role's
    custom resources. A tensor-parallel generator asks for all its GPU bundles on one node."""
    c = cfg.cluster
    tp = cfg.rollout.tensor_parallel_size

    def res(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in (("CPU", cpus), ("GPU", gpus), *custom.items()) if v}

    gen = res(c.generator_cpus, c.generator_gpus, c.generator_resources) if tp == 1 else \
        res(c.generator_cpus + tp * c.bundle_cpus, tp * (c.generator_gpus or 1.0),
            {k: tp * v for k, v in c.generator_resources.items()})
    if c.placement == "colocated":  # each generator inside its learner rank's bundle
        return [Role("reward worker", cfg.rewards.num_workers, res(c.reward_cpus, 0, c.reward_resources)),
                Role("colocated pair", cfg.learner.num_ranks, pair_bundle(c))]
    return [Role("generator", cfg.rollout.num_generators, gen),
            Role("reward worker", cfg.rewards.num_workers, res(c.reward_cpus, 0, c.reward_resources)),
            Role("learner rank", cfg.learner.num_ranks, res(c.learner_cpus, c.learner_gpus, c.learner_resources))]


def check_fits(roles: list[Role], nodes: list[dict[str, float]]) -> None:
    """Place every actor, largest first, on the nodes' resources (first fit); raise
    PlacementError naming the first role that does not fit and what it lacks."""
    free = [dict(n) for n in nodes]
    actors = [(role, k) for role in roles for k in range(role.count)]
    actors.sort(key=lambda a: -sum(a[0].resources.values()))
    for role, k in actors:
        node = next((n for n in free if all(n.get(r, 0.0) >= v - 1e-9 for r, v in role.resources.items())), None)
        if node is None:
            total = {r: sum(x.count * x.resources.get(r, 0.0) for x in roles) for x in roles for r in x.resources}
            have = {r: sum(n.get(r, 0.0) for n in nodes) for r in total}
            asks = ", ".join(f"{x.count} {x.name}(s) x {x.resources}" for x in roles)
            raise PlacementError(
                f"the job does not fit on this Ray cluster: {role.name} {k} needs {role.resources} and no node has it "
                f"left. The job asks for {total} in all ({asks}); the cluster has {have} "
                f"on {len(nodes)} node(s). Lower cluster.*_cpus/_gpus or the actor counts, or add resources.")
        for r, v in role.resources.items():
            node[r] -= v


def wait_ready(actors: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """ray.get every actor's ready() within timeout_s; -> name -> its answer. An actor
    that fails to start, or is not up in time, raises PlacementError naming it."""
    refs = {a.ready.remote(): name for name, a in actors.items()}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        names = ", ".join(refs[r] for r in pending)
        raise PlacementError(f"not up within cluster.start_timeout_s={timeout_s:g} s: {names} "
                             "(not placed, or still starting: see the actor's log)")
    out = {}
    for ref in done:
        try:
            out[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError as e:
            raise PlacementError(f"{refs[ref]} failed to start: {e}") from e
    return out


def place(cfg: Config, log=print, learners: bool = True, verbose: bool = False, generators: bool = True) -> Config:
    """Start (or join) Ray, fill in the automatic resource shares, and check that the
    job fits the cluster: a job that cannot be placed fails here, naming the role.
    learners=False: a command without a learner group (eval); generators=False: one
    without generators (sft), whose learner ranks then share every core."""
    start_ray(cfg.cluster, verbose)
    nodes = alive_nodes()
    if not (learners and generators):  # nothing to pair: the one kind of actor takes every core
        cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"placement": "disaggregated"})})
    if not generators:
        cfg = learner_only(cfg)
    if not learners:
        cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_ranks": 0})})
    cfg = resolve_transport(resolve_resources(cfg, nodes))
    check_fits(demand(cfg), nodes)
    c = cfg.cluster
    pinned = core_sets(c, cfg.rollout.num_generators, cfg.learner.num_ranks, nodes)
    log(f"placement: {c.placement}, {cfg.rollout.num_generators} generator(s) x {c.generator_cpus:g} CPU, {cfg.learner.num_ranks} "
        f"learner rank(s) x {c.learner_cpus:g} CPU, {cfg.rewards.num_workers} reward worker(s) x {c.reward_cpus:g} CPU; "
        f"{c.generator_threads} / {c.learner_threads} thread(s) per generator / learner rank; "
        f"weights by {cfg.sync.transport} transport"
        + (f"; pinned to cores {pinned}" if pinned else ""))
    return cfg
