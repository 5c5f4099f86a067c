"""The learner's handle on all generators during a weight sync (a WeightSyncClient)."""
from __future__ import annotations

from typing import Any

import ray


class GeneratorsClient:
    """Fans the four weight-sync calls out to every generator actor, each with a deadline
    (timeout_s: the sync section's).

    vLLM's stock client gives every engine rank_offset=1, so two engines' ranks
    collide; here engine i gets 1 + (sum of the worker counts before it)."""

    def __init__(self, generators: list[Any], engine_world_sizes: list[int], timeout_s: float) -> None:
        self.generators, self.timeout_s = generators, timeout_s
        self.offsets = [1 + sum(engine_world_sizes[:i]) for i in range(len(generators))]
        self.world_size = 1 + sum(engine_world_sizes)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        ray.get(
            [
                g.init_weight_transfer_engine.remote(
                    dict(init_info, rank_offset=offset, world_size=self.world_size)
                )
                for g, offset in zip(self.generators, self.offsets)
            ],
            timeout=self.timeout_s,
        )

    def start_weight_update(self) -> None:
        ray.get([g.start_weight_update.remote() for g in self.generators], timeout=self.timeout_s)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        ray.get([g.update_weights.remote(update_info) for g in self.generators], timeout=self.timeout_s)

    def finish_weight_update(self, weight_version: int) -> None:
        # Without partial rollouts the update waits for the requests in flight: allow for them.
        ray.get([g.finish_weight_update.remote(weight_version) for g in self.generators], timeout=self.timeout_s * 5)
