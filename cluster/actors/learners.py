"""The learner ranks as one unit: train a batch on every rank with one schedule, push
the weights to the generators, save and restore checkpoints."""
from __future__ import annotations

from typing import Any

import ray

from cluster.actors.faults import LearnerFault, is_actor_gone
from learner.checkpoint_engine import UnsafeCheckpoint
from learner.config import LearnerConfig
from learner.schedule import StepPlan, plan_for, sequence_lengths, step_shape
from rollout.config import WeightSyncConfig
from rollout.types import Group


class LearnerGroup:
    def __init__(self, ranks: list[Any], placement_group: Any, learner: LearnerConfig, sync: WeightSyncConfig,
                 sequences_per_step: int, step_timeout_s: float) -> None:
        self.ranks, self.placement_group = ranks, placement_group
        self.learner, self.sync, self.step_timeout_s = learner, sync, step_timeout_s
        self.micro, self.accumulation = step_shape(learner, sequences_per_step, len(ranks))

    def plan(self, groups: list[Group]) -> StepPlan:
        """The step's schedule, made once here and handed to every rank."""
        return plan_for(self.learner, len(self.ranks), self.micro, self.accumulation, sequence_lengths(groups))

    def _get(self, refs: list[Any], what: str, timeout_s: float | None) -> list[Any]:
        """ray.get with a deadline; a rank that died or did not answer is a LearnerFault."""
        timeout_s = timeout_s if timeout_s is not None else self.step_timeout_s
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise LearnerFault(f"learner: {what} did not finish within {timeout_s:g} s") from None
        except ray.exceptions.RayError as e:
            if is_actor_gone(e):
                raise LearnerFault(f"learner: a rank died during {what} ({type(e).__name__})") from e
            raise

    def train(self, groups: list[Group], capture_gradients: bool = False, timeout_s: float | None = None,
              version: int | None = None) -> dict[str, Any]:
        """One update on every rank (each reads its slices of one shared copy); the
        metrics are already reduced over all ranks. version: the policy version the
        ranks hold (Learner.train_step)."""
        plan = self.plan(groups)
        ref = ray.put(groups)
        return self._get([r.train_step.remote(ref, plan, capture_gradients, version) for r in self.ranks],
                         "a train step", timeout_s)[0]

    def sft(self, examples: list[tuple], timeout_s: float | None = None) -> dict[str, float]:
        """One supervised step on every rank: (prompt ids, completion ids[, loss mask]) examples."""
        plan = plan_for(self.learner, len(self.ranks), self.micro, self.accumulation,
                        [len(e[0]) + len(e[1]) for e in examples])
        ref = ray.put(examples)
        return self._get([r.sft_step.remote(ref, plan) for r in self.ranks], "an SFT step", timeout_s)[0]

    def connect(self, generators: list[Any]) -> None:
        """Open the weight-transfer group between rank 0 and every generator's workers
        (the other ranks only join ZeRO-3's gathers). Replaces an earlier group."""
        worlds = ray.get([g.engine_world_size.remote() for g in generators], timeout=self.sync.timeout_s)
        self._get([r.connect_generators.remote(generators if i == 0 else None, worlds, self.sync)
                   for i, r in enumerate(self.ranks)], "connecting to the generators", self.sync.timeout_s * 2)

    def push(self, version: int, timeout_s: float | None = None) -> dict[str, float]:
        """Stream the weights to every generator, which then serve `version`."""
        return self._get([r.broadcast_weights.remote(version) for r in self.ranks], "a weight push", timeout_s)[0]

    def save_hf(self, path: str) -> str:
        return self._get([r.save_hf.remote(path) for r in self.ranks], "saving the model", None)[0]

    def save_checkpoint(self, path: str) -> None:
        self._get([r.save_checkpoint.remote(path) for r in self.ranks], "saving a checkpoint", None)

    def load_checkpoint(self, path: str, trust: bool = False) -> None:
        """Every rank loads its part; a file that would need unpickling arbitrary objects
        is refused (UnsafeCheckpoint, naming the file) unless `trust`."""
        try:
            self._get([r.load_checkpoint.remote(path, trust) for r in self.ranks], "loading a checkpoint", None)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UnsafeCheckpoint):
                raise UnsafeCheckpoint(str(e.cause)) from None
            raise

    def kill(self) -> None:
        for r in self.ranks:
            try:
                ray.kill(r, no_restart=True)
            except Exception:  # already gone
                pass
        if self.placement_group is not None:  # colocated: the pairs' group stays (factory.pairs)
            ray.util.remove_placement_group(self.placement_group)
