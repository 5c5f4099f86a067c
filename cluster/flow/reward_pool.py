"""The reward pool: scored groups, one Ray call each, on the reward worker with the
fewest groups in hand (every worker is used, whatever the number of generators)."""
from __future__ import annotations

import time
from typing import Any

from rewards.config import RewardConfig
from rollout.types import Group


def reward_deadline_s(rewards: RewardConfig, n: int, slack_s: float) -> float:
    """How long a worker may hold a group of n samples: every sample at every
    verifier's timeout, at the worker's concurrency, plus slack (its start, a probe)."""
    per_sample = sum(rewards.spec(name).timeout_s or rewards.timeout_s for name in rewards.verifiers)
    return per_sample * n / rewards.concurrency + slack_s


class RewardPool:
    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers
        self.load = [0] * len(workers)
        self.up = [True] * len(workers)
        self.pending: dict[Any, tuple[int, Group, float]] = {}  # ref -> (worker, group, sent at)

    def submit(self, group: Group) -> Any:
        w = min((i for i in range(len(self.workers)) if self.up[i]), key=lambda i: (self.load[i], i))
        self.load[w] += 1
        ref = self.workers[w].score.remote(group)
        self.pending[ref] = (w, group, time.monotonic())
        return ref

    def done(self, ref: Any) -> int:
        """The worker that held `ref` (now answered)."""
        w = self.pending.pop(ref)[0]
        self.load[w] -= 1
        return w

    def take_back(self, worker: int) -> list[tuple[Any, Group]]:
        """Worker lost: every group it held, to score elsewhere (-> (old ref, group))."""
        self.up[worker], self.load[worker] = False, 0
        lost = [(ref, g) for ref, (w, g, _) in self.pending.items() if w == worker]
        for ref, _ in lost:
            del self.pending[ref]
        return lost

    def replace(self, worker: int, handle: Any) -> None:
        """A fresh actor serves as worker `worker` from now on."""
        self.workers[worker] = handle
        self.up[worker] = True

    def overdue(self, deadline_s: float) -> list[int]:
        """Workers holding a group for longer than deadline_s (hung)."""
        now = time.monotonic()
        return sorted({w for w, _, sent in self.pending.values() if now - sent > deadline_s})

    def first_live(self) -> Any:
        return next(w for w, up in zip(self.workers, self.up) if up)
