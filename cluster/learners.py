"""The learner ranks as one unit: train a batch on every rank with one schedule, push
the weights to the generators, save and restore checkpoints."""
from __future__ import annotations

from typing import Any

import ray

from cluster.config import Config
from learner.schedule import StepPlan, micro_and_accumulation, plan_step
from rollout.types import Group


class LearnerGroup:
    def __init__(self, ranks: list[Any], placement_group: Any, cfg: Config) -> None:
        self.ranks, self.placement_group, self.cfg = ranks, placement_group, cfg
        sequences = cfg.run.prompts_per_step * cfg.rollout.n
        self.micro, self.accumulation = micro_and_accumulation(
            sequences, len(ranks), cfg.learner.updates_per_step, cfg.learner.micro_batch_size)

    def plan(self, groups: list[Group]) -> StepPlan:
        """The step's schedule, made once here and handed to every rank."""
        return plan_step(sum(len(g.samples) for g in groups), len(self.ranks), self.cfg.learner.updates_per_step,
                         self.micro, self.accumulation)

    def train(self, groups: list[Group], capture_gradients: bool = False) -> dict[str, Any]:
        """One update on every rank (each reads its slices of one shared copy); the
        metrics are already reduced over all ranks."""
        plan = self.plan(groups)
        ref = ray.put(groups)
        return ray.get([r.train_step.remote(ref, plan, capture_gradients) for r in self.ranks])[0]

    def connect(self, generators: list[Any]) -> None:
        """Open the weight-transfer group between rank 0 and every generator's workers
        (the other ranks only join ZeRO-3's gathers). Replaces an earlier group."""
        worlds = ray.get([g.engine_world_size.remote() for g in generators])
        ray.get([r.connect_generators.remote(generators if i == 0 else None, worlds, self.cfg.sync)
                 for i, r in enumerate(self.ranks)])

    def push(self, version: int) -> dict[str, float]:
        """Stream the weights to every generator, which then serve `version`."""
        return ray.get([r.broadcast_weights.remote(version) for r in self.ranks])[0]

    def save_hf(self, path: str) -> str:
        return ray.get([r.save_hf.remote(path) for r in self.ranks])[0]

    def kill(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        ray.util.remove_placement_group(self.placement_group)
