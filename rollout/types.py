"""The data that travels between actors: a sample, a group of samples of one prompt,
and the checks each makes when it crosses from one part to another."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One completion of one prompt."""

    completion_ids: list[int]
    logprobs: list[float]
    """The behaviour policy's logprob of each completion token (same length as
    completion_ids): the log-probability of the distribution the token was drawn
    from (vLLM's processed logprobs, temperature applied)."""
    text: str
    finish_reason: str
    """"stop" (EOS or stop string) or "length" (hit max_tokens)."""
    versions: list[tuple[int, int]]
    """(policy version, index of the first token it produced), in order: one entry,
    or more when weight updates landed while the sample was generated (partial
    rollouts). The oldest version counts for staleness."""
    seed: int = 0
    """The sampling seed this completion was drawn with."""
    loss_mask: list[int] | None = None
    """Per completion token: 1 for a token the model sampled (trained on; its logprob is
    the behaviour policy's), 0 for one it did not (an environment's observation in a
    multi-turn episode: no loss, its logprobs entry is ignored). None: all sampled."""

    def model_tokens(self) -> int:
        return len(self.completion_ids) if self.loss_mask is None else sum(self.loss_mask)

    @property
    def version(self) -> int:
        """The oldest policy version that produced any of its tokens."""
        return min(v for v, _ in self.versions)


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
    key: int = -1
    """The prompt's position in the run's prompt stream (its identity in the pipeline)."""
    reward_info: dict[str, list[dict]] | None = None
    """Per-verifier info dicts per sample (what the verifier reported)."""
    episode: dict[str, list] | None = None
    """Multi-turn episodes (cluster/flow/episodes.py): per sample, its turns, tool calls,
    tool errors, observation tokens, re-runs, outcome, environment reward and seconds,
    and its segments ([text, 1 for the model / 0 for an observation]). None: single-turn."""


class BoundaryError(ValueError):
    """A value that must not travel on (a malformed sample, a non-finite score)."""


def num_completion_tokens(groups: list[Group]) -> int:
    return sum(len(s.completion_ids) for g in groups for s in g.samples)


def check_sampled(group: Group, source: str, logprobs: bool = True) -> None:
    """A group as a generator hands it on: every sample has at least one token, a known
    finish reason, and (when they were asked for: training; evaluation asks for none)
    as many logprobs as tokens, each finite and <= 0."""
    if not group.samples:
        raise BoundaryError(f"{source}: prompt {group.key} came back with no samples")
    if not group.prompt_ids:
        raise BoundaryError(f"{source}: prompt {group.key} has no prompt tokens")
    for k, s in enumerate(group.samples):
        where = f"{source}: prompt {group.key} sample {k}"
        if not s.completion_ids:
            raise BoundaryError(f"{where}: no completion tokens")
        if len(s.logprobs) != (len(s.completion_ids) if logprobs else 0):
            raise BoundaryError(f"{where}: {len(s.logprobs)} logprobs for {len(s.completion_ids)} tokens"
                                + ("" if logprobs else " (none asked for)"))
        sampled = s.logprobs
        if s.loss_mask is not None:
            if len(s.loss_mask) != len(s.completion_ids) or any(m not in (0, 1) for m in s.loss_mask):
                raise BoundaryError(f"{where}: its loss mask must be one 0 or 1 per token "
                                    f"({len(s.loss_mask)} for {len(s.completion_ids)} tokens)")
            if not any(s.loss_mask):
                raise BoundaryError(f"{where}: no token the model sampled (its loss mask is all 0)")
            if logprobs:  # observations carry no behaviour logprob: only the model's tokens are checked
                sampled = [lp for lp, m in zip(s.logprobs, s.loss_mask) if m]
        bad = next((lp for lp in sampled if not (math.isfinite(lp) and lp <= 1e-6)), None)
        if bad is not None:
            raise BoundaryError(f"{where}: logprob {bad} is not a finite log-probability")
        if s.finish_reason not in ("stop", "length"):
            raise BoundaryError(f"{where}: unknown finish reason {s.finish_reason!r}")
        if not s.versions:
            raise BoundaryError(f"{where}: no policy version recorded")


def check_scored(group: Group, source: str) -> None:
    """A group as a reward worker hands it on: one finite total reward per sample."""
    if group.rewards is None or len(group.rewards) != len(group.samples):
        raise BoundaryError(f"{source}: prompt {group.key} has {0 if group.rewards is None else len(group.rewards)} "
                            f"rewards for {len(group.samples)} samples")
    bad = next((r for r in group.rewards if not isinstance(r, (int, float)) or not math.isfinite(r)), None)
    if bad is not None:
        raise BoundaryError(f"{source}: prompt {group.key} has a non-finite reward {bad!r}")
