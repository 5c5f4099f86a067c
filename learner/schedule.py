"""The micro-batch schedule of one learner step, planned once for every rank.

A step's sequences (its groups flattened, in order) are split into
`updates_per_step` contiguous mini-batches, one optimizer step each; every
mini-batch is split across the ranks, and each rank's part into micro-batches.
Every rank runs the same number of micro-steps per update (`accumulation`,
DeepSpeed's gradient accumulation, fixed at start-up): a rank with fewer sequences,
or none, fills its remaining slots with empty micro-batches, which still run a
forward and a backward (ZeRO-3 gathers parameters inside them: a rank that skipped
one would leave the others waiting). So collectives never go out of step, whatever
a step's batch size: dynamic sampling can leave fewer groups than ranks.

Mini-batches are defined over the whole batch, not per rank, so the update does not
depend on how many ranks share it. Pure Python: no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Update:
    """One optimizer step: sequences [start, stop) of the flattened batch."""

    start: int
    stop: int
    micro: tuple[tuple[tuple[int, int], ...], ...]
    """micro[rank]: `accumulation` (start, stop) slices of the flattened batch;
    an empty slice (start == stop) is a padding micro-step."""


@dataclass(frozen=True)
class StepPlan:
    num_sequences: int
    world: int
    accumulation: int
    updates: tuple[Update, ...]

    def rank_sequences(self, rank: int) -> list[tuple[int, int]]:
        """Every non-empty slice this rank trains on, in order."""
        return [s for u in self.updates for s in u.micro[rank] if s[1] > s[0]]


def micro_and_accumulation(sequences_per_step: int, world: int, updates: int, micro_batch_size: int) -> tuple[int, int]:
    """-> (sequences per micro-batch, micro-steps per update) for a full batch: what
    DeepSpeed is configured with at start-up (a smaller batch pads, never exceeds)."""
    per_update = max(1, math.ceil(sequences_per_step / world / updates))
    micro = min(micro_batch_size, per_update)
    return micro, math.ceil(per_update / micro)


def _split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) in `parts` contiguous pieces whose sizes differ by at most one."""
    k, r = divmod(stop - start, parts)
    out, lo = [], start
    for i in range(parts):
        hi = lo + k + (i < r)
        out.append((lo, hi))
        lo = hi
    return out


def plan_step(num_sequences: int, world: int, updates: int, micro: int, accumulation: int) -> StepPlan:
    """The schedule of a step with `num_sequences` sequences (>= 1). Mini-batches that
    would be empty (fewer sequences than updates) are left out: an optimizer step
    on no data would still move the weights (Adam's momentum, weight decay)."""
    if num_sequences < 1:
        raise ValueError("a learner step needs at least one sequence (skip the step instead)")
    if micro * accumulation * world * updates < num_sequences:
        raise ValueError(
            f"{num_sequences} sequences exceed the learner's capacity per step "
            f"({micro} per micro-batch x {accumulation} micro-steps x {world} ranks x {updates} updates)"
        )
    plan = []
    for start, stop in _split(0, num_sequences, updates):
        if stop == start:
            continue
        per_rank = []
        for lo, hi in _split(start, stop, world):
            slices = [(s, min(s + micro, hi)) for s in range(lo, hi, micro)]
            if len(slices) > accumulation:  # cannot happen when capacity holds; kept as a guard
                raise ValueError(f"a rank's {hi - lo} sequences need {len(slices)} micro-steps > {accumulation}")
            slices += [(hi, hi)] * (accumulation - len(slices))
            per_rank.append(tuple(slices))
        plan.append(Update(start, stop, tuple(per_rank)))
    return StepPlan(num_sequences, world, accumulation, tuple(plan))
