"""The verifier contract, and how a name in the config becomes a verifier.

THE CONTRACT (the one place it is written; the contract tests in tests/unit/test_verifiers.py
check every built-in and the example plug-ins against it):

    verifier(completion: str, fields: dict, **args) -> float | Score | (float, dict)

- `completion`: the generated text (prompt excluded).
- `fields`: the dataset row (`answer` and any other fields), plus
  `completion_tokens` (int), the number of generated tokens.
- `**args`: the verifier's `args` from the config, if any.
- returns the score, a float; optionally with an info dict of plain data, as
  `Score(value, info)` or a `(value, info)` tuple. What msgpack or JSON cannot carry
  is coerced (bytes decoded, sets as lists, keys as text, other objects as their repr:
  rewards.protocol.plain). The key `error` is the worker's: it holds why a call
  failed, and a verifier's own `error` is kept as `verifier_error`. Raising an
  exception costs the sample its reward (score 0, counted in `reward/errors`), never
  the run; a verifier that fails on every sample for `rewards.max_error_steps` steps
  stops it (`ErrorStreak`).
- it runs in a verifier process whose environment holds only what rewards/spawn.py
  lists and what its config entry names in `env`.

Two optional attributes of a verifier (a function attribute or a method of a class
plug-in); a verifier without them keeps the defaults:

    verifier.answer_classes(answers: list[str | None]) -> list[int | None]

  Answer equivalence under the verifier's own notion of equality, for majority votes
  (cons@K): each extracted answer -> the index of the first answer equal to it; None
  (or "") is no answer and -> None. Runs inside a verifier process, never in the driver.
  Default (`rewards.verifiers.group_answers`): numbers equal as exact rationals, other
  answers as stripped text.

    verifier.correctness_priority: int

  Set on a registered verifier whose score 1.0 means "correct": it then decides the
  `accuracy` metric and evaluation (pass@k, cons@K). When several configured verifiers
  have it, the highest priority decides (`math`, 2, over `accuracy`, 1); see
  `correctness_verifier`. Read by registered name in the driver, so a plug-in at an
  import path is never imported there for it.

A verifier is named in the config by its registered short name (`math`, `format`, ...;
see `rewards.verifiers.VERIFIERS`) or by an import path `package.module:attr`. A class
at an import path is instantiated with no arguments; its instance is the verifier. A
module that fails to import (whatever it raises, a syntax error included) is a
VerifierError of one line naming the verifier and where it failed.
"""
from __future__ import annotations

import importlib
import math
import os
import traceback
from typing import Any, Callable, Iterable

from rewards.protocol import plain
from rewards.score import Score
from rewards.verifiers import VERIFIERS
from rollout.types import Group

Verifier = Callable[..., Any]


class VerifierError(ValueError):
    """A verifier named in the config that does not exist, cannot be imported or
    started, or fails on every sample (the message names it)."""


def normalize(result: Any) -> Score:
    """A verifier's return value -> Score, or TypeError/ValueError if it breaks the contract."""
    if isinstance(result, Score):
        score = result
    elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        score = Score(result[0], result[1])
    else:
        score = Score(result)
    if isinstance(score.value, bool) or not isinstance(score.value, (int, float)):
        raise TypeError(f"a verifier must return a number, got {type(score.value).__name__}")
    if not math.isfinite(score.value):
        raise ValueError(f"a verifier returned a non-finite score {score.value}")
    return Score(float(score.value), plain(dict(score.info)))


def is_import_path(name: str) -> bool:
    return ":" in name


_IMPORTLIB = os.path.dirname(importlib.__file__)


def _failure(e: BaseException) -> str:
    """One line: the exception and where it was raised (file:line)."""
    if isinstance(e, SyntaxError):
        what, where = f"SyntaxError: {e.msg}", f"{e.filename}:{e.lineno}"
    else:
        frames = [f for f in traceback.extract_tb(e.__traceback__)  # the import machinery's own: not where
                  if not f.filename.startswith(("<frozen", _IMPORTLIB, __file__))]
        what, where = f"{type(e).__name__}: {e}", f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    line = " ".join(what.split())[:500]
    return f"{line} (at {where})" if where else line


def resolve(name: str) -> Verifier:
    """Registered short name or `package.module:attr` -> the verifier callable; any
    failure -> VerifierError."""
    if not is_import_path(name):
        try:
            return VERIFIERS[name]
        except KeyError:
            raise VerifierError(f"unknown verifier {name!r}; registered: {sorted(VERIFIERS)}, or use package.module:attr") from None
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # a plug-in's import runs its code: anything can happen
        raise VerifierError(f"verifier {name!r} cannot be imported: {_failure(e)}") from None
    if not hasattr(module, attr):
        raise VerifierError(f"verifier {name!r}: module {module_name!r} ({module.__file__}) has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:
            raise VerifierError(f"verifier {name!r}: {attr}() raised {_failure(e)}") from None
    if not callable(obj):
        raise VerifierError(f"verifier {name!r} is not callable")
    return obj


def correctness_verifier(verifier_names: Iterable[str]) -> str | None:
    """Of the configured verifier names, the one that decides "correct": the registered
    verifier with the highest `correctness_priority` (ties: the first named). None when
    no configured verifier judges correctness."""
    best: tuple[int, str] | None = None
    for name in verifier_names:
        priority = getattr(VERIFIERS.get(name), "correctness_priority", None)
        if priority is not None and (best is None or priority > best[0]):
            best = (priority, name)
    return None if best is None else best[1]


def run_one(fn: Verifier, completion: str, fields: dict[str, Any], args: dict[str, Any]) -> Score:
    return normalize(fn(completion, fields, **args))


class ErrorStreak:
    """Stops a run whose verifier fails on every sample, step after step: scoring then
    gives zeros that look like a model that learns nothing, and the run would go on.

    Call `update(groups)` once per step with every group the step scored (trained or
    dropped); it raises VerifierError, naming the verifier and its last error, when one
    verifier failed (an error or a timeout: `error` in its `reward_info`) on every one
    of its samples for `max_steps` consecutive steps. A single answered sample resets
    that verifier's count; a step without samples leaves it. `max_steps` 0: never."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.steps: dict[str, int] = {}
        """Verifier -> consecutive steps on which it failed on every sample."""

    def update(self, groups: Iterable[Group]) -> None:
        seen: dict[str, int] = {}
        failed: dict[str, int] = {}
        last: dict[str, str] = {}
        for g in groups:
            for name, infos in (g.reward_info or {}).items():
                for info in infos:
                    seen[name] = seen.get(name, 0) + 1
                    if info.get("error"):
                        failed[name] = failed.get(name, 0) + 1
                        last[name] = str(info["error"])
        for name, n in seen.items():
            self.steps[name] = self.steps.get(name, 0) + 1 if failed.get(name, 0) == n else 0
            if self.max_steps and self.steps[name] >= self.max_steps:
                raise VerifierError(f"verifier {name!r} failed on every sample for {self.steps[name]} consecutive "
                                    f"steps (rewards.max_error_steps={self.max_steps}); last error: {last[name]}")
