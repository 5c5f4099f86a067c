"""Actors that die or hang are replaced, not fatal: the supervisor probes the
generators, replaces lost generators and reward workers, restarts nothing else by
itself, and keeps the log of every fault. It is the one home of fault handling: the
rollout pipeline reports what it sees fail (the FaultReporter protocol of faults.py)
and the train command restarts the learner group through it.

A Ray actor restarted by Ray would re-run `__init__` with the initial model; here a
replacement is a fresh actor (from the same ActorFactory) that receives the current
weights before it samples anything. A collective group cannot lose or gain a member,
so after any change of generators the weight-transfer group is rebuilt with all of
them and the current weights pushed to all. Weight pushes and rebuilds take one
lock: the driver's regular push and a replacement never interleave. Without a
learner group (grpo eval, a teacher's generators) a replacement starts from the
model the generators were started on, which is what they serve.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

import ray

from cluster.actors.faults import Fault, FaultLimit, LearnerFault
from cluster.actors.learners import LearnerGroup
from cluster.actors.placement import wait_ready
from cluster.config import FaultConfig

KINDS = ("generator", "reward worker", "learner")


class Supervisor:
    def __init__(self, faults: FaultConfig, start_timeout_s: float, factory: Any, generators: list[Any],
                 learners: LearnerGroup | None, version: int, log: Callable[[str], None] = print,
                 model_path: str | None = None) -> None:
        """factory: starts replacements (ActorFactory: generator(i, version, model_path),
        reward_worker(i)); model_path: what the generators were started on, when not the
        factory's (a teacher's generators)."""
        self.settings, self.start_timeout_s, self.factory, self.log = faults, start_timeout_s, factory, log
        self.model_path = model_path
        self.generators = generators
        self.learners = learners
        self.version = version  # what every live generator holds
        self.live = [True] * len(generators)
        self.faults: list[Fault] = []
        self.restarts: Counter = Counter()
        self.weights = threading.RLock()  # one push or group rebuild at a time
        self._state = threading.Lock()
        self._healing: threading.Thread | None = None
        self._starting: dict[int, Any] = {}  # replacements not yet up (killed by close)
        self.on_generator_up: Callable[[int, Any], None] = lambda i, g: None
        self.on_generator_down: Callable[[int], None] = lambda i: None
        self.heal_error: BaseException | None = None
        self.step = 0  # the driver's current step, for the fault log
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="supervisor-probes", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop probing and replacing (the actors that are up stay up): a replacement still
        starting is killed and its thread joined, so no thread of ours calls Ray after the
        command shuts it down (Ray's core worker then ends the process with status 1)."""
        self._stop.set()
        with self._state:
            starting = list(self._starting.values())
        for g in starting:
            try:
                ray.kill(g, no_restart=True)
            except Exception:  # already gone
                pass
        self._watcher.join(timeout=self.settings.health_timeout_s + 5)
        if self._healing is not None:
            self._healing.join(timeout=self.start_timeout_s + 5)

    # ---------------------------------------------------------------- faults
    def record(self, kind: str, index: int, cause: str) -> Fault:
        """Count a fault; past faults.max_restarts for its kind, the job fails naming it."""
        with self._state:
            fault = Fault(kind, index, self.step, cause, time.monotonic())
            self.faults.append(fault)
            self.restarts[kind] += 1
            count = self.restarts[kind]
        self.log(f"fault: {kind} {index} at step {self.step}: {cause}")
        if count > self.settings.max_restarts:
            raise FaultLimit(f"{kind} failed {count} times (faults.max_restarts={self.settings.max_restarts}); "
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
        out = {f"faults/{k.replace(' ', '_')}_restarts": float(sum(f.kind == k for f in fresh)) for k in KINDS}
        out["faults/seconds_lost"] = sum(f.recovered_s for f in fresh)
        return out

    def check(self) -> None:
        """Raise what failed in the background (replacing generators)."""
        if self.heal_error is not None:
            raise self.heal_error

    # ------------------------------------------------------------ reward workers
    def reward_worker_lost(self, index: int, handle: Any, cause: str) -> Any:
        """Reward worker `index` died or hung: killed for sure, counted; -> a fresh one
        (its calls queue until it is up; the caller's deadline covers its start)."""
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            pass
        self.record("reward worker", index, cause)
        return self.factory.reward_worker(index)

    # ------------------------------------------------------------ generators
    def sleep_generators(self) -> None:
        """Colocated on GPUs, before the learner's phase: every live generator frees its GPU
        memory (Generator.sleep); one that fails to, or does not answer within
        faults.health_timeout_s, is lost (replaced) like any other."""
        refs = {self.generators[i].sleep.remote(): i for i, up in enumerate(self.live) if up}
        for ref, i in refs.items():
            try:
                ray.get(ref, timeout=self.settings.health_timeout_s)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
                error = getattr(e, "cause", None) or e  # a RayTaskError's own exception, not its traceback
                self.generator_lost(i, f"could not sleep before the learner's phase: {type(error).__name__}: {error}"[:300])

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
                if self.learners is None:
                    for i in self._replace_down():
                        self.on_generator_up(i, self.generators[i])
                else:
                    self.push(self.version)  # replaces what is down, rebuilds the group, pushes to all
        except Exception as e:  # surfaced by the pipeline as its error
            if self._stop.is_set():  # closed while a replacement started: nobody needs it
                return
            self.heal_error = e
            self.log(f"fault: replacing generators failed: {e!r}")

    def push(self, version: int, reconnect: bool = False) -> dict[str, float]:
        """Stream `version` to every generator, replacing the dead or hung ones first (and
        any found while pushing); reconnect: rebuild the transfer group first (a new
        learner group). Raises LearnerFault when the learner is the one at fault."""
        with self.weights:
            for _ in range(self.settings.max_restarts + 2):
                replaced = self._replace_down()
                try:
                    if replaced or reconnect:
                        self.learners.connect(self.generators)
                        reconnect = False
                    sent = self.learners.push(version, timeout_s=self.settings.step_timeout_s)
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

    def replace_learners(self, learners: LearnerGroup, version: int) -> None:
        """A new learner group (restarted from a checkpoint) takes over: the generators are
        reconnected to it and get its weights, `version`; lost generators are replaced."""
        self.learners = learners
        self.push(version, reconnect=True)

    def _replace_down(self) -> list[int]:
        """Start a fresh actor for every generator that is down; -> their indices."""
        down = [i for i, up in enumerate(self.live) if not up]
        if not down:
            return []
        fresh = {i: self.factory.generator(i, self.version, self.model_path) for i in down}
        with self._state:
            self._starting = dict(fresh)
        try:
            if self._stop.is_set():
                raise RuntimeError("supervisor closed")
            wait_ready({f"generator {i} (replacement)": g for i, g in fresh.items()}, self.start_timeout_s)
        except BaseException:
            for g in fresh.values():
                try:
                    ray.kill(g, no_restart=True)
                except Exception:
                    pass
            raise
        finally:
            with self._state:
                self._starting = {}
        with self._state:
            for i, g in fresh.items():
                self.generators[i] = g
                self.live[i] = True
        return down

    def _unhealthy(self) -> list[tuple[int, str]]:
        """Generators that are dead or do not answer a probe in time."""
        timeout = self.settings.health_timeout_s
        refs = {g.health.remote(): i for i, g in enumerate(self.generators) if self.live[i]}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        bad = [(refs[r], f"no answer to a health probe within {timeout:g} s") for r in pending]
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:
                bad.append((refs[ref], f"died: {type(e).__name__}"))
        return bad

    # ------------------------------------------------------------ probes
    def _watch(self) -> None:
        """Every faults.health_interval_s, probe each live generator: one that does not
        answer within faults.health_timeout_s, or whose engine made no step for
        faults.stall_timeout_s with work in hand, is lost."""
        f = self.settings
        probes: dict[int, tuple[Any, Any, float]] = {}  # generator -> (health ref, the handle probed, sent at)
        next_probe: dict[int, float] = {}
        while not self._stop.wait(min(0.5, f.health_interval_s)):
            now = time.monotonic()
            for i in [i for i, up in enumerate(self.live) if up]:
                handle = self.generators[i]
                if i not in probes or probes[i][1] is not handle:  # none in flight for this actor
                    if now >= next_probe.get(i, 0.0):
                        probes[i] = (handle.health.remote(), handle, now)
                    continue
                ref, _, sent = probes[i]
                if ray.wait([ref], timeout=0)[0]:
                    del probes[i]
                    next_probe[i] = now + f.health_interval_s
                    self._judge(i, ref)
                elif now - sent > f.health_timeout_s:
                    del probes[i]
                    self._lost_quietly(i, f"no answer to a health probe within {f.health_timeout_s:g} s")

    def _judge(self, i: int, ref: Any) -> None:
        try:
            health = ray.get(ref)
        except ray.exceptions.RayError as e:
            return self._lost_quietly(i, f"died ({type(e).__name__})")
        if health["load"] and not health["updating"] and health["seconds_since_step"] > self.settings.stall_timeout_s:
            self._lost_quietly(i, f"engine made no step for {health['seconds_since_step']:.0f} s with work in hand")

    def _lost_quietly(self, i: int, cause: str) -> None:
        """generator_lost from the probe thread: a fault limit reached here is surfaced
        by the pipeline (check), not lost with the thread."""
        try:
            self.generator_lost(i, cause)
        except Exception as e:
            self.heal_error = e

    def summary(self) -> dict[str, Any]:
        return {"counts": {k: int(v) for k, v in self.restarts.items()}, "faults": [f.record() for f in self.faults]}
