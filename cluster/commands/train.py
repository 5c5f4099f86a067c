"""`grpo train`, the training driver: batch -> train -> push weights -> log -> checkpoint.

The rollout pipeline (flow/pipeline.py) owns admission, generation, scoring and the
staleness bound; the supervisor (actors/supervisor.py) probes and replaces
generators and reward workers that die or hang, and takes over a restarted learner
group; actors/placement.py and actors/factory.py put the actors on the cluster;
actors/learners.py runs the ranks as one. A lost learner rank restarts the learner
group from the last checkpoint, here, and the steps after it are done again. This
file is the loop and the bookkeeping around it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster.actors.factory import ActorFactory
from cluster.actors.faults import LearnerFault
from cluster.actors.learners import LearnerGroup
from cluster.actors.placement import PlacementError, place, set_log_dir, wait_ready
from cluster.actors.supervisor import Supervisor
from cluster.artifacts import checkpoint
from cluster.artifacts.files import make_run_dir, replace_dir, run_dir_for, temp_dir_for, write_atomic
from cluster.artifacts.loggers import Loggers, check_available
from cluster.artifacts.metrics import MetricsLog, plot_training, slowest_generator, step_metrics, summarize_training
from cluster.artifacts.record import Recorder, batch_records
from cluster.commands.cold_start import prepare_model
from cluster.commands.evaluate import evaluate
from cluster.config import Config, ConfigError, dump_config
from cluster.data import PromptStream, eval_rows, format_rows, load_tokenizer, rl_rows
from cluster.flow.episodes import episode_settings, observer
from cluster.flow.pipeline import PipelineSettings, RolloutPipeline
from cluster.flow.reward_pool import reward_deadline_s
from rewards.api import ErrorStreak, is_import_path, resolve
from rewards.sandbox import sandbox_mode
from rewards.worker import preflight_env, preflight_external


@dataclass
class Actors:
    generators: list[Any]
    rewarders: list[Any]
    learners: LearnerGroup
    info: dict[str, dict]
    """What each actor's ready() answered (node, pid), by name."""


def start_actors(factory: ActorFactory, start_timeout_s: float, version: int = 0) -> Actors:
    """Start every actor of a checked, resolved job (placement.place) and wait, with a
    deadline, until all are up."""
    generators = factory.generators(version)
    rewarders = factory.reward_workers()
    learners = factory.learner_group()
    named = {**{f"generator {i}": g for i, g in enumerate(generators)},
             **{f"reward worker {i}": w for i, w in enumerate(rewarders)},
             **{f"learner rank {i}": r for i, r in enumerate(learners.ranks)}}
    info = wait_ready(named, start_timeout_s)
    learners.connect(generators)
    return Actors(generators, rewarders, learners, info)


def pipeline_settings(cfg: Config) -> PipelineSettings:
    return PipelineSettings(prompts_per_step=cfg.run.prompts_per_step, n=cfg.rollout.n,
                            max_staleness=cfg.run.max_staleness, dynamic_sampling=cfg.run.dynamic_sampling,
                            max_sampling_rounds=cfg.run.max_sampling_rounds, seed=cfg.run.seed,
                            total_steps=cfg.run.steps,
                            reward_deadline_s=reward_deadline_s(cfg.rewards, cfg.rollout.n, cfg.faults.health_timeout_s),
                            episodes=episode_settings(cfg))


def preflight(cfg: Config) -> list[dict]:
    """Everything that can be checked before an actor starts: the dataset's rows, that
    every verifier named by import path imports, and that model-written code can run."""
    rows = rl_rows(cfg.data)
    check_available(cfg.run.loggers)
    preflight_external(cfg.rewards)  # each external verifier started (or reached) and answering
    preflight_env(cfg.env)  # the episodes' environment imports, or starts and answers
    for name in cfg.rewards.verifiers:
        if is_import_path(name) and name not in cfg.rewards.external:
            resolve(name)
    if "code" in cfg.rewards.verifiers and not cfg.rewards.allow_unsandboxed_code:
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


def train(cfg: Config, log=print, resume: Path | None = None, verbose: bool = True,
          trust_checkpoint: bool = False) -> dict[str, Any]:
    """Run (or, with `resume`, continue from the run directory's last checkpoint) a job.
    Not verbose: what the actors print goes to RUN/logs/, one file per actor.
    trust_checkpoint: the resumed checkpoint may be unpickled (an older version's)."""
    return drive(Run(cfg, log, resume, verbose, trust_checkpoint))


def drive(run: "Run") -> dict[str, Any]:
    """The loop. A learner fault anywhere in a step (its train call, the weight push, its
    evaluation, the checkpoint after it) restarts the learner group from the last
    complete checkpoint, and the steps after that checkpoint are done again."""
    step = run.state["step"]
    run.maybe_evaluate(step)
    while step < run.cfg.run.steps:
        try:
            row = run.step(step)  # batch -> train -> push weights -> publish
            row.update(run.maybe_evaluate(step + 1))
            run.log_step(row)
            if run.cfg.run.checkpoint_every and (step + 1) % run.cfg.run.checkpoint_every == 0:
                run.checkpoint(step + 1)
        except LearnerFault as fault:
            step = run.restart_learners(str(fault))
            continue
        step += 1
    return run.finish()


class Run:
    """A training job's actors and bookkeeping, around the loop in `train`."""

    def __init__(self, cfg: Config, log, resume: Path | None, verbose: bool = True, trust: bool = False) -> None:
        self.rows = preflight(cfg)
        self.eval_rows = eval_prompts(cfg)
        self.state = checkpoint.initial_state()
        found = None
        if resume is not None:  # everything about the run directory is checked before Ray starts
            found = checkpoint.latest(resume, log)
            if found is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint under {resume / 'checkpoints'}")
            self.state = found[1]
            self.metrics = MetricsLog(resume / "metrics.jsonl", keep_steps=self.state["step"], log=log)
        new_dir = None if resume else run_dir_for(cfg, log)
        self.log, asked = log, cfg
        self.cfg = cfg = place(cfg, log, verbose=verbose)  # before anything is built or written
        self.run_dir = resume or make_run_dir(new_dir, cfg)
        set_log_dir(None if verbose else self.run_dir / "logs", cfg.run.log_max_mb)
        log(f"run directory: {self.run_dir}" + ("" if verbose else "  (actor output: logs/)"))
        self.model_path = prepare_model(asked, log)  # a cold start's ranks take the generators' cores too
        template = cfg.data.prompt_template()
        tok = load_tokenizer(self.model_path, template)
        self.observe = observer(tok, template) if cfg.env.name is not None else None
        self.rows, self.eval_rows = format_rows(self.rows, template, tok), format_rows(self.eval_rows, template, tok)
        self.evals: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        self.factory = ActorFactory.for_job(cfg, self.model_path)
        self.actors = start_actors(self.factory, cfg.cluster.start_timeout_s, self.state["policy_version"])
        rank0 = self.actors.info["learner rank 0"]
        log(f"actors ready in {time.perf_counter() - t0:.1f} s; learner in {rank0['dtype']} ({rank0['dtype_reason']})")
        self._keep_precision(rank0["dtype"])
        cfg = self.cfg
        self.version = self.state["policy_version"]
        self.sup = Supervisor(cfg.faults, cfg.cluster.start_timeout_s, self.factory, self.actors.generators,
                              self.actors.learners, self.version, log)
        if found is not None:
            checkpoint.restore(self.actors.learners, found[0], trust)
            self.sup.push(self.version)  # fresh generators serve the checkpoint
            log(f"resumed from {found[0]} (step {self.state['step']}, policy version {self.version})")
        if resume is None:
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.recorder = Recorder(self.run_dir, cfg.run.record_max_mb) if cfg.run.record_rollouts else None
        if self.recorder is not None:
            self.recorder.truncate(self.state["step"])
        self.loggers = Loggers(cfg.run.loggers, self.run_dir, cfg.model_dump(mode="json"))
        self._shown: list[dict[str, Any]] = []
        self.bar = _progress(cfg, self.state["step"])
        self.redone = 0  # prompts taken again after a learner restart
        self.error_streak = ErrorStreak(cfg.rewards.max_error_steps)
        self.checkpoint_s: list[float] = []  # seconds each checkpoint held the loop
        self.t_loop = time.perf_counter()
        self._start_pipeline(self.state)

    def _keep_precision(self, dtype: str) -> None:
        """learner.dtype auto, as the ranks resolved it, becomes the run's: a learner group
        restarted on other nodes, a --resume or a replay on another machine trains in the
        precision of the run's checkpoints (DeepSpeed's bf16 and fp32 states differ)."""
        if dtype == self.cfg.learner.dtype:
            return
        self.cfg = self.cfg.model_copy(update={"learner": self.cfg.learner.model_copy(update={"dtype": dtype})})
        self.factory.learner = self.cfg.learner
        write_atomic(self.run_dir / "config.yaml", dump_config(self.cfg))

    def _start_pipeline(self, state: dict[str, Any]) -> None:
        stream = PromptStream(self.rows, self.cfg.data.seed, cursor=state["cursor"])
        self.pipeline = RolloutPipeline(self.actors.generators, self.actors.rewarders, stream,
                                        pipeline_settings(self.cfg), self.log, faults=self.sup, observe=self.observe)
        self.pipeline.publish(state["step"], self.version)
        self._write_actors()

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = self.pipeline.next_batch(step)
        self.error_streak.update(batch.sampled)  # a verifier failing on every sample, step after step, stops the run
        t1 = time.perf_counter()
        with self.sup.weights:  # a generator's replacement never receives weights not yet published
            if self.factory.sleeps:  # colocated on GPUs: the engines give the learner their memory (under
                self.sup.sleep_generators()  # the lock: no replacement's push wakes them mid-phase)
            stats = self.actors.learners.train(batch.groups, version=self.version) if batch.groups else {}  # none: no group had signal
            t2 = time.perf_counter()
            sent = {}
            if batch.groups:
                sent = self.sup.push(self.version + 1)  # sync/bytes, sync/seconds (and a delta's sync/changed_frac)
                self.version += 1
        self.pipeline.publish(step + 1, self.version)
        t3 = time.perf_counter()
        row = {"step": step + 1, **step_metrics(batch.sampled, stats), **batch.info,
               "policy_version_trained": self.version,
               "time/train": t2 - t1, "time/sync": t3 - t2, "time/step": t3 - t0, "time/started": t0 - self.t_loop,
               **sent}
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
        t0 = time.perf_counter()
        report, _ = evaluate(self.pipeline, self.eval_rows, e.k, e.sampling(self.cfg.rollout.max_tokens),
                             self.cfg.rewards.verifiers, self.cfg.run.seed, e.timeout_s)
        out = {"eval/pass@1": report["pass@1"], f"eval/cons@{e.k}": report[f"cons@{e.k}"],
               "eval/mean_length": report["mean_length"], "eval/seconds": time.perf_counter() - t0,
               "eval/requeued_prompts": report["requeued_prompts"]}
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
        found = checkpoint.latest(self.run_dir, self.log)
        state = found[1] if found else checkpoint.initial_state()
        self.redone += max(fates["taken"] + self.pipeline.first_key - state["cursor"], 0)
        learners = self.factory.learner_group()
        self.actors.info.update(wait_ready(
            {f"learner rank {i}": r for i, r in enumerate(learners.ranks)}, self.cfg.cluster.start_timeout_s))
        if found:
            checkpoint.restore(learners, found[0])
        self.actors.learners = learners
        self.version = state["policy_version"]
        self.sup.replace_learners(learners, self.version)  # replaces generators lost meanwhile too
        self.metrics.truncate(state["step"])  # the faults of the rows dropped go into the next row
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
            self.actors.info.update(wait_ready(live, self.cfg.faults.health_timeout_s))
        except PlacementError:  # an actor lost or still starting: refreshed after its replacement
            pass
        write_atomic(self.run_dir / "actors.json", json.dumps(self.actors.info, indent=1))

    def finish(self) -> dict[str, Any]:
        self.bar.close()
        self.loggers.close()
        prompts = self.pipeline.close()
        self.sup.close()
        tmp = temp_dir_for(self.run_dir / "final")  # a crash while saving leaves no partial final/
        self.actors.learners.save_hf(str(tmp.resolve()))
        replace_dir(tmp, self.run_dir / "final")
        final = str((self.run_dir / "final").resolve())
        plot_training(self.metrics.rows, self.run_dir / "plot.png", self.evals)
        summary = {**summarize_training(self.metrics.rows), "evals": self.evals, "prompts": prompts,
                   "prompts_redone_after_restarts": self.redone,
                   "checkpoint_seconds": self.checkpoint_s,
                   "faults": self.sup.summary(), "run_dir": str(self.run_dir), "checkpoint": final,
                   "model_start": self.model_path}
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
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


def _progress(cfg: Config, done: int):
    from tqdm import tqdm

    return tqdm(total=cfg.run.steps, initial=done, desc="grpo", unit="step", disable=not cfg.run.progress,
                dynamic_ncols=True)
