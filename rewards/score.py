"""`Score`: a verifier's value with what it reports about the sample. Its own module
because both the built-in verifiers (rewards/verifiers.py) and the name lookup that
imports them (rewards/api.py) need it: with it in either, they would import each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Score:
    value: float
    info: dict[str, Any] = field(default_factory=dict)
