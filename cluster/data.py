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


def arithmetic_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All pairs a+b with operands 0..max_operand, split (seeded) into cold-start rows
    and RL rows held apart from them. -> (sft_rows, rl_rows)."""
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(pairs)
    n_rl = max(1, int(len(pairs) * cfg.rl_share))
    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b), "reference": reference_completion(a, b)}
        for a, b in pairs
    ]
    return rows[n_rl:], rows[:n_rl]


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a row that is not an object, or lacks `prompt` (a
    non-empty string) or `answer`, raises DatasetError naming its line number."""
    rows = []
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data.path: no such file {str(path)!r}")
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: a row must be a JSON object")
            if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise DatasetError(f"{path}:{lineno}: missing or empty required field 'prompt'")
            if row.get("answer") is None:
                raise DatasetError(f"{path}:{lineno}: missing required field 'answer'")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def rl_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    return load_jsonl(cfg.path) if cfg.path else arithmetic_rows(cfg)[1]


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

