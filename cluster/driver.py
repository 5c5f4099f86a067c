"""The training driver: generate -> score -> train -> push weights -> log -> checkpoint.

Placement lives in placement.py, weight transport in rollout/ and learner/; this
file is the loop and the bookkeeping around it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster import checkpoint, placement
from cluster.config import Config, dump_config
from cluster.data import PromptStream, rl_rows
from cluster.metrics import MetricsLog, plot, summarize
from cluster.model_prep import prepare_model
from rollout.config import WeightSyncConfig
from rollout.types import Group, num_completion_tokens


@dataclass
class Actors:
    generators: list[Any]
    rewarders: list[Any]
    learners: list[Any]


def split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal chunks (order preserved)."""
    k, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + k + (i < r)
        out.append(items[start:stop])
        start = stop
    return out


def shard_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of each part when `count` items are split as `split` does."""
    sizes = [len(p) for p in split(list(range(count)), parts)]
    return [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(parts)]


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def start_actors(cfg: Config, model_path: str) -> Actors:
    placement.start_ray(cfg.cluster)
    sequences = cfg.run.prompts_per_step * cfg.rollout.n
    actors = Actors(
        placement.make_generators(model_path, cfg),
        placement.make_reward_workers(cfg),
        placement.make_learners(model_path, cfg, sequences)[0],
    )
    ray.get([a.ready.remote() for a in actors.generators + actors.rewarders + actors.learners])
    connect(actors.learners, actors.generators, cfg.sync)
    return actors


def connect(learners: list[Any], generators: list[Any], sync: WeightSyncConfig) -> None:
    """Open the weight-transfer group between learner rank 0 and every generator's
    workers (the other ranks only join ZeRO-3's gathers). Replaces an earlier group."""
    worlds = ray.get([g.engine_world_size.remote() for g in generators])
    ray.get([lrn.connect_generators.remote(generators if rank == 0 else None, worlds, sync)
             for rank, lrn in enumerate(learners)])


def rollout_and_score(actors: Actors, prompts: list[dict], seed: int) -> tuple[list[Group], dict[str, float]]:
    """Generate on every generator and score each generator's groups as soon as they
    arrive (ObjectRefs flow straight into the reward workers)."""
    t0 = time.perf_counter()
    gen_refs = [
        g.generate.remote(chunk, seed + 7919 * i)
        for i, (g, chunk) in enumerate(zip(actors.generators, split(prompts, len(actors.generators))))
    ]
    score_refs = [actors.rewarders[i % len(actors.rewarders)].score.remote(ref) for i, ref in enumerate(gen_refs)]
    ray.wait(gen_refs, num_returns=len(gen_refs), fetch_local=False)
    t_gen = time.perf_counter() - t0
    groups = [g for part in ray.get(score_refs) for g in part]
    return groups, {"time/generate": t_gen, "time/reward": time.perf_counter() - t0 - t_gen}


def collect_batch(actors: Actors, stream: PromptStream, cfg: Config, step: int) -> tuple[list[Group], list[Group], dict]:
    """One step's groups -> (groups to train on, every group sampled, timings).

    With run.dynamic_sampling (DAPO), groups whose rewards are all equal carry no
    signal and are dropped; more prompts are sampled until prompts_per_step groups
    remain or run.max_sampling_rounds rounds were spent."""
    want = cfg.run.prompts_per_step
    kept: list[Group] = []
    sampled: list[Group] = []
    info = {"time/generate": 0.0, "time/reward": 0.0, "sampling_rounds": 0, "groups_dropped": 0}
    while True:
        seed = cfg.run.seed * 100_003 + step + 1_000_003 * info["sampling_rounds"]
        groups, times = rollout_and_score(actors, stream.take(want), seed)
        info["time/generate"] += times["time/generate"]
        info["time/reward"] += times["time/reward"]
        info["sampling_rounds"] += 1
        sampled += groups
        if not cfg.run.dynamic_sampling:
            return groups, sampled, info
        useful = [g for g in groups if max(g.rewards) > min(g.rewards)]
        info["groups_dropped"] += len(groups) - len(useful)
        kept += useful
        if len(kept) >= want or info["sampling_rounds"] >= cfg.run.max_sampling_rounds:
            return kept[:want], sampled, info


def step_metrics(groups: list[Group], learner: dict[str, float]) -> dict[str, Any]:
    samples = [s for g in groups for s in g.samples]
    rewards = [r for g in groups for r in g.rewards]
    out: dict[str, Any] = {
        "reward_mean": sum(rewards) / len(rewards),
        "response_length": num_completion_tokens(groups) / len(samples),
        "truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "policy_version": min(s.version for s in samples),
    }
    for name in groups[0].reward_parts:
        values = [v for g in groups for v in g.reward_parts[name]]
        out[f"rewards/{name}"] = sum(values) / len(values)
    for stat in ("timeouts", "errors", "cache_hits"):
        out[f"reward/{stat}"] = sum(g.reward_stats[stat] for g in groups)
    out["accuracy"] = out.get("rewards/accuracy", float("nan"))
    out["format_rate"] = out.get("rewards/format", float("nan"))
    out["kl"] = learner.get("train/kl", 0.0)
    out["clip_frac"] = learner.get("train/clip_frac", 0.0)
    out.update(learner)
    return out


def preflight(cfg: Config) -> list[dict]:
    """Everything that can be checked before an actor starts: the dataset's rows and
    that every verifier named by import path imports."""
    from rewards.api import is_import_path, resolve

    rows = rl_rows(cfg.data)
    for name in cfg.rewards.verifiers:
        if is_import_path(name) and name not in cfg.rewards.external:
            resolve(name)
    return rows


def train(cfg: Config, log=print, resume: Path | None = None) -> dict[str, Any]:
    """Run (or, with `resume`, continue from the run directory's last checkpoint) a job."""
    rows = preflight(cfg)
    state = {"step": 0, "cursor": 0, "policy_version": 0}
    if resume is not None:
        found = checkpoint.latest(resume)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {resume / 'checkpoints'}")
        path, state = found
    run_dir = resume or make_run_dir(cfg)
    log(f"run directory: {run_dir}")
    model_path = prepare_model(cfg, log)
    t_start = time.perf_counter()
    actors = start_actors(cfg, model_path)
    log(f"actors ready in {time.perf_counter() - t_start:.1f} s")
    if resume is not None:
        checkpoint.restore(actors.learners, path)
        push_weights(actors, state["policy_version"])  # fresh generators serve the checkpoint
        log(f"resumed from {path} (step {state['step']}, policy version {state['policy_version']})")
    stream = PromptStream(rows, cfg.data.seed, cursor=state["cursor"])
    metrics = MetricsLog(run_dir / "metrics.jsonl", keep_steps=state["step"])
    version = state["policy_version"]
    bar = _progress(cfg, state["step"])
    t_loop = time.perf_counter()
    for step in range(state["step"], cfg.run.steps):
        t0 = time.perf_counter()
        groups, sampled, info = collect_batch(actors, stream, cfg, step)
        t1 = time.perf_counter()
        learner_metrics = train_on(actors, groups) if groups else {}  # none: no group had signal
        version += bool(groups)
        t2 = time.perf_counter()
        if groups:
            push_weights(actors, version)
        t3 = time.perf_counter()
        row = {"step": step + 1, **step_metrics(sampled, learner_metrics), **info}
        row.update({"time/train": t2 - t1, "time/sync": t3 - t2, "time/step": t3 - t0, "time/started": t0 - t_loop})
        row.update(actor_timings(actors))
        row["gen_tokens_per_s"] = num_completion_tokens(sampled) / max(info["time/generate"], 1e-9)
        metrics.append(row)
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
            state = {"step": step + 1, "cursor": stream.cursor, "policy_version": version}
            checkpoint.save(actors.learners, run_dir, state, cfg.run.keep_checkpoints)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}")
    bar.close()
    final = ray.get([lrn.save_hf.remote(str((run_dir / "final").resolve())) for lrn in actors.learners])[0]
    plot(metrics.rows, run_dir / "plot.png")
    summary = {**summarize(metrics.rows), "run_dir": str(run_dir), "checkpoint": final, "model_start": model_path}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_on(actors: Actors, groups: list[Group]) -> dict[str, Any]:
    """One update on every learner rank; each reads its shard of one shared copy."""
    groups_ref = ray.put(groups)
    bounds = shard_bounds(len(groups), len(actors.learners))
    return ray.get([lrn.train_step.remote(groups_ref, b) for lrn, b in zip(actors.learners, bounds)])[0]


def actor_timings(actors: Actors) -> dict[str, float]:
    """Time spent inside the generators since the last call (the slowest one's, as
    they run side by side): vLLM generate, building groups, receiving + loading weights.
    With the learner's train/seconds, this separates compute from orchestration."""
    return slowest_generator(ray.get([g.take_timings.remote() for g in actors.generators]))


def slowest_generator(per_actor: list[dict[str, float]]) -> dict[str, float]:
    """Generators' take_timings() -> the step's metrics (the slowest generator per phase)."""
    phases = {"generate/engine": "time/generate_engine", "generate/convert": "time/generate_convert"}
    out = {key: max(t.get(phase, 0.0) for t in per_actor) for phase, key in phases.items()}
    sync_phases = ("sync/start", "sync/receive", "sync/finish")  # receive includes sync/wait and sync/load
    out["time/sync_generator"] = max(sum(t.get(k, 0.0) for k in sync_phases) for t in per_actor)
    return out


def push_weights(actors: Actors, version: int) -> dict[str, float]:
    return ray.get([lrn.broadcast_weights.remote(version) for lrn in actors.learners])[0]


def _progress(cfg: Config, done: int):
    from tqdm import tqdm

    return tqdm(total=cfg.run.steps, initial=done, desc="grpo", unit="step", disable=not cfg.run.progress,
                dynamic_ncols=True)
