"""A reward worker (a Ray actor, wrapped by cluster/placement.py): scores groups."""
from __future__ import annotations

import time

from rewards.config import RewardConfig
from rewards.verifiers import VERIFIERS
from rollout.types import Group


class RewardWorker:
    def __init__(self, cfg: RewardConfig, index: int = 0) -> None:
        self.cfg = cfg
        self.index = index
        self.verifiers = {name: VERIFIERS[name] for name in cfg.verifiers}

    def score(self, groups: list[Group]) -> list[Group]:
        """Fill each group's `rewards` (weighted sum) and `reward_parts` (per verifier)."""
        for g in groups:
            parts = {name: [float(fn(s.text, g.row)) for s in g.samples] for name, fn in self.verifiers.items()}
            g.reward_parts = parts
            g.rewards = [
                sum(self.cfg.verifiers[name] * parts[name][i] for name in parts) for i in range(len(g.samples))
            ]
        return groups

    def ready(self) -> int:
        return self.index
