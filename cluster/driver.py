"""The training driver: batch -> train -> push weights -> log -> checkpoint.

The rollout pipeline (pipeline.py) owns admission, generation, scoring and the
staleness bound; placement.py puts the actors on the cluster; learners.py runs the
ranks as one; weight transport lives in rollout/ and learner/. This file is the loop
and the bookkeeping around it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster import checkpoint, placement
from cluster.config import Config, ConfigError, dump_config
from cluster.data import PromptStream, rl_rows
from cluster.learners import LearnerGroup
from cluster.metrics import MetricsLog, plot, step_metrics, summarize
from cluster.model_prep import prepare_model
from cluster.pipeline import PipelineSettings, RolloutPipeline


@dataclass
class Actors:
    generators: list[Any]
    rewarders: list[Any]
    learners: LearnerGroup


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def start_actors(cfg: Config, model_path: str, version: int = 0) -> Actors:
    """Start every actor of a checked, resolved config (see `place`) and wait, with a
    deadline, until all are up."""
    generators = placement.make_generators(model_path, cfg, version)
    rewarders = placement.make_reward_workers(cfg)
    learners = placement.make_learner_group(model_path, cfg)
    named = {**{f"generator {i}": g for i, g in enumerate(generators)},
             **{f"reward worker {i}": w for i, w in enumerate(rewarders)},
             **{f"learner rank {i}": r for i, r in enumerate(learners.ranks)}}
    placement.wait_ready(named, cfg.cluster.start_timeout_s)
    learners.connect(generators)
    return Actors(generators, rewarders, learners)


def place(cfg: Config, log=print) -> Config:
    """Start (or join) Ray, fill in the automatic resource shares, and check that the
    job fits the cluster: a job that cannot be placed fails here, naming the role."""
    placement.start_ray(cfg.cluster)
    nodes = placement.alive_nodes()
    cfg = placement.resolve_resources(cfg, nodes)
    placement.check_fits(placement.demand(cfg), nodes)
    c = cfg.cluster
    pinned = placement.core_sets(cfg, nodes)
    log(f"placement: {cfg.rollout.num_generators} generator(s) x {c.generator_cpus:g} CPU, {cfg.learner.num_ranks} "
        f"learner rank(s) x {c.learner_cpus:g} CPU, {cfg.rewards.num_workers} reward worker(s) x {c.reward_cpus:g} CPU; "
        f"{c.generator_threads} / {c.learner_threads} thread(s) per generator / learner rank"
        + (f"; pinned to cores {pinned}" if pinned else ""))
    return cfg


def pipeline_settings(cfg: Config) -> PipelineSettings:
    return PipelineSettings(prompts_per_step=cfg.run.prompts_per_step, n=cfg.rollout.n,
                            max_staleness=cfg.run.max_staleness, dynamic_sampling=cfg.run.dynamic_sampling,
                            max_sampling_rounds=cfg.run.max_sampling_rounds, seed=cfg.run.seed,
                            total_steps=cfg.run.steps)


def preflight(cfg: Config) -> list[dict]:
    """Everything that can be checked before an actor starts: the dataset's rows, that
    every verifier named by import path imports, and that model-written code can run."""
    from rewards.api import is_import_path, resolve

    rows = rl_rows(cfg.data)
    for name in cfg.rewards.verifiers:
        if is_import_path(name) and name not in cfg.rewards.external:
            resolve(name)
    if "code" in cfg.rewards.verifiers and not cfg.rewards.allow_unsandboxed_code:
        from rewards.sandbox import sandbox_mode

        if sandbox_mode() != "bwrap":
            raise ConfigError("rewards.verifiers: `code` runs model-written programs, and bubblewrap is not available "
                             "here; install it, or set rewards.allow_unsandboxed_code=true (no filesystem or network "
                             "isolation)")
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
    cfg = place(cfg, log)  # before anything is built or written
    run_dir = resume or make_run_dir(cfg)
    log(f"run directory: {run_dir}")
    model_path = prepare_model(cfg, log)
    t_start = time.perf_counter()
    actors = start_actors(cfg, model_path, state["policy_version"])
    log(f"actors ready in {time.perf_counter() - t_start:.1f} s")
    if resume is not None:
        checkpoint.restore(actors.learners.ranks, path)
        actors.learners.push(state["policy_version"])  # fresh generators serve the checkpoint
        log(f"resumed from {path} (step {state['step']}, policy version {state['policy_version']})")
    stream = PromptStream(rows, cfg.data.seed, cursor=state["cursor"])
    pipeline = RolloutPipeline(actors.generators, actors.rewarders, stream, pipeline_settings(cfg), log)
    metrics = MetricsLog(run_dir / "metrics.jsonl", keep_steps=state["step"])
    version = state["policy_version"]
    bar = _progress(cfg, state["step"])
    t_loop = time.perf_counter()
    pipeline.publish(state["step"], version)
    for step in range(state["step"], cfg.run.steps):
        t0 = time.perf_counter()
        batch = pipeline.next_batch(step)
        t1 = time.perf_counter()
        stats = actors.learners.train(batch.groups) if batch.groups else {}  # none: no group had signal
        version += bool(batch.groups)
        t2 = time.perf_counter()
        if batch.groups:
            actors.learners.push(version)
        pipeline.publish(step + 1, version)
        t3 = time.perf_counter()
        row = {"step": step + 1, **step_metrics(batch.sampled, stats), **batch.info, "policy_version_trained": version}
        row.update({"time/train": t2 - t1, "time/sync": t3 - t2, "time/step": t3 - t0, "time/started": t0 - t_loop})
        row.update(actor_timings(actors))
        metrics.append(row)
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
            state = {"step": step + 1, "cursor": pipeline.resume_cursor(), "policy_version": version}
            checkpoint.save(actors.learners.ranks, run_dir, state, cfg.run.keep_checkpoints)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}")
    bar.close()
    prompts = pipeline.close()
    final = actors.learners.save_hf(str((run_dir / "final").resolve()))
    plot(metrics.rows, run_dir / "plot.png")
    summary = {**summarize(metrics.rows), "prompts": prompts, "run_dir": str(run_dir), "checkpoint": final,
               "model_start": model_path}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def actor_timings(actors: Actors) -> dict[str, float]:
    """Time spent inside the generators since the last call (the slowest one's, as
    they run side by side): vLLM engine steps, building groups, receiving + loading weights.
    With the learner's train/seconds, this separates compute from orchestration."""
    return slowest_generator(ray.get([g.take_timings.remote() for g in actors.generators]))


def slowest_generator(per_actor: list[dict[str, float]]) -> dict[str, float]:
    """Generators' take_timings() -> the step's metrics (the slowest generator per phase)."""
    phases = {"generate/engine": "time/generate_engine", "generate/convert": "time/generate_convert"}
    out = {key: max(t.get(phase, 0.0) for t in per_actor) for phase, key in phases.items()}
    sync_phases = ("sync/start", "sync/receive", "sync/finish")  # wait, load and pause are parts of these
    out["time/sync_generator"] = max(sum(t.get(k, 0.0) for k in sync_phases) for t in per_actor)
    out["time/sync_pause"] = max(t.get("sync/pause", 0.0) for t in per_actor)
    return out


def _progress(cfg: Config, done: int):
    from tqdm import tqdm

    return tqdm(total=cfg.run.steps, initial=done, desc="grpo", unit="step", disable=not cfg.run.progress,
                dynamic_ncols=True)
