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
    """The group once generated (a prompt whose generator is lost before is requeued)."""


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
    dropped: dict[int, str] = field(default_factory=dict)
    """key -> why a sampled group was not trained on ("no_signal", "stale")."""


class PipelineError(RuntimeError):
    pass


class RewardPool:
    """Scored groups, one call each, on the reward worker with the fewest groups in hand
    (every worker is used, whatever the number of generators)."""

    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers
        self.load = [0] * len(workers)
        self.up = [True] * len(workers)
        self.pending: dict[Any, tuple[int, Group, float]] = {}  # ref -> (worker, group, sent at)

    def submit(self, group: Group) -> Any:
        w = min((i for i in range(len(self.workers)) if self.up[i]), key=lambda i: (self.load[i], i))
        self.load[w] += 1
        ref = self.workers[w].score.remote(group)
        self.pending[ref] = (w, group, time.monotonic())
        return ref

    def done(self, ref: Any) -> int:
        """The worker that held `ref` (now answered)."""
        w = self.pending.pop(ref)[0]
        self.load[w] -= 1
        return w

    def take_back(self, worker: int) -> list[tuple[Any, Group]]:
        """Worker lost: every group it held, to score elsewhere (-> (old ref, group))."""
        self.up[worker], self.load[worker] = False, 0
        lost = [(ref, g) for ref, (w, g, _) in self.pending.items() if w == worker]
        for ref, _ in lost:
            del self.pending[ref]
        return lost

    def overdue(self, deadline_s: float) -> list[int]:
        """Workers holding a group for longer than deadline_s (hung)."""
        now = time.monotonic()
        return sorted({w for w, _, sent in self.pending.values() if now - sent > deadline_s})


class RolloutPipeline:
    def __init__(self, generators: list[Any], rewarders: list[Any], stream: PromptStream, settings: PipelineSettings,
                 log: Callable[[str], None] = print, faults: Any = None) -> None:
        """faults: the Supervisor that replaces lost actors (None: a lost actor fails the run)."""
        self.generators, self.rewarders, self.stream, self.s = generators, rewarders, stream, settings
        self.log, self.sup = log, faults
        self._up = [True] * len(generators)
        self._orphans: list[Ticket] = []  # prompts of a lost generator, waiting for a live one
        self._probes: dict[int, tuple[Any, float]] = {}  # generator -> (health ref, sent at)
        self._next_probe = [0.0] * len(generators)
        if faults is not None:
            faults.on_generator_down = self._generator_down
            faults.on_generator_up = self._generator_up
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
        self.first_key = stream.cursor
        self.requeued_since_step = 0
        self.reward_deadline_s = 0.0
        if faults is not None:  # every sample of a group, every verifier at its timeout, at the worker's concurrency
            r = faults.cfg.rewards
            per_sample = sum(r.spec(name).timeout_s or r.timeout_s for name in r.verifiers)
            self.reward_deadline_s = per_sample * settings.n / r.concurrency + faults.cfg.faults.health_timeout_s

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
            info["faults/requeued_prompts"], self.requeued_since_step = self.requeued_since_step, 0
        dropped = {g.key: "no_signal" for g in state.dropped} | {g.key: "stale" for g in stale}
        return Batch(step, groups, sorted(state.kept + state.dropped, key=lambda g: g.key), info, dropped)

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
        live = [g for g, up in zip(self.generators, self._up) if up]
        try:
            ray.get([g.abort_all.remote() for g in live], timeout=60)
        except ray.exceptions.RayError as e:  # a generator lost at the very end: nothing left to abort
            self.log(f"could not abort the generators' last work: {e!r}")
        self.fates["unfinished"] += unfinished
        taken = self.stream.cursor - self.first_key
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
                ready, _ = ray.wait(refs, num_returns=1, timeout=self.s.poll_s) if refs else ([], [])
                for ref in ready:
                    self._handle(ref)
                self._watch()
                if self.sup is not None and self.sup.heal_error is not None:
                    raise self.sup.heal_error
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
        for offset, row in enumerate(self.stream.take(count)):
            ticket = Ticket(first + offset, row, step, admitted_at=time.perf_counter())
            self._tickets[ticket.key] = ticket
            self._batches[step].in_flight += 1
            self._orphans.append(ticket)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand every waiting prompt to the least-loaded live generator (lock held)."""
        live = [i for i, up in enumerate(self._up) if up]
        if not live or not self._orphans:
            return
        per_generator: dict[int, list] = defaultdict(list)
        for ticket in self._orphans:
            ticket.generator = min(live, key=lambda i: (self._gen_load[i], i))
            self._gen_load[ticket.generator] += self.s.n
            per_generator[ticket.generator].append(
                (ticket.key, ticket.row, sample_seeds(self.s.seed, "train", ticket.key, self.s.n)))
        self._orphans = []
        for i, jobs in per_generator.items():
            self.generators[i].submit.remote(jobs)

    def _generator_down(self, i: int) -> None:
        """Generator i is lost: the prompts it held (not yet returned) go to the others,
        with the same seeds; nothing is dropped."""
        with self._lock:
            if not self._up[i]:
                return
            self._up[i], self._gen_load[i] = False, 0
            self._probes.pop(i, None)
            for ref in [r for r, g in self._collecting.items() if g == i]:
                del self._collecting[ref]
            lost = [t for t in self._tickets.values() if t.generator == i and t.group is None]
            for t in lost:
                t.generator = -1
            self._orphans += sorted(lost, key=lambda t: t.key)
            self.fates["requeued"] += len(lost)
            self.requeued_since_step += len(lost)
            self._dispatch()

    def _generator_up(self, i: int, handle: Any) -> None:
        with self._lock:
            self.generators[i] = handle
            self._up[i], self._gen_load[i] = True, 0
            self._next_probe[i] = 0.0
            self._collecting[handle.collect.remote(self.s.poll_s)] = i
            self._dispatch()

    def _handle(self, ref: Any) -> None:
        if ref in self._collecting:
            i = self._collecting.pop(ref)
            try:
                groups = ray.get(ref)
            except ray.exceptions.RayError as e:
                return self._lost_generator(i, f"died ({type(e).__name__})", e)
            self._collecting[self.generators[i].collect.remote(self.s.poll_s)] = i
            for g in groups:
                self._on_generated(i, g)
            return
        if ref not in self.rewards.pending:  # a lost worker's group, already sent elsewhere
            return
        key, worker = self._scoring.pop(ref), self.rewards.done(ref)
        try:
            group = ray.get(ref)[0]
        except ray.exceptions.RayError as e:
            if self.sup is None:
                raise
            return self._lost_reward_worker(worker, f"died ({type(e).__name__})", [(key, self._tickets[key].group)])
        check_scored(group, f"reward worker {worker}")
        with self._lock:
            self._on_scored(key, group)

    def _lost_generator(self, i: int, cause: str, error: BaseException | None = None) -> None:
        if self.sup is None:
            raise error or PipelineError(f"generator {i}: {cause}")
        self.sup.generator_lost(i, cause)  # calls back _generator_down, then replaces it

    def _lost_reward_worker(self, w: int, cause: str, held: list[tuple[int, Group]] = ()) -> None:
        """Reward worker w is lost: the groups it held are scored elsewhere (or by its
        replacement); a fresh worker takes its place."""
        from cluster.actors import placement

        try:
            ray.kill(self.rewards.workers[w], no_restart=True)
        except Exception:
            pass
        lost = list(held) + [(self._scoring.pop(ref), group) for ref, group in self.rewards.take_back(w)]
        self.sup.record("reward worker", w, cause)
        self.rewards.workers[w] = placement.make_reward_worker(self.sup.cfg, w)
        self.rewards.up[w] = True  # its calls queue until it is up; the deadline covers its start
        for key, group in lost:
            self._scoring[self.rewards.submit(group)] = key

    def _watch(self) -> None:
        """Deadlines: a generator that does not answer a health probe in time (or whose
        engine stalls with work in hand), a reward worker that holds a group too long."""
        if self.sup is None:
            return
        f = self.sup.cfg.faults
        now = time.monotonic()
        for i in [i for i, up in enumerate(self._up) if up]:
            if i not in self._probes:
                if now >= self._next_probe[i]:
                    self._probes[i] = (self.generators[i].health.remote(), now)
                continue
            ref, sent = self._probes[i]
            if ray.wait([ref], timeout=0)[0]:
                del self._probes[i]
                self._next_probe[i] = now + f.health_interval_s
                try:
                    health = ray.get(ref)
                except ray.exceptions.RayError as e:
                    self._lost_generator(i, f"died ({type(e).__name__})", e)
                    continue
                if health["load"] and not health["updating"] and health["seconds_since_step"] > f.stall_timeout_s:
                    self._lost_generator(i, f"engine made no step for {health['seconds_since_step']:.0f} s with work in hand")
            elif now - sent > f.health_timeout_s:
                self._lost_generator(i, f"no answer to a health probe within {f.health_timeout_s:g} s")
        for w in self.rewards.overdue(self.reward_deadline_s):
            self._lost_reward_worker(w, f"held a group for more than {self.reward_deadline_s:.0f} s")

    def _on_generated(self, generator: int, group: Group) -> None:
        check_sampled(group, f"generator {generator}")
        with self._lock:
            ticket = self._tickets.get(group.key)
            if ticket is None or ticket.generator != generator:
                return  # requeued meanwhile (its generator was declared lost): the other copy counts
            if len(group.samples) != self.s.n:
                raise BoundaryError(f"generator {generator}: prompt {group.key} has {len(group.samples)} samples, "
                                    f"not rollout.n={self.s.n}")
            ticket.group = group
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
