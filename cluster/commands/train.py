"""The training driver: batch -> train -> push weights -> log -> checkpoint.

The rollout pipeline (pipeline.py) owns admission, generation, scoring and the
staleness bound; the supervisor (supervisor.py) replaces generators and reward
workers that die or hang; placement.py puts the actors on the cluster; learners.py
runs the ranks as one. A lost learner rank restarts the learner group from the last
checkpoint, here, and the steps after it are done again. This file is the loop and
the bookkeeping around it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster.artifacts import checkpoint
from cluster.actors import placement
from cluster.config import Config, ConfigError, dump_config
from cluster.data import PromptStream, apply_template, eval_rows, rl_rows
from cluster.actors.learners import LearnerGroup
from cluster.artifacts.metrics import MetricsLog, plot, step_metrics, summarize
from cluster.commands.cold_start import prepare_model
from cluster.artifacts.loggers import Loggers, check_available
from cluster.flow.pipeline import PipelineSettings, RolloutPipeline
from cluster.artifacts.record import Recorder, batch_records
from cluster.actors.supervisor import LearnerFault, Supervisor


@dataclass
class Actors:
    generators: list[Any]
    rewarders: list[Any]
    learners: LearnerGroup
    info: dict[str, dict]
    """What each actor's ready() answered (node, pid), by name."""


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
    info = placement.wait_ready(named, cfg.cluster.start_timeout_s)
    learners.connect(generators)
    return Actors(generators, rewarders, learners, info)


def place(cfg: Config, log=print, learners: bool = True, verbose: bool = False, generators: bool = True) -> Config:
    """Start (or join) Ray, fill in the automatic resource shares, and check that the
    job fits the cluster: a job that cannot be placed fails here, naming the role.
    learners=False: a command without a learner group (eval); generators=False: one
    without generators (sft), whose learner ranks then share every core."""
    placement.start_ray(cfg.cluster, verbose)
    nodes = placement.alive_nodes()
    if not generators:
        cfg = placement.learner_only(cfg)
    if not learners:
        cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_ranks": 0})})
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
    check_available(cfg.run.loggers)
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


def eval_prompts(cfg: Config) -> list[dict]:
    """The held-out prompts evaluated during training (none when there is nothing held out)."""
    if not cfg.eval.every or (cfg.data.path and not cfg.eval.data):
        return []
    rows = eval_rows(cfg.data, cfg.eval.data)
    return rows[: cfg.eval.max_prompts] if cfg.eval.max_prompts else rows


def train(cfg: Config, log=print, resume: Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run (or, with `resume`, continue from the run directory's last checkpoint) a job.
    Not verbose: what the actors print goes to RUN/logs/, one file per actor."""
    run = Run(cfg, log, resume, verbose)
    step = run.state["step"]
    run.maybe_evaluate(step)
    while step < run.cfg.run.steps:
        try:
            row = run.step(step)  # batch -> train -> push weights -> publish
        except LearnerFault as fault:
            step = run.restart_learners(str(fault))  # from the last checkpoint: its steps are done again
            continue
        row.update(run.maybe_evaluate(step + 1))
        run.log_step(row)
        if run.cfg.run.checkpoint_every and (step + 1) % run.cfg.run.checkpoint_every == 0:
            run.checkpoint(step + 1)
        step += 1
    return run.finish()


class Run:
    """A training job's actors and bookkeeping, around the loop in `train`."""

    def __init__(self, cfg: Config, log, resume: Path | None, verbose: bool = True) -> None:
        self.rows = preflight(cfg)
        self.eval_rows = eval_prompts(cfg)
        self.state = {"step": 0, "cursor": 0, "policy_version": 0}
        found = None
        if resume is not None:
            found = checkpoint.latest(resume)
            if found is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint under {resume / 'checkpoints'}")
            self.state = found[1]
        self.log, asked = log, cfg
        self.cfg = cfg = place(cfg, log, verbose=verbose)  # before anything is built or written
        self.run_dir = resume or make_run_dir(cfg)
        placement.set_log_dir(None if verbose else self.run_dir / "logs")
        log(f"run directory: {self.run_dir}" + ("" if verbose else "  (actor output: logs/)"))
        self.model_path = prepare_model(asked, log)  # a cold start's ranks take the generators' cores too
        if cfg.data.path:
            self.rows = apply_template(self.rows, cfg.data.template, self.model_path)
            self.eval_rows = apply_template(self.eval_rows, cfg.data.template, self.model_path)
        self.evals: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        self.actors = start_actors(cfg, self.model_path, self.state["policy_version"])
        log(f"actors ready in {time.perf_counter() - t0:.1f} s")
        self.version = self.state["policy_version"]
        self.sup = Supervisor(cfg, self.model_path, self.actors.generators, self.actors.learners, self.version, log)
        if found is not None:
            checkpoint.restore(self.actors.learners, found[0])
            self.sup.push(self.version)  # fresh generators serve the checkpoint
            log(f"resumed from {found[0]} (step {self.state['step']}, policy version {self.version})")
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_steps=self.state["step"])
        self.recorder = Recorder(self.run_dir, cfg.run.record_max_mb) if cfg.run.record_rollouts else None
        if self.recorder is not None:
            self.recorder.truncate(self.state["step"])
        self.loggers = Loggers(cfg.run.loggers, self.run_dir, cfg.model_dump(mode="json"))
        self._shown: list[dict[str, Any]] = []
        self.bar = _progress(cfg, self.state["step"])
        self.redone = 0  # prompts taken again after a learner restart
        self.checkpoint_s: list[float] = []  # seconds each checkpoint held the loop
        self.t_loop = time.perf_counter()
        self._start_pipeline(self.state)

    def _start_pipeline(self, state: dict[str, Any]) -> None:
        stream = PromptStream(self.rows, self.cfg.data.seed, cursor=state["cursor"])
        self.pipeline = RolloutPipeline(self.actors.generators, self.actors.rewarders, stream,
                                        pipeline_settings(self.cfg), self.log, faults=self.sup)
        self.pipeline.publish(state["step"], self.version)
        self._write_actors()

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = self.pipeline.next_batch(step)
        t1 = time.perf_counter()
        with self.sup.weights:  # a generator's replacement never receives weights not yet published
            stats = self.actors.learners.train(batch.groups) if batch.groups else {}  # none: no group had signal
            t2 = time.perf_counter()
            if batch.groups:
                self.sup.push(self.version + 1)
                self.version += 1
        self.pipeline.publish(step + 1, self.version)
        t3 = time.perf_counter()
        row = {"step": step + 1, **step_metrics(batch.sampled, stats), **batch.info,
               "policy_version_trained": self.version,
               "time/train": t2 - t1, "time/sync": t3 - t2, "time/step": t3 - t0, "time/started": t0 - self.t_loop}
        row.update(actor_timings(self.actors.generators, self.sup.live))
        row.update(self.sup.step_done(step))
        records = batch_records(batch.sampled, batch.groups, batch.dropped, self.cfg.learner.advantage,
                                self.cfg.learner.adv_eps)
        if self.recorder is not None:
            self.recorder.write(step + 1, self.version, records)
        flat = sorted(({"prompt": g["prompt"], **s} for g in records for s in g["samples"]), key=lambda s: s["reward"])
        self._shown = flat[:2] + flat[-2:] if len(flat) > 4 else flat  # the worst and the best, for the dashboards
        return row

    def maybe_evaluate(self, step: int) -> dict[str, float]:
        """After `step` steps (0: before the first), when eval.every says so: pass@1,
        cons@k and mean length on the held-out prompts, sampled on the generators
        (alongside the training stream, which it does not touch)."""
        e = self.cfg.eval
        if not e.every or not self.eval_rows or not (step % e.every == 0 or step == self.cfg.run.steps):
            return {}
        from cluster.commands.evaluate import evaluate

        t0 = time.perf_counter()
        live = [g for g, up in zip(self.actors.generators, self.sup.live) if up]
        report, _ = evaluate(live, self.pipeline.rewards.workers, self.eval_rows, e.k,
                             e.sampling(self.cfg.rollout.max_tokens), self.cfg.rewards.verifiers, seed=self.cfg.run.seed)
        out = {"eval/pass@1": report["pass@1"], f"eval/cons@{e.k}": report[f"cons@{e.k}"],
               "eval/mean_length": report["mean_length"], "eval/seconds": time.perf_counter() - t0}
        self.evals.append({"step": step, "version": self.version, **out})
        with (self.run_dir / "evals.jsonl").open("a") as f:
            f.write(json.dumps(self.evals[-1]) + "\n")
        self.log(f"eval after step {step}: pass@1 {report['pass@1']:.3f}, cons@{e.k} {report[f'cons@{e.k}']:.3f} "
                 f"({len(self.eval_rows)} prompts x {e.k}, {out['eval/seconds']:.1f} s)")
        return out

    def log_step(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        self.loggers.log(row, self._shown)
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}")
        if any(row[k] for k in row if k.startswith("faults/") and k != "faults/seconds_lost"):
            self._write_actors()

    def checkpoint(self, step: int) -> None:
        t0 = time.perf_counter()
        self.state = {"step": step, "cursor": self.pipeline.resume_cursor(), "policy_version": self.version}
        checkpoint.save(self.actors.learners, self.run_dir, self.state, self.cfg.run.keep_checkpoints)
        self.checkpoint_s.append(time.perf_counter() - t0)

    def restart_learners(self, cause: str) -> int:
        """A rank died or hung: the whole learner group restarts from the last complete
        checkpoint (the initial model before the first), the generators are reconnected
        and get its weights, the pipeline rewinds to its prompts. -> the step to redo from."""
        fault = self.sup.record("learner", 0, cause)
        fates = self.pipeline.close()
        self.actors.learners.kill()
        found = checkpoint.latest(self.run_dir)
        state = found[1] if found else {"step": 0, "cursor": 0, "policy_version": 0}
        self.redone += max(fates["taken"] + self.pipeline.first_key - state["cursor"], 0)
        learners = placement.make_learner_group(self.model_path, self.cfg)
        self.actors.info.update(placement.wait_ready(
            {f"learner rank {i}": r for i, r in enumerate(learners.ranks)}, self.cfg.cluster.start_timeout_s))
        if found:
            checkpoint.restore(learners, found[0])
        self.actors.learners = self.sup.learners = learners
        self.version = state["policy_version"]
        self.sup.push(self.version, reconnect=True)  # replaces generators lost meanwhile too
        self.metrics.truncate(state["step"])
        if self.recorder is not None:
            self.recorder.truncate(state["step"])
        self.bar.n = state["step"]
        self.log(f"learner group restarted from {found[0] if found else 'the initial model'} "
                 f"(step {state['step']}) in {time.monotonic() - fault.at:.1f} s")
        self._start_pipeline(state)
        return state["step"]

    def _write_actors(self) -> None:
        """RUN/actors.json: where every actor runs (node, pid), kept current across replacements."""
        live = {f"generator {i}": g for i, g in enumerate(self.actors.generators) if self.sup.live[i]}
        live.update({f"reward worker {i}": w for i, w in enumerate(self.pipeline.rewards.workers)})
        live.update({f"learner rank {i}": r for i, r in enumerate(self.actors.learners.ranks)})
        try:
            self.actors.info.update(placement.wait_ready(live, self.cfg.faults.health_timeout_s))
        except placement.PlacementError:  # an actor lost or still starting: refreshed after its replacement
            pass
        (self.run_dir / "actors.json").write_text(json.dumps(self.actors.info, indent=1))

    def finish(self) -> dict[str, Any]:
        self.bar.close()
        self.loggers.close()
        prompts = self.pipeline.close()
        final = self.actors.learners.save_hf(str((self.run_dir / "final").resolve()))
        plot(self.metrics.rows, self.run_dir / "plot.png", self.evals)
        summary = {**summarize(self.metrics.rows), "evals": self.evals, "prompts": prompts,
                   "prompts_redone_after_restarts": self.redone,
                   "checkpoint_seconds": self.checkpoint_s,
                   "faults": self.sup.summary(), "run_dir": str(self.run_dir), "checkpoint": final,
                   "model_start": self.model_path}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def actor_timings(generators: list[Any], live: list[bool]) -> dict[str, float]:
    """Time spent inside the generators since the last call (the slowest one's, as
    they run side by side): vLLM engine steps, building groups, receiving + loading weights.
    With the learner's train/seconds, this separates compute from orchestration."""
    refs = [g.take_timings.remote() for g, up in zip(generators, live) if up]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=30)
    per_actor = []
    for ref in done:
        try:
            per_actor.append(ray.get(ref))
        except ray.exceptions.RayError:  # lost meanwhile: the supervisor replaces it
            pass
    return slowest_generator(per_actor or [{}])


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
