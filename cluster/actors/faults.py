"""What a fault is, and how a part that notices one reports it.

Fault handling itself (probes, replacement, restarts) is the supervisor's
(cluster/actors/supervisor.py). Whoever calls an actor and sees it fail reports it
through `FaultReporter`, a small protocol: the pipeline never re-creates an actor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import ray


class FaultLimit(RuntimeError):
    """More replacements of one kind of actor than faults.max_restarts allows."""


class LearnerFault(RuntimeError):
    """A learner rank died or did not answer in time: the group restarts from the last checkpoint."""


@dataclass
class Fault:
    kind: str  # "generator", "reward worker", "learner"
    index: int
    step: int
    cause: str
    at: float  # time.monotonic() when detected
    recovered_s: float | None = None  # seconds from detection to the next completed step

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        del out["at"]
        return out


def is_actor_gone(error: BaseException) -> bool:
    """Whether an error from a Ray call means the actor itself is dead or unreachable."""
    return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class FaultReporter(Protocol):
    """How the rollout pipeline reports a lost actor (the supervisor implements it).
    The pipeline sets the two callbacks: a lost generator's work is requeued on
    `on_generator_down(index)`, and its replacement is used from `on_generator_up(index, handle)`."""

    on_generator_down: Callable[[int], None]
    on_generator_up: Callable[[int, Any], None]

    def generator_lost(self, index: int, cause: str) -> None:
        """Generator `index` died or hung: it is replaced in the background; its work
        comes back through the pipeline's `generator_down` / `generator_up` callbacks."""

    def reward_worker_lost(self, index: int, handle: Any, cause: str) -> Any:
        """Reward worker `index` (`handle`) died or held a group past its deadline: ->
        its replacement's handle (calls queue on it until it is up)."""

    def check(self) -> None:
        """Raise what went wrong in the background (a replacement that failed)."""
