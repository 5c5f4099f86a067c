"""The verifier contract, and how a name in the config becomes a verifier.

THE SIGNATURE (the one place it is written; test_verifier_contract in tests/test_verifiers.py checks
every built-in and an example plug-in against it):

    verifier(completion: str, fields: dict, **args) -> float | Score | (float, dict)

- `completion`: the generated text (prompt excluded).
- `fields`: the dataset row (`answer` and any other fields), plus
  `completion_tokens` (int), the number of generated tokens.
- `**args`: the verifier's `args` from the config, if any.
- returns the score, a float; optionally with an info dict (msgpack-able plain data),
  as `Score(value, info)` or a `(value, info)` tuple. Raising an exception costs the
  sample its reward (score 0, counted in `reward/errors`), never the run.

A verifier is named in the config by its registered short name (`math`, `format`, ...;
see `rewards.verifiers.VERIFIERS`) or by an import path `package.module:attr`. A class
at an import path is instantiated with no arguments; its instance is the verifier.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Score:
    value: float
    info: dict[str, Any] = field(default_factory=dict)


Verifier = Callable[..., Any]


class VerifierError(ValueError):
    """A verifier named in the config that does not exist or cannot be imported."""


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
    return Score(float(score.value), dict(score.info))


def is_import_path(name: str) -> bool:
    return ":" in name


def resolve(name: str) -> Verifier:
    """Registered short name or `package.module:attr` -> the verifier callable."""
    if not is_import_path(name):
        from rewards.verifiers import VERIFIERS

        try:
            return VERIFIERS[name]
        except KeyError:
            raise VerifierError(f"unknown verifier {name!r}; registered: {sorted(VERIFIERS)}, or use package.module:attr") from None
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise VerifierError(f"verifier {name!r} cannot be imported: {e}") from None
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise VerifierError(f"verifier {name!r} is not callable")
    return obj


def run_one(fn: Verifier, completion: str, fields: dict[str, Any], args: dict[str, Any]) -> Score:
    return normalize(fn(completion, fields, **args))

