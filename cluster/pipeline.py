"""The rollout pipeline: which prompts start when, where they are sampled and scored,
and which scored groups form each step's batch.

It runs in its own thread of the driver. Prompts are taken from the stream in order
and assigned, at admission, to the batch (step) that will train on them. Step b's
prompts may start only while the generators hold the weights of step c >= b - S
(S = run.max_staleness): a sample is then trained at most S policy versions after
the oldest version that produced it. With S = 0 this is the synchronous loop: step
b's prompts start once the weights of step b are published. Admission is paced, so
no sample ever has to be discarded for staleness (discarding would bias batches
toward short answers, which finish first).

A prompt's samples are generated on the least-loaded generator; the finished group
goes straight to the least-loaded reward worker, and from there into its batch.
With dynamic sampling, groups whose rewards are all equal are dropped and the batch
is refilled in rounds (a round starts once the previous one is scored), at most
run.max_sampling_rounds rounds per batch.

Every prompt taken from the stream is trained on, dropped with a reason, or still in
flight when the run ends: all three are counted.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from cluster.data import PromptStream
from rollout.seeds import sample_seeds
from rollout.types import BoundaryError, Group, check_sampled, check_scored


@dataclass
class PipelineSettings:
    prompts_per_step: int
    n: int
    max_staleness: int
    dynamic_sampling: bool
    max_sampling_rounds: int
    seed: int
    total_steps: int
    """No prompt is admitted for a step at or beyond this one."""
    poll_s: float = 0.5


@dataclass
class Ticket:
    """One prompt from the stream, from admission to its fate."""

    key: int
    row: dict[str, Any]
    batch: int
    generator: int = -1
    admitted_at: float = 0.0
    group: Group | None = None


@dataclass
class BatchState:
    rounds: int = 0
    in_flight: int = 0
    kept: list[Group] = field(default_factory=list)
    dropped: list[Group] = field(default_factory=list)
    first_admit: float | None = None
    last_generated: float = 0.0
    last_scored: float = 0.0


@dataclass
class Batch:
    step: int
    groups: list[Group]
    """The groups to train on, in stream order."""
    sampled: list[Group]
    """Every group sampled for this step (dropped ones included), for the reward metrics."""
    info: dict[str, float]


class PipelineError(RuntimeError):
    pass


class RewardPool:
    """Scored groups, one call each, on the reward worker with the fewest groups in hand
    (every worker is used, whatever the number of generators)."""

    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers
        self.load = [0] * len(workers)
        self.pending: dict[Any, int] = {}

    def submit(self, group: Group) -> Any:
        w = min(range(len(self.workers)), key=lambda i: (self.load[i], i))
        self.load[w] += 1
        ref = self.workers[w].score.remote(group)
        self.pending[ref] = w
        return ref

    def done(self, ref: Any) -> int:
        """The worker that held `ref` (now answered)."""
        w = self.pending.pop(ref)
        self.load[w] -= 1
        return w


class RolloutPipeline:
    def __init__(self, generators: list[Any], rewarders: list[Any], stream: PromptStream, settings: PipelineSettings,
                 log: Callable[[str], None] = print) -> None:
        self.generators, self.rewarders, self.stream, self.s = generators, rewarders, stream, settings
        self.log = log
        self._lock = threading.Condition()
        self._phase = -1  # the step whose weights the generators hold (-1: not started)
        self._returned = -1  # the last step whose batch next_batch handed out
        self._version = 0
        self._batches: dict[int, BatchState] = defaultdict(BatchState)
        self._tickets: dict[int, Ticket] = {}
        self._gen_load = [0] * len(generators)
        self.rewards = RewardPool(rewarders)
        self._collecting: dict[Any, int] = {}  # collect ref -> generator index
        self._scoring: dict[Any, int] = {}  # score ref -> ticket key
        self.fates: Counter = Counter()
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._first_key = stream.cursor

    # ------------------------------------------------------------ driver side
    def publish(self, step: int, version: int) -> None:
        """The generators now hold the weights that train `step` (policy `version`)."""
        with self._lock:
            self._phase, self._version = step, version
            self._admit()  # here, not on the pipeline thread: it may be waiting on Ray for a while
            self._lock.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rollout-pipeline", daemon=True)
            self._thread.start()

    def next_batch(self, step: int, timeout_s: float | None = None) -> Batch:
        """Step `step`'s batch, once complete (waits only as long as that takes)."""
        t0 = time.perf_counter()
        with self._lock:
            done = self._lock.wait_for(lambda: self._error is not None or self._complete(step), timeout=timeout_s)
            if self._error is not None:
                raise PipelineError(f"rollout pipeline failed: {self._error!r}") from self._error
            if not done:
                raise PipelineError(f"step {step}: batch not complete after {timeout_s} s")
            state = self._batches.pop(step)
            self._returned = step
            groups, stale = [], []
            for g in sorted(state.kept, key=lambda g: g.key):
                del self._tickets[g.key]
                # Pacing makes this impossible (weights reach the generators before
                # admissions they allow); a sample past the bound is never trained on.
                oldest = min(s.version for s in g.samples)
                (stale if self._version - oldest > self.s.max_staleness else groups).append(g)
            if stale:
                self.fates["dropped/stale"] += len(stale)
                self.log(f"step {step}: {len(stale)} group(s) past run.max_staleness={self.s.max_staleness} dropped")
            self.fates["trained"] += len(groups)
            info = self._batch_info(state, groups, time.perf_counter() - t0)
            info["groups_stale"] = len(stale)
        return Batch(step, groups, sorted(state.kept + state.dropped, key=lambda g: g.key), info)

    def resume_cursor(self) -> int:
        """The stream position to resume from: the first prompt not yet trained or dropped."""
        with self._lock:
            return min(self._tickets, default=self.stream.cursor)

    def close(self) -> dict[str, int]:
        """Stop admitting, abort what the generators still hold; -> the fate of every prompt taken."""
        with self._lock:
            self._closed = True
            unfinished = len(self._tickets)
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        ray.get([g.abort_all.remote() for g in self.generators], timeout=60)
        self.fates["unfinished"] += unfinished
        taken = self.stream.cursor - self._first_key
        return {"taken": taken, **{k: int(v) for k, v in self.fates.items()}}

    # -------------------------------------------------------- pipeline thread
    def _run(self) -> None:
        try:
            for i, g in enumerate(self.generators):
                self._collecting[g.collect.remote(self.s.poll_s)] = i
            while True:
                with self._lock:
                    if self._closed:
                        return
                    self._admit()
                refs = list(self._collecting) + list(self.rewards.pending)
                ready, _ = ray.wait(refs, num_returns=1, timeout=self.s.poll_s)
                for ref in ready:
                    self._handle(ref)
        except BaseException as e:  # surfaced in next_batch
            with self._lock:
                self._error = e
                self._lock.notify_all()

    def _complete(self, step: int) -> bool:
        state = self._batches.get(step)
        if state is None or state.in_flight or state.rounds == 0:
            return False
        return len(state.kept) >= self.s.prompts_per_step or not self._may_refill(state)

    def _may_refill(self, state: BatchState) -> bool:
        return self.s.dynamic_sampling and state.rounds < self.s.max_sampling_rounds

    def _admit(self) -> None:
        """Start every prompt the staleness bound allows (called with the lock held)."""
        if self._phase < 0:
            return
        first = max(self._phase, self._returned + 1)
        for step in range(first, min(self._phase + self.s.max_staleness + 1, self.s.total_steps)):
            state = self._batches[step]
            if state.in_flight or len(state.kept) >= self.s.prompts_per_step:
                continue
            if state.rounds and not self._may_refill(state):
                continue
            need = self.s.prompts_per_step - len(state.kept)
            state.rounds += 1
            state.first_admit = state.first_admit or time.perf_counter()
            self._start(step, need)

    def _start(self, step: int, count: int) -> None:
        first = self.stream.cursor
        rows = self.stream.take(count)
        per_generator: dict[int, list] = defaultdict(list)
        for offset, row in enumerate(rows):
            ticket = Ticket(first + offset, row, step, admitted_at=time.perf_counter())
            ticket.generator = min(range(len(self.generators)), key=lambda i: (self._gen_load[i], i))
            self._gen_load[ticket.generator] += self.s.n
            self._tickets[ticket.key] = ticket
            self._batches[step].in_flight += 1
            per_generator[ticket.generator].append(
                (ticket.key, row, sample_seeds(self.s.seed, "train", ticket.key, self.s.n)))
        for i, jobs in per_generator.items():
            self.generators[i].submit.remote(jobs)

    def _handle(self, ref: Any) -> None:
        if ref in self._collecting:
            i = self._collecting.pop(ref)
            groups = ray.get(ref)
            self._collecting[self.generators[i].collect.remote(self.s.poll_s)] = i
            for g in groups:
                self._on_generated(i, g)
            return
        key, worker = self._scoring.pop(ref), self.rewards.done(ref)
        group = ray.get(ref)[0]
        check_scored(group, f"reward worker {worker}")
        with self._lock:
            self._on_scored(key, group)

    def _on_generated(self, generator: int, group: Group) -> None:
        check_sampled(group, f"generator {generator}")
        with self._lock:
            ticket = self._tickets.get(group.key)
            if ticket is None or ticket.generator != generator:
                raise BoundaryError(f"generator {generator} returned prompt {group.key}, which it was not given")
            if len(group.samples) != self.s.n:
                raise BoundaryError(f"generator {generator}: prompt {group.key} has {len(group.samples)} samples, "
                                    f"not rollout.n={self.s.n}")
            self._gen_load[generator] -= self.s.n
            self._batches[ticket.batch].last_generated = time.perf_counter()
        self._scoring[self.rewards.submit(group)] = group.key

    def _on_scored(self, key: int, group: Group) -> None:
        ticket = self._tickets[key]
        state = self._batches[ticket.batch]
        state.in_flight -= 1
        state.last_scored = time.perf_counter()
        if self.s.dynamic_sampling and max(group.rewards) == min(group.rewards):
            state.dropped.append(group)
            self.fates["dropped/no_signal"] += 1
            del self._tickets[key]
        else:
            state.kept.append(group)
        self._lock.notify_all()

    def _batch_info(self, state: BatchState, groups: list[Group], waited: float) -> dict[str, float]:
        stale = [self._version - s.version for g in groups for s in g.samples]
        start = state.first_admit or time.perf_counter()
        return {
            "sampling_rounds": state.rounds, "groups_dropped": len(state.dropped),
            "staleness/mean": sum(stale) / len(stale) if stale else 0.0, "staleness/max": max(stale, default=0),
            "time/generate": max(state.last_generated - start, 0.0),
            "time/reward": max(state.last_scored - state.last_generated, 0.0),
            "time/wait_batch": waited,
        }
