"""Actors that die or hang are replaced, not fatal: the supervisor creates, probes and
replaces generators and reward workers, and keeps the log of every fault.

A Ray actor restarted by Ray would re-run `__init__` with the initial model; here a
replacement is a fresh actor that receives the current weights before it samples
anything. A collective group cannot lose or gain a member, so after any change of
generators the weight-transfer group is rebuilt with all of them and the current
weights pushed to all. Weight pushes and rebuilds take one lock: the driver's regular
push and a replacement never interleave. The learner group is restarted by the driver
(from the last checkpoint): a DeepSpeed group cannot lose a rank either.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

import ray

from cluster.actors import placement
from cluster.config import Config
from cluster.actors.learners import LearnerGroup


class FaultLimit(RuntimeError):
    """More replacements of one kind of actor than faults.max_restarts allows."""


class LearnerFault(RuntimeError):
    """A learner rank died or did not answer in time: the group restarts from the last checkpoint."""


@dataclass
class Fault:
    kind: str  # "generator", "reward worker", "learner"
    index: int
    step: int
    cause: str
    at: float  # time.monotonic() when detected
    recovered_s: float | None = None  # seconds from detection to the next completed step

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        del out["at"]
        return out


def is_actor_gone(error: BaseException) -> bool:
    """Whether an error from a Ray call means the actor itself is dead or unreachable."""
    return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class Supervisor:
    def __init__(self, cfg: Config, model_path: str, generators: list[Any], learners: LearnerGroup,
                 version: int, log: Callable[[str], None] = print) -> None:
        self.cfg, self.model_path, self.log = cfg, model_path, log
        self.generators = generators
        self.learners = learners
        self.version = version  # what every live generator holds
        self.live = [True] * len(generators)
        self.faults: list[Fault] = []
        self.restarts: Counter = Counter()
        self.weights = threading.RLock()  # one push or group rebuild at a time
        self._state = threading.Lock()
        self._healing: threading.Thread | None = None
        self.on_generator_up: Callable[[int, Any], None] = lambda i, g: None
        self.on_generator_down: Callable[[int], None] = lambda i: None
        self.heal_error: BaseException | None = None
        self.step = 0  # the driver's current step, for the fault log

    # ---------------------------------------------------------------- faults
    def record(self, kind: str, index: int, cause: str) -> Fault:
        """Count a fault; past faults.max_restarts for its kind, the job fails naming it."""
        with self._state:
            fault = Fault(kind, index, self.step, cause, time.monotonic())
            self.faults.append(fault)
            self.restarts[kind] += 1
            count = self.restarts[kind]
        self.log(f"fault: {kind} {index} at step {self.step}: {cause}")
        if count > self.cfg.faults.max_restarts:
            raise FaultLimit(f"{kind} failed {count} times (faults.max_restarts={self.cfg.faults.max_restarts}); "
                             f"last: {kind} {index}: {cause}")
        return fault

    def step_done(self, step: int) -> dict[str, float]:
        """The fault counters of the step that just completed (and recovery times of the
        faults it completed after)."""
        now = time.monotonic()
        with self._state:
            fresh = [f for f in self.faults if f.recovered_s is None]
            for f in fresh:
                f.recovered_s = now - f.at
            self.step = step + 1
        out = {f"faults/{k.replace(' ', '_')}_restarts": float(sum(f.kind == k for f in fresh))
               for k in ("generator", "reward worker", "learner")}
        out["faults/seconds_lost"] = sum(f.recovered_s for f in fresh)
        return out

    # ------------------------------------------------------------ generators
    def generator_lost(self, index: int, cause: str) -> None:
        """A generator died or hung: its prompts go to the others (the pipeline), it is
        killed for sure, and replaced in the background."""
        if self._mark_down(index, cause):
            with self._state:
                if self._healing is None or not self._healing.is_alive():
                    self._healing = threading.Thread(target=self._heal, name="supervisor-heal", daemon=True)
                    self._healing.start()

    def _mark_down(self, index: int, cause: str) -> bool:
        with self._state:
            if not self.live[index]:
                return False
            self.live[index] = False
        self.on_generator_down(index)
        try:
            ray.kill(self.generators[index], no_restart=True)
        except Exception:  # already gone
            pass
        self.record("generator", index, cause)
        return True

    def _heal(self) -> None:
        try:
            with self.weights:  # read the version under the lock: a push by the driver may be under way
                self.push(self.version)  # replaces what is down, rebuilds the group, pushes to all
        except Exception as e:  # surfaced by the pipeline as its error
            self.heal_error = e
            self.log(f"fault: replacing generators failed: {e!r}")

    def push(self, version: int, reconnect: bool = False) -> dict[str, float]:
        """Stream `version` to every generator, replacing the dead or hung ones first (and
        any found while pushing); reconnect: rebuild the transfer group first (a new
        learner group). Raises LearnerFault when the learner is the one at fault."""
        with self.weights:
            for _ in range(self.cfg.faults.max_restarts + 2):
                replaced = self._replace_down()
                try:
                    if replaced or reconnect:
                        self.learners.connect(self.generators)
                        reconnect = False
                    sent = self.learners.push(version, timeout_s=self.cfg.faults.step_timeout_s)
                except Exception as e:
                    culprits = self._unhealthy()
                    for i, cause in culprits:
                        self._mark_down(i, f"{cause} (found while pushing version {version})")
                    if not culprits and all(self.live):  # every generator answers: the learner is at fault
                        raise LearnerFault(f"weight push of version {version} failed: {e!r}") from e
                    reconnect = True  # a generator was lost meanwhile (here or by the pipeline): retry
                    continue
                self.version = version
                for i in replaced:
                    self.on_generator_up(i, self.generators[i])
                return sent
            raise FaultLimit(f"weight push of version {version} kept failing")

    def _replace_down(self) -> list[int]:
        """Start a fresh actor for every generator that is down; -> their indices."""
        down = [i for i, up in enumerate(self.live) if not up]
        if not down:
            return []
        fresh = {i: placement.make_generator(self.model_path, self.cfg, i, self.version) for i in down}
        placement.wait_ready({f"generator {i} (replacement)": g for i, g in fresh.items()},
                             self.cfg.cluster.start_timeout_s)
        with self._state:
            for i, g in fresh.items():
                self.generators[i] = g
                self.live[i] = True
        return down

    def _unhealthy(self) -> list[tuple[int, str]]:
        """Generators that are dead or do not answer a probe in time."""
        refs = {g.health.remote(): i for i, g in enumerate(self.generators) if self.live[i]}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.cfg.faults.health_timeout_s)
        bad = [(refs[r], f"no answer to a health probe within {self.cfg.faults.health_timeout_s:g} s") for r in pending]
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:
                bad.append((refs[ref], f"died: {type(e).__name__}"))
        return bad

    def summary(self) -> dict[str, Any]:
        return {"counts": {k: int(v) for k, v in self.restarts.items()}, "faults": [f.record() for f in self.faults]}
