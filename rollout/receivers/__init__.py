"""How a generator's engine takes in a weight update: one interface, one short module
per backend, chosen by platform. The Generator does everything the backends share
(the transfer engine's set-up, the finish that makes the new weights serve, timings);
a receiver holds only what differs:

- offloop (CPU): the update is received off the engine loop into a kept arena while the
  engine keeps sampling; only the load pauses it (sync/pause);
- streaming (GPU): the engine pauses from start to finish while buckets stream straight
  into the model.
"""
from __future__ import annotations

from typing import Any, Protocol

from rollout.engine import cpu_platform
from rollout.engine_loop import EngineLoop
from rollout.receivers.offloop import OffLoopReceiver
from rollout.receivers.streaming import StreamingReceiver


class WeightReceiver(Protocol):
    """The backend part of one update, called in order by the Generator's
    start_weight_update, update_weights and finish_weight_update."""

    drain_before_load: bool
    """Whether `load` waits for the requests in flight to finish."""

    def start(self) -> None:
        """An update begins; with rollout.partial=off, no new request starts from here
        until it has landed."""

    def receive(self, update_info: dict[str, Any]) -> None:
        """Blocks until every bucket of the update has arrived."""

    def load(self) -> float:
        """On the loop thread, between engine steps: the received weights are in the
        model once this returns (vLLM's finish_weight_update still to come);
        -> the perf_counter time sampling stopped for this update."""


def receiver_for_platform(loop: EngineLoop, partial: bool) -> WeightReceiver:
    """CPU engines receive updates into a kept buffer off the engine loop (see
    rollout/weight_sync.py); GPU engines stream buckets straight into the model."""
    return OffLoopReceiver(loop, partial) if cpu_platform() else StreamingReceiver(loop, partial)
