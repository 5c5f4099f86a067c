"""Prompts: the built-in arithmetic task (seeded) and JSONL files.

A row is a dict with `prompt` (str) and `answer`; every other field travels with it
to the verifiers. Bad rows fail before anything starts, naming their line.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from cluster.config import DataConfig


class DatasetError(ValueError):
    pass


def reference_completion(a: int, b: int) -> str:
    """The cold start's target: a units-digit scratchpad in <think>, the sum in <answer>."""
    return f"<think>{a % 10}+{b % 10}={a % 10 + b % 10}</think><answer>{a + b}</answer>"


def arithmetic_split(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """All pairs a+b with operands 0..max_operand, split (seeded) three ways, each held
    apart from the others: "eval" (never trained on), "rl" and "sft" (the cold start)."""
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = int(len(pairs) * cfg.eval_share)
    n_rl = max(1, int(len(pairs) * cfg.rl_share))
    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b), "reference": reference_completion(a, b)}
        for a, b in pairs
    ]
    return {"eval": rows[:n_eval], "rl": rows[n_eval : n_eval + n_rl], "sft": rows[n_eval + n_rl :]}


def arithmetic_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """-> (cold-start rows, RL rows) of the built-in task."""
    split = arithmetic_split(cfg)
    return split["sft"], split["rl"]


def read_jsonl(path: str | Path, what: str = "data.path") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file. A missing file, a
    directory, a line that is not UTF-8, not JSON or not an object raises DatasetError
    naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what}: {str(path)!r} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{what}: cannot read {str(path)!r} ({e.strerror})") from None
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not UTF-8 text (byte {e.start})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{lineno}: a row must be a JSON object")
        out.append((lineno, row))
    if not out:
        raise DatasetError(f"{path}: no rows")
    return out


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a row that lacks `prompt` (a non-empty string) or `answer`
    raises DatasetError naming its line number."""
    rows = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise DatasetError(f"{path}:{lineno}: missing or empty required field 'prompt'")
        if row.get("answer") is None:
            raise DatasetError(f"{path}:{lineno}: missing required field 'answer'")
        rows.append(row)
    return rows


R1_ZERO = (
    "A user asks a question and the assistant works it out. The assistant first reasons about "
    "it step by step, then states the final answer. The reasoning goes between <think> and "
    "</think>, and the answer between <answer> and </answer>, like this: <think> reasoning "
    "</think> <answer> answer </answer>.\nUser: {prompt}\nAssistant:"
)


def apply_template(rows: list[dict[str, Any]], template: str, tokenizer_path: str | None = None) -> list[dict[str, Any]]:
    """JSONL prompts -> what the model sees: as written (`none`), wrapped in the R1-Zero
    instruction (`r1_zero`), or through the tokenizer's chat template (`chat`). The
    original text stays in `question`."""
    if template == "none":
        return rows
    if template == "r1_zero":
        return [{**r, "question": r["prompt"], "prompt": R1_ZERO.format(prompt=r["prompt"])} for r in rows]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if not getattr(tok, "chat_template", None):
        raise DatasetError(f"data.template=chat: the tokenizer of {tokenizer_path} has no chat template")
    return [{**r, "question": r["prompt"], "prompt": tok.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)} for r in rows]


def load_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of an SFT JSONL file; a row without a non-empty string
    `prompt` and `completion` raises DatasetError naming its line."""
    pairs = []
    for lineno, row in read_jsonl(path, "--data"):
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise DatasetError(f"{path}:{lineno}: missing or empty required field {key!r}")
        pairs.append((row["prompt"], row["completion"]))
    return pairs


def rl_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """The RL prompts: a JSONL file (templated later, once the model is known) or the
    built-in task's RL split."""
    return load_jsonl(cfg.path) if cfg.path else arithmetic_split(cfg)["rl"]


def eval_rows(cfg: DataConfig, path: str | None) -> list[dict[str, Any]]:
    """Held-out prompts: a JSONL file, or the built-in task's eval split (never trained on)."""
    if path:
        return load_jsonl(path)
    if cfg.path:
        raise DatasetError("eval.data: give a held-out JSONL file (the built-in split exists only for the built-in task)")
    rows = arithmetic_split(cfg)["eval"]
    if not rows:
        raise DatasetError("data.eval_share leaves no held-out prompts")
    return rows


class PromptStream:
    """Endless, seeded stream of rows: each epoch is a fresh shuffle. `cursor` (rows
    served so far) is all the state needed to resume at the same place."""

    def __init__(self, rows: list[dict[str, Any]], seed: int, cursor: int = 0) -> None:
        self.rows, self.seed, self.cursor = rows, seed, cursor
        self._epoch, self._order_cache = -1, []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order_cache = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order_cache)
            self._epoch = epoch
        return self._order_cache

    def take(self, count: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(count):
            epoch, i = divmod(self.cursor, len(self.rows))
            out.append(self.rows[self._order(epoch)[i]])
            self.cursor += 1
        return out

