"""Evaluation figures as R1 reports them, and their files: pass@1 averaged over the K
samples of each prompt, unbiased pass@j, cons@K (majority vote over answer classes),
accuracy by length; eval.json, samples.jsonl and eval.png."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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


def summarize_eval(results: list[dict[str, Any]], k: int) -> dict[str, Any]:
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


def write(out_dir: Path, report: dict[str, Any], per_prompt: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    with (out_dir / "samples.jsonl").open("w") as f:
        for r in per_prompt:
            f.write(json.dumps({key: r[key] for key in ("prompt", "prompt_ids", "answer", "completions", "scores",
                                                         "extracted", "rewards", "lengths") if key in r}) + "\n")
    plot_eval(report, per_prompt, out_dir / "eval.png")


def plot_eval(report: dict[str, Any], per_prompt: list[dict], path: Path) -> None:
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
