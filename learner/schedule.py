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

Token budgets (`learner.max_tokens_per_micro` > 0): each mini-batch's sequences are
dealt to the ranks by tokens, longest first to the least-loaded rank (OpenRLHF's seqlen
balancing), and each rank packs its own, longest first, into micro-batches whose padded
size (longest x count) stays within the budget (verl's dynamic batch size); a sequence
longer than the budget travels alone. The number of micro-steps then varies from step to
step (`accumulation` is 0 in the plan): every rank runs as many as the busiest rank of
that update, and the learner marks the last one as the accumulation boundary. The
gradient is the same as the count split's: every loss is normalised by sizes of the
whole mini-batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Update:
    """One optimizer step: sequences [start, stop) of the flattened batch."""

    start: int
    stop: int
    micro: tuple[tuple[tuple[int, ...], ...], ...]
    """micro[rank]: its micro-batches, each the indices (into the flattened batch) of its
    sequences; an empty one is a padding micro-step. Every rank has as many."""


@dataclass(frozen=True)
class StepPlan:
    num_sequences: int
    world: int
    accumulation: int
    """Micro-steps per update, fixed at start-up; 0: varies (token budgets)."""
    updates: tuple[Update, ...]

    def rank_sequences(self, rank: int) -> list[tuple[int, ...]]:
        """Every non-empty micro-batch this rank trains on, in order."""
        return [m for u in self.updates for m in u.micro[rank] if m]


def micro_and_accumulation(sequences_per_step: int, world: int, updates: int, micro_batch_size: int) -> tuple[int, int]:
    """-> (sequences per micro-batch, micro-steps per update) for a full batch: what
    DeepSpeed is configured with at start-up (a smaller batch pads, never exceeds)."""
    per_update = max(1, math.ceil(sequences_per_step / world / updates))
    micro = min(micro_batch_size, per_update)
    return micro, math.ceil(per_update / micro)


def step_shape(cfg, sequences_per_step: int, world: int) -> tuple[int, int]:
    """(sequences per micro-batch, micro-steps per update) a learner is built with, from
    its LearnerConfig; token budgets: (1, 0), the micro-steps varying with the batch."""
    if cfg.max_tokens_per_micro:
        return 1, 0
    return micro_and_accumulation(sequences_per_step, world, cfg.updates_per_step, cfg.micro_batch_size)


def sequence_lengths(groups) -> list[int]:
    """Tokens of every sequence of a step (prompt + completion), flattened as trained."""
    return [len(g.prompt_ids) + len(s.completion_ids) for g in groups for s in g.samples]


def plan_for(cfg, world: int, micro: int, accumulation: int, lengths: list[int]) -> StepPlan:
    """The step's plan for a learner of this shape: by tokens or by count."""
    if cfg.max_tokens_per_micro:
        return plan_by_tokens(lengths, world, cfg.updates_per_step, cfg.max_tokens_per_micro)
    return plan_step(len(lengths), world, cfg.updates_per_step, micro, accumulation)


def _split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) in `parts` contiguous pieces whose sizes differ by at most one."""
    k, r = divmod(stop - start, parts)
    out, lo = [], start
    for i in range(parts):
        hi = lo + k + (i < r)
        out.append((lo, hi))
        lo = hi
    return out


def _balanced(indices: range, lengths: list[int], world: int) -> list[list[int]]:
    """Deal sequences to ranks by tokens: longest first, each to the least-loaded rank."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (loads[r], len(out[r]), r))
        out[r].append(i)
        loads[r] += lengths[i]
    return out


def _packed(indices: list[int], lengths: list[int], budget: int) -> list[tuple[int, ...]]:
    """Longest first into micro-batches of at most `budget` padded tokens (longest x count)."""
    micros: list[tuple[int, ...]] = []
    current: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if current and lengths[current[0]] * (len(current) + 1) > budget:
            micros.append(tuple(current))
            current = []
        current.append(i)
    return micros + ([tuple(current)] if current else [])


def plan_by_tokens(lengths: list[int], world: int, updates: int, max_tokens_per_micro: int) -> StepPlan:
    """The schedule of a step under a token budget; lengths[i]: tokens of sequence i
    (prompt + completion)."""
    if not lengths:
        raise ValueError("a learner step needs at least one sequence (skip the step instead)")
    if min(lengths) < 1 or max_tokens_per_micro < 1:
        raise ValueError("token budgets need sequences of at least one token and a budget of at least one")
    plan = []
    for start, stop in _split(0, len(lengths), updates):
        if stop == start:
            continue
        per_rank = [_packed(part, lengths, max_tokens_per_micro)
                    for part in _balanced(range(start, stop), lengths, world)]
        steps = max(1, *map(len, per_rank))
        plan.append(Update(start, stop, tuple(tuple(m) + ((),) * (steps - len(m)) for m in per_rank)))
    return StepPlan(len(lengths), world, 0, tuple(plan))


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
            slices = [tuple(range(s, min(s + micro, hi))) for s in range(lo, hi, micro)]
            if len(slices) > accumulation:  # cannot happen when capacity holds; kept as a guard
                raise ValueError(f"a rank's {hi - lo} sequences need {len(slices)} micro-steps > {accumulation}")
            slices += [()] * (accumulation - len(slices))
            per_rank.append(tuple(slices))
        plan.append(Update(start, stop, tuple(per_rank)))
    return StepPlan(num_sequences, world, accumulation, tuple(plan))
