"""Evaluation as R1 reports it: K samples per prompt at temperature 0.6 / top-p 0.95,
pass@1 averaged over the samples, unbiased pass@j, and cons@K (majority vote over
the extracted answers, equivalent answers counted together).

Sampling runs on the generator actors (the same ones as training, spread over all of
them), scoring through the reward workers, and answer equivalence inside a verifier
process (math-verify may hang on model-written input: never in the driver).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import ray

from cluster.flow.pipeline import RewardPool
from rewards.verifiers import extract_answer
from rollout.seeds import sample_seeds
from rollout.types import Group


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(classes: list[int | None], correct: list[bool]) -> bool:
    """cons@K of one prompt: the most frequent class of extracted answer (None: no
    answer, never a candidate), ties broken by the class seen first; correct when its
    samples are."""
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, c in enumerate(classes):
        if c is None:
            continue
        counts[c] = counts.get(c, 0) + 1
        first.setdefault(c, i)
    if not counts:
        return False
    best = max(counts, key=lambda c: (counts[c], -first[c]))
    return correct[first[best]]


def powers_of_two(k: int) -> list[int]:
    return [2**i for i in range(k.bit_length()) if 2**i <= k]


def summarize(results: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Per-prompt results (scores: accuracy per sample, classes, lengths) -> eval.json."""
    out: dict[str, Any] = {"k": k, "n_prompts": len(results)}
    for j in powers_of_two(k):
        out[f"pass@{j}"] = sum(pass_at_k(k, sum(s == 1.0 for s in r["scores"]), j) for r in results) / len(results)
    out["pass@1"] = sum(sum(r["scores"]) / k for r in results) / len(results)
    out[f"cons@{k}"] = sum(majority_correct(r["classes"], [s == 1.0 for s in r["scores"]]) for r in results) / len(results)
    samples = [(length, score) for r in results for length, score in zip(r["lengths"], r["scores"])]
    out["mean_length"] = sum(length for length, _ in samples) / len(samples)
    out["accuracy_by_length"] = quartiles(samples)
    return out


def quartiles(samples: list[tuple[int, float]]) -> list[dict[str, float]]:
    """Accuracy in each quarter of the samples sorted by length (shortest first)."""
    ordered = sorted(samples)
    out = []
    for q in range(4):
        part = ordered[q * len(ordered) // 4 : (q + 1) * len(ordered) // 4]
        if part:
            out.append({"quartile": q + 1, "max_length": part[-1][0], "samples": len(part),
                        "accuracy": sum(s for _, s in part) / len(part)})
    return out


def accuracy_verifier(verifiers: dict) -> str:
    """The verifier that decides "correct": `math` when configured, else `accuracy`."""
    for name in ("math", "accuracy"):
        if name in verifiers:
            return name
    raise ValueError("evaluation needs the `accuracy` or `math` verifier in rewards.verifiers")


def sample_and_score(generators: list[Any], rewarders: list[Any], rows: list[dict], k: int,
                     sampling: dict[str, Any], seed: int, timeout_s: float) -> list[Group]:
    """K samples of every row, spread over every generator, each group scored by the
    least-loaded reward worker as soon as it is back. -> scored groups, in row order."""
    chunks = [list(range(i, len(rows), len(generators))) for i in range(len(generators))]
    refs = {g.generate.remote([rows[i] for i in idx], [sample_seeds(seed, "eval", i, k) for i in idx], sampling):
            idx for g, idx in zip(generators, chunks) if idx}
    pool, scored, pending = RewardPool(rewarders), {}, {}
    deadline = time.monotonic() + timeout_s
    while refs or pending:
        ready, _ = ray.wait(list(refs) + list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            raise TimeoutError(f"evaluation did not finish within {timeout_s:g} s")
        ref = ready[0]
        if ref in refs:
            for i, group in zip(refs.pop(ref), ray.get(ref)):
                group.key = i
                pending[pool.submit(group)] = i
        else:
            pool.done(ref)
            scored[pending.pop(ref)] = ray.get(ref)[0]
    return [scored[i] for i in range(len(rows))]


def evaluate(generators: list[Any], rewarders: list[Any], rows: list[dict], k: int, sampling: dict[str, Any],
             verifiers: dict, seed: int = 0, timeout_s: float = 3600.0) -> tuple[dict[str, Any], list[dict]]:
    """-> (eval.json's figures, samples.jsonl's rows)."""
    verifier = accuracy_verifier(verifiers)
    groups = sample_and_score(generators, rewarders, rows, k, sampling, seed, timeout_s)
    per_prompt = []
    extracted_all = [[extract_answer(s.text) for s in g.samples] for g in groups]
    classes_all = ray.get(rewarders[0].answer_classes.remote(verifier, extracted_all), timeout=timeout_s)
    for g, extracted, classes in zip(groups, extracted_all, classes_all):
        per_prompt.append({
            "prompt": g.prompt, "answer": g.row.get("answer"), "completions": [s.text for s in g.samples],
            "scores": list(g.reward_parts[verifier]), "rewards": list(g.rewards), "extracted": extracted,
            "classes": classes, "lengths": [len(s.completion_ids) for s in g.samples],
        })
    report = summarize(per_prompt, k)
    report.update({"verifier": verifier, "sampling": sampling, "reward_mean": sum(sum(r["rewards"]) for r in per_prompt)
                   / (k * len(per_prompt))})
    return report, per_prompt


def write(out_dir: Path, report: dict[str, Any], per_prompt: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    with (out_dir / "samples.jsonl").open("w") as f:
        for r in per_prompt:
            f.write(json.dumps({key: r[key] for key in ("prompt", "answer", "completions", "scores", "extracted",
                                                         "rewards", "lengths")}) + "\n")
    plot(report, per_prompt, out_dir / "eval.png")


def plot(report: dict[str, Any], per_prompt: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    js = powers_of_two(report["k"])
    ax.plot(js, [report[f"pass@{j}"] for j in js], "o-", label="pass@j (unbiased)")
    ax.axhline(report[f"cons@{report['k']}"], color="tab:red", ls="--", label=f"cons@{report['k']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("j")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(f"{report['n_prompts']} prompts x {report['k']} samples")
    lengths = [x for r in per_prompt for x in r["lengths"]]
    rewards = [x for r in per_prompt for x in r["rewards"]]
    ax2.scatter(lengths, rewards, s=6, alpha=0.4)
    ax2.set_xlabel("completion length (tokens)")
    ax2.set_ylabel("reward")
    ax2.set_title("reward against length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ grpo eval
def resolve_model(model: str) -> tuple[str, Path | None]:
    """MODEL -> (an HF model directory, the run directory it came from, if any): a run
    directory means its final/ (and its config.yaml is the base config)."""
    path = Path(model)
    if (path / "final" / "config.json").is_file():
        return str((path / "final").resolve()), path
    if (path / "config.json").is_file():
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        return str(path.resolve()), run
    raise FileNotFoundError(f"{model}: neither an HF model directory nor a run directory with final/")


def start_generators(cfg: Any, model_path: str, log) -> tuple[list[Any], list[Any]]:
    """Generators on model_path and the reward workers, placed like training's (no learner)."""
    from cluster.actors import placement

    generators = placement.make_generators(model_path, cfg)
    rewarders = placement.make_reward_workers(cfg)
    placement.wait_ready({**{f"generator {i}": g for i, g in enumerate(generators)},
                          **{f"reward worker {i}": w for i, w in enumerate(rewarders)}}, cfg.cluster.start_timeout_s)
    return generators, rewarders


def eval_command(cfg: Any, model: str, data: str | None, out_dir: Path, log=print) -> dict[str, Any]:
    """`grpo eval`: K samples per held-out prompt on the generators, scored by the reward
    workers; eval.json, samples.jsonl and eval.png in out_dir."""
    from cluster.data import apply_template, eval_rows
    from cluster.commands.train import place

    model_path, _ = resolve_model(model)
    rows = eval_rows(cfg.data, data)
    if data:
        rows = apply_template(rows, cfg.data.template, model_path)
    rows = rows[: cfg.eval.max_prompts] if cfg.eval.max_prompts else rows
    t0 = time.perf_counter()
    cfg = place(cfg, log, learners=False)
    generators, rewarders = start_generators(cfg, model_path, log)
    log(f"eval: {len(rows)} prompts x {cfg.eval.k} samples on {len(generators)} generator(s)")
    t1 = time.perf_counter()
    report, per_prompt = evaluate(generators, rewarders, rows, cfg.eval.k, cfg.eval.sampling(cfg.rollout.max_tokens),
                                  cfg.rewards.verifiers, seed=cfg.run.seed)
    report.update({"model": model_path, "data": data or "built-in held-out arithmetic",
                   "seconds_sampling_and_scoring": time.perf_counter() - t1, "seconds": time.perf_counter() - t0})
    write(out_dir, report, per_prompt)
    return report
