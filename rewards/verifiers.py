"""Built-in verifiers, registered by name.

A verifier is `fn(completion: str, row: dict) -> float`: the completion text and the
dataset row (its `answer` and any other fields). Pure and cheap to import.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

Verifier = Callable[[str, dict], float]
VERIFIERS: dict[str, Verifier] = {}


def register(name: str) -> Callable[[Verifier], Verifier]:
    def deco(fn: Verifier) -> Verifier:
        VERIFIERS[name] = fn
        return fn

    return deco


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The content of the last <answer>...</answer> outside <think>, stripped."""
    found = _ANSWER.findall(_THINK_BLOCK.sub("", completion))
    return found[-1].strip() if found else None


def _number(text: str) -> Fraction | None:
    text = text.strip().replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


@register("format")
def format_reward(completion: str, row: dict) -> float:
    """1 for exactly one <think>...</think> then exactly one <answer>...</answer>,
    only whitespace around them; else 0."""
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


@register("accuracy")
def accuracy_reward(completion: str, row: dict) -> float:
    """1 when the extracted answer equals the row's `answer` (numbers compared as
    exact rationals, anything else as stripped text); else 0."""
    answer = extract_answer(completion)
    if not answer:
        return 0.0
    expected = str(row["answer"]).strip()
    a, b = _number(answer), _number(expected)
    if a is not None and b is not None:
        return float(a == b)
    return float(answer == expected)
