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

Rows can also be sampled beside the stream (`sample`: evaluations, a teacher's
samples), through the same generators, reward pool and fault handling; they never
count among the training fates. The pipeline handles no fault itself: what it sees
fail (a call that raised, a reward worker past its deadline) it reports to the
supervisor (FaultReporter), and it re-queues what the lost actor held.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from cluster.actors.faults import FaultReporter
from cluster.data import PromptStream
from cluster.flow.episodes import Conductor, EpisodeSettings, TurnRequest, add_env_rewards
from cluster.flow.reward_pool import RewardPool
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
    reward_deadline_s: float = 0.0
    """A reward worker holding a group longer than this is lost (0: no deadline;
    flow.reward_pool.reward_deadline_s computes it from the reward config)."""
    poll_s: float = 0.5
    episodes: EpisodeSettings | None = None
    """Multi-turn episodes (env.name set): every sample is an episode (cluster/flow/episodes.py)."""


@dataclass
class Side:
    """Rows sampled beside the training stream (an evaluation): scored groups by row."""

    size: int
    groups: dict[int, Group] = field(default_factory=dict)
    requeued: int = 0


@dataclass
class Ticket:
    """One prompt, from admission to its fate: a stream prompt of training batch
    `batch` (key = its place in the stream, >= 0), or row `index` of a side request
    (key < 0, batch None)."""

    key: int
    row: dict[str, Any]
    batch: int | None
    seeds: list[int]
    sampling: dict[str, Any] | None = None
    side: Side | None = None
    index: int = 0
    generator: int = -1
    admitted_at: float = 0.0
    group: Group | None = None
    """The group once generated (a prompt whose generator is lost before is requeued)."""
    episode: int | None = None
    """A turn of this episode (multi-turn): a one-sample request of the conductor's."""


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


class RolloutPipeline:
    def __init__(self, generators: list[Any], rewarders: list[Any], stream: PromptStream, settings: PipelineSettings,
                 log: Callable[[str], None] = print, faults: FaultReporter | None = None,
                 observe: Callable[[str], list[int]] | None = None) -> None:
        """faults: where a lost actor is reported (the supervisor, which replaces it and
        calls back generator_down / generator_up); None: a lost actor fails the run.
        observe: with settings.episodes, an observation's text -> its token ids."""
        self.generators, self.rewarders, self.stream, self.s = generators, rewarders, stream, settings
        self.episodes = None if settings.episodes is None else Conductor(settings.episodes, observe)
        self.log, self.faults = log, faults
        self._up = [True] * len(generators)
        self._orphans: list[Ticket] = []  # prompts of a lost generator, waiting for a live one
        if faults is not None:
            faults.on_generator_down = self.generator_down
            faults.on_generator_up = self.generator_up
        self._side_keys = itertools.count(-1, -1)
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
        self.requeued_turns_since_step = 0  # episodes' turns of a lost generator, sampled again elsewhere
        self.side_requeued = 0  # side-request prompts requeued (not part of the training fates)

    # ------------------------------------------------------------ driver side
    def publish(self, step: int, version: int) -> None:
        """The generators now hold the weights that train `step` (policy `version`)."""
        with self._lock:
            self._phase, self._version = step, version
            self._admit()  # here, not on the pipeline thread: it may be waiting on Ray for a while
            self._lock.notify_all()
        self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rollout-pipeline", daemon=True)
            self._thread.start()

    def sample(self, rows: list[dict[str, Any]], seeds: list[list[int]], sampling: dict[str, Any] | None,
               timeout_s: float) -> list[Group]:
        """Sample and score `rows` beside the training stream (evaluation, a teacher's
        samples): row i gets one sample per seed of seeds[i], with `sampling`. Through
        the same generators, reward pool and fault handling as training: a lost
        generator's rows go to the others. -> scored groups in row order (key = row index)."""
        side = Side(len(rows))
        with self._lock:
            self._check()
            for i, (row, row_seeds) in enumerate(zip(rows, seeds, strict=True)):
                ticket = Ticket(next(self._side_keys), row, None, list(row_seeds), sampling, side, i,
                                admitted_at=time.perf_counter())
                self._tickets[ticket.key] = ticket
                self._orphans.append(ticket)
            self._dispatch()
        self._start_thread()
        with self._lock:
            done = self._lock.wait_for(lambda: self._error is not None or len(side.groups) == side.size,
                                       timeout=timeout_s)
            self._check()
            if not done:
                raise PipelineError(f"{side.size - len(side.groups)} of {side.size} prompts not sampled and scored "
                                    f"within {timeout_s:g} s")
        self.side_requeued += side.requeued
        return [side.groups[i] for i in range(side.size)]

    def _check(self) -> None:
        if self._error is not None:
            raise PipelineError(f"rollout pipeline failed: {self._error!r}") from self._error

    def next_batch(self, step: int, timeout_s: float | None = None) -> Batch:
        """Step `step`'s batch, once complete (waits only as long as that takes)."""
        t0 = time.perf_counter()
        with self._lock:
            done = self._lock.wait_for(lambda: self._error is not None or self._complete(step), timeout=timeout_s)
            self._check()
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
            if self.episodes is not None:
                info["faults/requeued_turns"], self.requeued_turns_since_step = self.requeued_turns_since_step, 0
        dropped = {g.key: "no_signal" for g in state.dropped} | {g.key: "stale" for g in stale}
        return Batch(step, groups, sorted(state.kept + state.dropped, key=lambda g: g.key), info, dropped)

    def resume_cursor(self) -> int:
        """The stream position to resume from: the first prompt not yet trained or dropped."""
        with self._lock:
            return min((k for k in self._tickets if k >= 0), default=self.stream.cursor)

    def close(self) -> dict[str, int]:
        """Stop admitting, abort what the generators still hold; -> the fate of every prompt taken."""
        with self._lock:
            self._closed = True
            unfinished = sum(t.batch is not None for t in self._tickets.values())
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
                refs += list(self.episodes.pending) if self.episodes is not None else []
                ready, _ = ray.wait(refs, num_returns=1, timeout=self.s.poll_s) if refs else ([], [])
                for ref in ready:
                    self._handle(ref)
                if self.episodes is not None:
                    with self._lock:
                        self.episodes.flush(self.rewards)
                self._watch()
                if self.faults is not None:
                    self.faults.check()
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
            key = first + offset
            ticket = Ticket(key, row, step, sample_seeds(self.s.seed, "train", key, self.s.n),
                            admitted_at=time.perf_counter())
            self._tickets[ticket.key] = ticket
            self._batches[step].in_flight += 1
            self._orphans.append(ticket)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand every waiting prompt to the least-loaded live generator (lock held)."""
        live = [i for i, up in enumerate(self._up) if up]
        if not live or not self._orphans:
            return
        if self.episodes is not None:  # a prompt's samples are episodes: their turns are sampled
            self._orphans = [t for o in self._orphans for t in ([o] if o.episode is not None else self._episodes(o))]
        calls: dict[tuple[int, str], tuple[dict | None, list]] = {}  # (generator, sampling) -> jobs
        for ticket in self._orphans:
            ticket.generator = min(live, key=lambda i: (self._gen_load[i], i))
            self._gen_load[ticket.generator] += len(ticket.seeds)
            same = repr(sorted(ticket.sampling.items())) if ticket.sampling is not None else ""
            call = calls.setdefault((ticket.generator, same), (ticket.sampling, []))
            call[1].append((ticket.key, ticket.row, ticket.seeds))
        self._orphans = []
        for (i, _), (sampling, jobs) in calls.items():
            gen = self.generators[i]
            gen.submit.remote(jobs) if sampling is None else gen.submit.remote(jobs, sampling)

    def _episodes(self, ticket: Ticket) -> list[Ticket]:
        logprobs = (ticket.sampling or {}).get("logprobs", True)
        return [self._turn_ticket(t) for t in self.episodes.start(ticket.key, ticket.row, ticket.seeds,
                                                                  ticket.sampling, logprobs)]

    def _turn_ticket(self, turn: TurnRequest) -> Ticket:
        row = {"prompt": turn.prompt_ids} if turn.prompt_ids is not None else \
            dict(self._tickets[self.episodes.episodes[turn.episode].parent].row)
        ticket = Ticket(next(self._side_keys), row, None, [turn.seed], turn.sampling, episode=turn.episode,
                        admitted_at=time.perf_counter())
        self._tickets[ticket.key] = ticket
        return ticket

    def _more_turns(self, turns: list[TurnRequest], finished: list[int]) -> None:
        """The conductor's next turns to sample, and the prompts whose episodes are over
        to the reward pool (lock held)."""
        self._orphans += [self._turn_ticket(t) for t in turns]
        self._dispatch()
        for key in finished:
            ticket = self._tickets[key]
            ticket.group = self.episodes.group(key, "episodes")
            if ticket.batch is not None:
                self._batches[ticket.batch].last_generated = time.perf_counter()
            self._scoring[self.rewards.submit(ticket.group)] = key

    def generator_down(self, i: int) -> None:
        """Generator i is lost: the prompts it held (not yet returned) go to the others,
        with the same seeds; nothing is dropped."""
        with self._lock:
            if not self._up[i]:
                return
            self._up[i], self._gen_load[i] = False, 0
            for ref in [r for r, g in self._collecting.items() if g == i]:
                del self._collecting[ref]
            lost = [t for t in self._tickets.values() if t.generator == i and t.group is None]
            for t in lost:
                t.generator = -1
                if t.side is not None:
                    t.side.requeued += 1
            self._orphans += sorted(lost, key=lambda t: (t.batch is None, abs(t.key)))
            trained = sum(t.side is None and t.episode is None for t in lost)
            turns = sum(t.episode is not None for t in lost)
            if turns:
                self.episodes.counts["requeued_turns"] += turns
                self.requeued_turns_since_step += turns
            self.fates["requeued"] += trained
            self.requeued_since_step += trained
            self._dispatch()

    def generator_up(self, i: int, handle: Any) -> None:
        with self._lock:
            self.generators[i] = handle
            self._up[i], self._gen_load[i] = True, 0
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
        if self.episodes is not None and ref in self.episodes.pending:
            worker = self.episodes.pending[ref][0]
            try:
                results = ray.get(ref)
            except ray.exceptions.RayError as e:
                if self.faults is None:
                    raise
                return self._lost_reward_worker(worker, f"died ({type(e).__name__})")
            with self._lock:
                self._more_turns(*self.episodes.env_done(ref, results))
            return
        if ref not in self.rewards.pending:  # a lost worker's group, already sent elsewhere
            return
        key, worker = self._scoring.pop(ref), self.rewards.done(ref)
        try:
            group = ray.get(ref)[0]
        except ray.exceptions.RayError as e:
            if self.faults is None:
                raise
            return self._lost_reward_worker(worker, f"died ({type(e).__name__})", [(key, self._tickets[key].group)])
        check_scored(group, f"reward worker {worker}")
        if group.episode is not None:
            add_env_rewards(group)
            check_scored(group, "the environment's rewards")
        with self._lock:
            self._on_scored(key, group)

    def _lost_generator(self, i: int, cause: str, error: BaseException | None = None) -> None:
        if self.faults is None:
            raise error or PipelineError(f"generator {i}: {cause}")
        self.faults.generator_lost(i, cause)  # calls back generator_down, then replaces it

    def _lost_reward_worker(self, w: int, cause: str, held: list[tuple[int, Group]] = ()) -> None:
        """Reward worker w is lost: the groups it held are scored elsewhere (or by its
        replacement, which the supervisor starts)."""
        lost = list(held) + [(self._scoring.pop(ref), group) for ref, group in self.rewards.take_back(w)]
        self.rewards.replace(w, self.faults.reward_worker_lost(w, self.rewards.workers[w], cause))
        for key, group in lost:
            self._scoring[self.rewards.submit(group)] = key
        if self.episodes is not None:  # the environments it held are gone: their episodes are re-run
            with self._lock:
                self._more_turns(*self.episodes.worker_lost(w))

    def _watch(self) -> None:
        """A reward worker that holds a group past its deadline is lost (generators are
        probed by the supervisor)."""
        if self.faults is None:
            return
        for w in self.rewards.overdue(self.s.reward_deadline_s) if self.s.reward_deadline_s else []:
            self._lost_reward_worker(w, f"held a group for more than {self.s.reward_deadline_s:.0f} s")
        for w in self.episodes.overdue() if self.episodes is not None else []:
            self._lost_reward_worker(w, "held environment calls past their deadline (env.timeout_s per call)")

    def _on_generated(self, generator: int, group: Group) -> None:
        with self._lock:
            ticket = self._tickets.get(group.key)
            if ticket is None or ticket.generator != generator:
                return  # requeued meanwhile (its generator was declared lost): the other copy counts
            if ticket.episode is not None:  # one turn of an episode: on to its environment
                del self._tickets[group.key]
                self._gen_load[generator] -= 1
                return self._more_turns(self.episodes.turn_done(ticket.episode, group, f"generator {generator}"), [])
            check_sampled(group, f"generator {generator}", logprobs=(ticket.sampling or {}).get("logprobs", True))
            if len(group.samples) != len(ticket.seeds):
                raise BoundaryError(f"generator {generator}: prompt {group.key} has {len(group.samples)} samples, "
                                    f"not the {len(ticket.seeds)} asked for")
            ticket.group = group
            self._gen_load[generator] -= len(ticket.seeds)
            if ticket.batch is not None:
                self._batches[ticket.batch].last_generated = time.perf_counter()
        self._scoring[self.rewards.submit(group)] = group.key

    def _on_scored(self, key: int, group: Group) -> None:
        ticket = self._tickets[key]
        if ticket.side is not None:
            group.key = ticket.index
            ticket.side.groups[ticket.index] = group
            del self._tickets[key]
            return self._lock.notify_all()
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
