"""GPU: the engine stops stepping from `start` (after the requests in flight finish,
with rollout.partial=off) to the finish, while buckets stream straight into the model
through vLLM's update_weights (the next bucket arrives while one loads)."""
from __future__ import annotations

import time
from typing import Any

from rollout.engine_loop import EngineLoop


class StreamingReceiver:
    drain_before_load = False  # `start` drained already

    def __init__(self, loop: EngineLoop, partial: bool) -> None:
        self.loop, self.partial = loop, partial
        self.paused_at = 0.0

    def start(self) -> None:
        def start() -> None:
            self.paused_at = time.perf_counter()
            self.loop.llm.start_weight_update()
            self.loop.pause_steps()

        self.loop.run(start, drain=not self.partial)

    def receive(self, update_info: dict[str, Any]) -> None:
        self.loop.run(lambda: self.loop.llm.update_weights({"update_info": update_info}))

    def load(self) -> float:
        return self.paused_at  # loaded as the buckets arrived
