"""`grpo eval`, and the evaluation that training and distillation run: K samples per
prompt at temperature 0.6 / top-p 0.95 through the rollout pipeline (the generators,
the reward pool and the supervisor that training uses, so a lost generator or reward
worker is replaced here too), answer equivalence inside a verifier process
(math-verify may hang on model-written input: never in the driver), and the figures
of artifacts/eval_report.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray

from cluster.actors.factory import ActorFactory
from cluster.actors.placement import place, wait_ready
from cluster.actors.supervisor import Supervisor
from cluster.artifacts.eval_report import summarize_eval, write
from cluster.artifacts.files import resolve_model
from cluster.config import Config
from cluster.data import PromptStream, apply_template, eval_rows, load_tokenizer
from cluster.flow.episodes import episode_settings, observer
from cluster.flow.pipeline import PipelineSettings, RolloutPipeline
from cluster.flow.reward_pool import reward_deadline_s
from rewards.api import correctness_verifier
from rewards.verifiers import extract_answer
from rollout.seeds import sample_seeds


def accuracy_verifier(verifiers: dict) -> str:
    """The verifier that decides "correct" (rewards.api.correctness_verifier)."""
    name = correctness_verifier(verifiers)
    if name is None:
        raise ValueError("evaluation needs the `accuracy` or `math` verifier in rewards.verifiers")
    return name


def evaluate(pipeline: RolloutPipeline, rows: list[dict], k: int, sampling: dict[str, Any], verifiers: dict,
             seed: int, timeout_s: float) -> tuple[dict[str, Any], list[dict]]:
    """K samples of every row through the pipeline, scored. -> (eval.json's figures,
    samples.jsonl's rows)."""
    verifier = accuracy_verifier(verifiers)
    requeued = pipeline.side_requeued
    groups = pipeline.sample(rows, [sample_seeds(seed, "eval", i, k) for i in range(len(rows))], sampling, timeout_s)
    extracted_all = [[extract_answer(s.text) for s in g.samples] for g in groups]
    classes_all = ray.get(pipeline.rewards.first_live().answer_classes.remote(verifier, extracted_all),
                          timeout=timeout_s)
    per_prompt = []
    for g, extracted, classes in zip(groups, extracted_all, classes_all):
        per_prompt.append({
            "prompt": g.prompt, "prompt_ids": list(g.prompt_ids), "answer": g.row.get("answer"),
            "completions": [s.text for s in g.samples],
            "scores": list(g.reward_parts[verifier]), "rewards": list(g.rewards), "extracted": extracted,
            "classes": classes, "lengths": [len(s.completion_ids) for s in g.samples],
        })
    report = summarize_eval(per_prompt, k)
    report.update({"verifier": verifier, "sampling": sampling, "reward_mean": sum(sum(r["rewards"]) for r in per_prompt)
                   / (k * len(per_prompt)), "requeued_prompts": pipeline.side_requeued - requeued})
    return report, per_prompt


@dataclass
class Sampler:
    """Generators (no learner) and reward workers under a supervisor, and the pipeline
    to sample through: what `grpo eval` and a distillation teacher run on."""

    generators: list[Any]
    rewarders: list[Any]
    supervisor: Supervisor
    pipeline: RolloutPipeline

    def close(self, keep_rewarders: bool = False) -> None:
        self.pipeline.close()
        self.supervisor.close()
        for actor in self.generators + ([] if keep_rewarders else self.rewarders):
            ray.kill(actor)


def side_pipeline(cfg: Config, generators: list[Any], rewarders: list[Any], supervisor: Supervisor, n: int,
                  log: Callable[[str], None], model_path: str | None = None) -> RolloutPipeline:
    """A pipeline with no training stream, for `sample` only (episodes, with env.name:
    their observations tokenised with model_path's tokenizer)."""
    settings = PipelineSettings(prompts_per_step=0, n=n, max_staleness=0, dynamic_sampling=False,
                                max_sampling_rounds=1, seed=cfg.run.seed, total_steps=0,
                                reward_deadline_s=reward_deadline_s(cfg.rewards, n, cfg.faults.health_timeout_s),
                                episodes=episode_settings(cfg))
    observe = None
    if settings.episodes is not None:
        template = cfg.data.prompt_template(cfg.eval.data)
        observe = observer(load_tokenizer(model_path, template), template)
    return RolloutPipeline(generators, rewarders, PromptStream([], cfg.data.seed), settings, log, faults=supervisor,
                           observe=observe)


def start_sampler(cfg: Config, model_path: str, n: int, log: Callable[[str], None],
                  rewarders: list[Any] | None = None) -> Sampler:
    """Generators on model_path and the reward workers (or these), placed like training's."""
    factory = ActorFactory.for_job(cfg, model_path)
    generators = factory.generators()
    fresh = factory.reward_workers() if rewarders is None else []
    wait_ready({**{f"generator {i}": g for i, g in enumerate(generators)},
                **{f"reward worker {i}": w for i, w in enumerate(fresh)}}, cfg.cluster.start_timeout_s)
    rewarders = rewarders if rewarders is not None else fresh
    sup = Supervisor(cfg.faults, cfg.cluster.start_timeout_s, factory, generators, None, 0, log)
    return Sampler(generators, rewarders, sup, side_pipeline(cfg, generators, rewarders, sup, n, log, model_path))


def eval_command(cfg: Config, model: str, data: str | None, out_dir: Path, log=print) -> dict[str, Any]:
    """`grpo eval`: K samples per held-out prompt on the generators, scored by the reward
    workers; eval.json, samples.jsonl and eval.png in out_dir."""
    model_path, _ = resolve_model(model)
    rows = eval_rows(cfg.data, data)
    rows = apply_template(rows, cfg.data.prompt_template(data), model_path)
    rows = rows[: cfg.eval.max_prompts] if cfg.eval.max_prompts else rows
    t0 = time.perf_counter()
    cfg = place(cfg, log, learners=False)
    sampler = start_sampler(cfg, model_path, cfg.eval.k, log)
    log(f"eval: {len(rows)} prompts x {cfg.eval.k} samples on {len(sampler.generators)} generator(s)")
    t1 = time.perf_counter()
    try:
        report, per_prompt = evaluate(sampler.pipeline, rows, cfg.eval.k, cfg.eval.sampling(cfg.rollout.max_tokens),
                                      cfg.rewards.verifiers, cfg.run.seed, cfg.eval.timeout_s)
        report["faults"] = sampler.supervisor.summary()
    finally:
        sampler.close()
    report.update({"model": model_path, "data": data or "built-in held-out arithmetic",
                   "seconds_sampling_and_scoring": time.perf_counter() - t1, "seconds": time.perf_counter() - t0})
    write(out_dir, report, per_prompt)
    return report
