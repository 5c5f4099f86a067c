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


def tool_reference(a: int, b: int) -> list[list]:
    """The multiplication task's cold-start target with the `python` tool, as an episode
    (model turn, the tool's observation, model turn): the model writes the call, the
    sandbox prints the product, the model copies it into <answer>. The observation is
    exactly what the tool answers (rewards/envs.py PythonTool); it carries no loss."""
    return [[f"<python>print({a}*{b})</python>", 1], [f"<output>{a * b}\n</output>", 0],
            [f"<answer>{a * b}</answer>", 1]]


def _task_row(task: str, a: int, b: int) -> dict[str, Any]:
    if task == "multiplication":  # beyond a small model's head: the tool's task (README, Environments and tools)
        return {"prompt": f"{a}*{b}=", "answer": str(a * b), "reference": f"<answer>{a * b}</answer>",
                "tool_reference": tool_reference(a, b)}
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "reference": reference_completion(a, b)}


def arithmetic_split(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """All pairs a+b (a*b for data.task=multiplication) with operands 0..max_operand,
    split (seeded) three ways, each held apart from the others: "eval" (never trained
    on), "rl" and "sft" (the cold start)."""
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = int(len(pairs) * cfg.eval_share)
    n_rl = max(1, int(len(pairs) * cfg.rl_share))
    rows = [_task_row(cfg.task or "arithmetic", a, b) for a, b in pairs]
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


def gsm8k_answer(solution: str) -> str:
    """GSM8K's final answer: what follows the last `####`, without thousands separators."""
    at = solution.rfind("####")
    if at < 0:
        raise ValueError("no '#### <answer>' line in 'answer'")
    answer = solution[at + 4:].strip().replace(",", "")
    if not answer:
        raise ValueError("nothing after '####' in 'answer'")
    return answer


def last_boxed(solution: str) -> str:
    """The content of the last `\\boxed{...}` (braces balanced), as MATH marks its answer."""
    at = solution.rfind("\\boxed")
    if at < 0:
        raise ValueError("no \\boxed{} in 'solution'")
    i = at + len("\\boxed")
    while i < len(solution) and solution[i] == " ":
        i += 1
    if i >= len(solution) or solution[i] != "{":
        raise ValueError("\\boxed without '{' in 'solution'")
    depth, start = 0, i + 1
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            answer = solution[start:j].strip()
            if not answer:
                raise ValueError("an empty \\boxed{} in 'solution'")
            return answer
    raise ValueError("unbalanced braces in the last \\boxed{} of 'solution'")


# data.format -> (the field that holds the question, the field the answer is extracted from, extractor)
FORMATS = {"gsm8k": ("question", "answer", gsm8k_answer), "math": ("problem", "solution", last_boxed)}


def to_plain(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A row of a known data set's shape -> `prompt` and `answer` (the extracted final
    answer; the full worked solution stays in `solution`). Raises ValueError naming the field."""
    if fmt == "plain":
        return row
    question, source, extract = FORMATS[fmt]
    for key in (question, source):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"missing or empty required field {key!r} (data.format={fmt})")
    return {**row, "prompt": row[question], "answer": extract(row[source]), "solution": row[source]}


def load_jsonl(path: str | Path, fmt: str = "plain") -> list[dict[str, Any]]:
    """Rows of a JSONL file in data.format `fmt` (to_plain); a row that lacks `prompt`
    (a non-empty string) or `answer`, or whose answer cannot be extracted, raises
    DatasetError naming its line number."""
    rows = []
    for lineno, row in read_jsonl(path):
        try:
            row = to_plain(row, fmt)
        except ValueError as e:
            raise DatasetError(f"{path}:{lineno}: {e}") from None
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


def render_prompt(tok: Any, prompt: str, template: str) -> str:
    """One prompt's text as the model sees it: as written (`none`), wrapped in the R1-Zero
    instruction (`r1_zero`), or the chat template's user turn and generation prompt (`chat`)."""
    if template == "none":
        return prompt
    if template == "r1_zero":
        return R1_ZERO.format(prompt=prompt)
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def load_tokenizer(tokenizer_path: str, template: str = "none") -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if template == "chat" and not getattr(tok, "chat_template", None):
        raise DatasetError(f"data.template=chat: the tokenizer of {tokenizer_path} has no chat template")
    return tok


def apply_template(rows: list[dict[str, Any]], template: str, tokenizer_path: str) -> list[dict[str, Any]]:
    """Rows -> what the model sees: `prompt` rendered (render_prompt; the original text
    stays in `question`) and `prompt_ids`, its token ids (rollout/tokens.py), which the
    generators sample from as they are. Every command formats its prompts here."""
    return format_rows(rows, template, load_tokenizer(tokenizer_path, template))


def format_rows(rows: list[dict[str, Any]], template: str, tok: Any) -> list[dict[str, Any]]:
    """apply_template with a tokenizer already loaded (load_tokenizer)."""
    from rollout.tokens import prompt_ids

    out = []
    for i, r in enumerate(rows):
        text = render_prompt(tok, r["prompt"], template)
        try:
            ids = prompt_ids(tok, text, template)
        except ValueError as e:
            raise DatasetError(f"row {i}: {e}") from None
        out.append({**r, **({"question": r["prompt"]} if template != "none" else {}), "prompt": text, "prompt_ids": ids})
    return out


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
    return load_jsonl(cfg.path, cfg.format) if cfg.path else arithmetic_split(cfg)["rl"]


def eval_rows(cfg: DataConfig, path: str | None) -> list[dict[str, Any]]:
    """Held-out prompts: a JSONL file, or the built-in task's eval split (never trained on)."""
    if path:
        return load_jsonl(path, cfg.format)
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

