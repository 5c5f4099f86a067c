"""CPU: an update is received off the engine loop, into the arena each worker keeps
across syncs (rollout/weight_sync.py), while the engine keeps sampling; only the load,
between two engine steps, pauses it. With rollout.partial=off, the load waits for the
requests in flight to finish (and no new one starts from `start` on)."""
from __future__ import annotations

import time
from typing import Any

from rollout.engine_loop import EngineLoop


class OffLoopReceiver:
    def __init__(self, loop: EngineLoop, partial: bool) -> None:
        self.loop, self.partial = loop, partial
        self.drain_before_load = not partial

    def start(self) -> None:
        self.loop.hold_new_requests(not self.partial)

    def receive(self, update_info: dict[str, Any]) -> None:
        self.loop.llm.collective_rpc("receive_weights_only", args=(update_info,))

    def load(self) -> float:
        paused_at = time.perf_counter()
        self.loop.llm.start_weight_update()
        self.loop.llm.collective_rpc("load_received_weights")
        return paused_at
