"""`grpo distill`: R1's distillation. Sample K answers per prompt from a teacher on the
generators, keep only the verified-correct ones (rejection sampling, at most `keep` per
prompt), fine-tune a student on them through the learner (cluster/commands/sft.py), and report
the student's pass@1 on held-out prompts before and after, measured on the same
generator actor (the trained weights are pushed to it, as in RL)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cluster.actors.factory import ActorFactory
from cluster.actors.placement import wait_ready
from cluster.actors.supervisor import Supervisor
from cluster.commands.evaluate import accuracy_verifier, evaluate, side_pipeline, start_sampler
from cluster.commands.sft import SFTSettings, sft_config, tokenize, train_steps
from cluster.config import Config, DistillConfig
from rollout.seeds import sample_seeds


def rejection_sample(groups: list, verifier: str, keep: int) -> list[dict[str, str]]:
    """The verified-correct completions of each prompt (distinct texts, at most `keep`)."""
    out = []
    for g in groups:
        kept: list[str] = []
        for s, score in zip(g.samples, g.reward_parts[verifier]):
            if score == 1.0 and s.text not in kept and len(kept) < keep:
                kept.append(s.text)
        # the prompt as written (the student's own template formats it, as RL would)
        out += [{"prompt": g.row.get("question", g.prompt), "completion": text, "answer": g.row.get("answer")}
                for text in kept]
    return out


def sample_teacher(cfg: Config, teacher: str, prompts: list[dict], d: DistillConfig, log) -> tuple[list, list]:
    """The teacher's K samples of every prompt, scored (through the pipeline and the
    supervisor, as training samples). -> (scored groups, the reward workers, kept up)."""
    sampler = start_sampler(cfg, teacher, d.k, log)
    log(f"distill: sampling {len(prompts)} prompts x {d.k} from the teacher")
    try:
        seeds = [sample_seeds(cfg.run.seed, "eval", i, d.k) for i in range(len(prompts))]
        groups = sampler.pipeline.sample(prompts, seeds, cfg.eval.sampling(cfg.rollout.max_tokens),
                                         cfg.faults.step_timeout_s)
    finally:
        sampler.close(keep_rewarders=True)
    return groups, sampler.rewarders


def distill(cfg: Config, teacher: str, student: str, prompts: list[dict], held_out: list[dict],
            d: DistillConfig, s: SFTSettings, out_dir: Path, log=print, template: str = "none") -> dict[str, Any]:
    """teacher, student: HF model directories; template: what the prompts and held-out rows
    were formatted with (cluster/data.py), and so what the student's SFT formats its prompts
    with. -> the report (also out_dir/distill.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    verifier = accuracy_verifier(cfg.rewards.verifiers)
    sampling = cfg.eval.sampling(cfg.rollout.max_tokens)
    groups, rewarders = sample_teacher(cfg, teacher, prompts, d, log)
    data = rejection_sample(groups, verifier, d.keep)
    teacher_accuracy = sum(sum(g.reward_parts[verifier]) for g in groups) / (len(groups) * d.k)
    with (out_dir / "distill.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in data)
    log(f"distill: teacher pass@1 {teacher_accuracy:.3f}; kept {len(data)} verified completions of "
        f"{sum(any(x == 1.0 for x in g.reward_parts[verifier]) for g in groups)} prompts -> {out_dir / 'distill.jsonl'}")
    if not data:
        raise ValueError("distill: the teacher answered no prompt correctly; nothing to fine-tune on")

    factory = ActorFactory.for_job(sft_config(cfg, s), student)
    students, learners = factory.generators(), factory.learner_group()
    wait_ready({**{f"generator {i}": g for i, g in enumerate(students)},
                **{f"learner rank {i}": r for i, r in enumerate(learners.ranks)}}, cfg.cluster.start_timeout_s)
    sup = Supervisor(cfg.faults, cfg.cluster.start_timeout_s, factory, students, learners, 0, log)
    pipeline = side_pipeline(cfg, students, rewarders, sup, cfg.eval.k, log, student)
    k_eval = cfg.eval.k
    try:
        before, _ = evaluate(pipeline, held_out, k_eval, sampling, cfg.rewards.verifiers, cfg.run.seed,
                             cfg.eval.timeout_s)
        log(f"distill: student pass@1 before {before['pass@1']:.3f} on {len(held_out)} held-out prompts")
        examples = tokenize(student, [(row["prompt"], row["completion"]) for row in data], template)
        losses = train_steps(learners, examples, s)
        learners.save_hf(str((out_dir / "student").resolve()))
        sup.push(1, reconnect=True)  # the fine-tuned student, on the same generators
        after, _ = evaluate(pipeline, held_out, k_eval, sampling, cfg.rewards.verifiers, cfg.run.seed,
                            cfg.eval.timeout_s)
    finally:
        pipeline.close()
        sup.close()
        learners.kill()
    log(f"distill: student pass@1 after {after['pass@1']:.3f} (SFT loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    report = {
        "teacher": teacher, "student": student, "k": d.k, "keep": d.keep, "prompts": len(prompts),
        "teacher_pass@1": teacher_accuracy, "examples_kept": len(data),
        "sft": {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "loss_first": losses[0], "loss_last": losses[-1]},
        "held_out_prompts": len(held_out), "eval_k": k_eval,
        "student_pass@1_before": before["pass@1"], "student_pass@1_after": after["pass@1"],
        f"student_cons@{k_eval}_before": before[f"cons@{k_eval}"], f"student_cons@{k_eval}_after": after[f"cons@{k_eval}"],
        "student_out": str(out_dir / "student"), "seconds": time.perf_counter() - t0,
    }
    (out_dir / "distill.json").write_text(json.dumps(report, indent=2))
    return report
