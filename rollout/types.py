"""The data that travels between actors: a sample, a group of samples of one prompt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One completion of one prompt."""

    completion_ids: list[int]
    logprobs: list[float]
    """The sampler's logprob of each completion token (same length as completion_ids)."""
    text: str
    finish_reason: str
    """"stop" (EOS or stop string) or "length" (hit max_tokens)."""
    version: int
    """Policy version (learner step) of the weights that generated this sample."""


@dataclass
class Group:
    """All samples of one prompt; GRPO's advantages are relative within a group."""

    prompt_ids: list[int]
    prompt: str
    row: dict[str, Any]
    """The dataset row (answer and any other fields the verifiers read)."""
    samples: list[Sample] = field(default_factory=list)
    rewards: list[float] | None = None
    """Total reward per sample, filled by the reward workers."""
    reward_parts: dict[str, list[float]] | None = None
    """Per-verifier scores (unweighted) per sample."""
    reward_stats: dict[str, int] | None = None
    """Verifier calls that timed out / failed / were answered from the cache."""


def num_completion_tokens(groups: list[Group]) -> int:
    return sum(len(s.completion_ids) for g in groups for s in g.samples)
