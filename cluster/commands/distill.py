"""`grpo distill`: R1's distillation. Sample K answers per prompt from a teacher on the
generators, keep only the verified-correct ones (rejection sampling, at most `keep` per
prompt), fine-tune a student on them through the learner (cluster/sft.py), and report
the student's pass@1 on held-out prompts before and after, measured on the same
generator actor (the trained weights are pushed to it, as in RL)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster.actors import placement
from cluster.config import Config
from cluster.commands.evaluate import accuracy_verifier, evaluate, sample_and_score, start_generators
from cluster.commands.sft import SFTSettings, sft_config, tokenize, train_steps


@dataclass
class DistillSettings:
    k: int
    keep: int
    steps: int
    batch_size: int
    lr: float


def rejection_sample(groups: list, verifier: str, keep: int) -> list[dict[str, str]]:
    """The verified-correct completions of each prompt (distinct texts, at most `keep`)."""
    out = []
    for g in groups:
        kept: list[str] = []
        for s, score in zip(g.samples, g.reward_parts[verifier]):
            if score == 1.0 and s.text not in kept and len(kept) < keep:
                kept.append(s.text)
        out += [{"prompt": g.prompt, "completion": text, "answer": g.row.get("answer")} for text in kept]
    return out


def distill(cfg: Config, teacher: str, student: str, prompts: list[dict], held_out: list[dict],
            s: DistillSettings, out_dir: Path, log=print) -> dict[str, Any]:
    """teacher, student: HF model directories. -> the report (also out_dir/distill.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    verifier = accuracy_verifier(cfg.rewards.verifiers)
    sampling = cfg.eval.sampling(cfg.rollout.max_tokens)
    teachers, rewarders = start_generators(cfg, teacher, log)
    log(f"distill: sampling {len(prompts)} prompts x {s.k} from the teacher")
    groups = sample_and_score(teachers, rewarders, prompts, s.k, sampling, cfg.run.seed, cfg.faults.step_timeout_s)
    for g in teachers:
        ray.kill(g)
    data = rejection_sample(groups, verifier, s.keep)
    teacher_accuracy = sum(sum(g.reward_parts[verifier]) for g in groups) / (len(groups) * s.k)
    with (out_dir / "distill.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in data)
    log(f"distill: teacher pass@1 {teacher_accuracy:.3f}; kept {len(data)} verified completions of "
        f"{sum(any(x == 1.0 for x in g.reward_parts[verifier]) for g in groups)} prompts -> {out_dir / 'distill.jsonl'}")
    if not data:
        raise ValueError("distill: the teacher answered no prompt correctly; nothing to fine-tune on")

    students = placement.make_generators(student, cfg)
    settings = SFTSettings(s.steps, s.batch_size, s.lr, cfg.run.seed)
    learners = placement.make_learner_group(student, sft_config(cfg, settings))
    placement.wait_ready({**{f"generator {i}": g for i, g in enumerate(students)},
                          **{f"learner rank {i}": r for i, r in enumerate(learners.ranks)}}, cfg.cluster.start_timeout_s)
    k_eval = cfg.eval.k
    before, _ = evaluate(students, rewarders, held_out, k_eval, sampling, cfg.rewards.verifiers, seed=cfg.run.seed)
    log(f"distill: student pass@1 before {before['pass@1']:.3f} on {len(held_out)} held-out prompts")
    examples = tokenize(student, [(row["prompt"], row["completion"]) for row in data])
    losses = train_steps(learners, examples, settings)
    learners.save_hf(str((out_dir / "student").resolve()))
    learners.connect(students)
    learners.push(1)  # the fine-tuned student, on the same generator
    after, _ = evaluate(students, rewarders, held_out, k_eval, sampling, cfg.rewards.verifiers, seed=cfg.run.seed)
    learners.kill()
    log(f"distill: student pass@1 after {after['pass@1']:.3f} (SFT loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    report = {
        "teacher": teacher, "student": student, "k": s.k, "keep": s.keep, "prompts": len(prompts),
        "teacher_pass@1": teacher_accuracy, "examples_kept": len(data),
        "sft": {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "loss_first": losses[0], "loss_last": losses[-1]},
        "held_out_prompts": len(held_out), "eval_k": k_eval,
        "student_pass@1_before": before["pass@1"], "student_pass@1_after": after["pass@1"],
        f"student_cons@{k_eval}_before": before[f"cons@{k_eval}"], f"student_cons@{k_eval}_after": after[f"cons@{k_eval}"],
        "student_out": str(out_dir / "student"), "seconds": time.perf_counter() - t0,
    }
    (out_dir / "distill.json").write_text(json.dumps(report, indent=2))
    return report
