"""The time left of the verifier call in progress, inside a verifier process.

The reward worker sends each call's budget (`timeout_s`) with the request; a verifier
that runs several timed steps (the `code` verifier runs one program per test) fits
them inside it, so a correct but slow answer is not killed by the worker first."""
from __future__ import annotations

import time

_deadline: float | None = None
MARGIN_S = 0.25
"""Kept back for answering before the worker's own deadline."""


def start(timeout_s: float | None) -> None:
    global _deadline
    _deadline = None if timeout_s is None else time.monotonic() + max(float(timeout_s) - MARGIN_S, 0.0)


def remaining() -> float | None:
    """Seconds left of the current call (None outside a budgeted call)."""
    return None if _deadline is None else max(_deadline - time.monotonic(), 0.0)
