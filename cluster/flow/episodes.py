"""Multi-turn episodes: the conductor that drives each one (env.name set).

An episode is one sample of a prompt, in turns. The pipeline asks a generator for one
model turn (token ids in, stopped at env.stop), the turn's text goes to the episode's
environment in a reward worker (rewards/env_host.py), and the observation that comes
back is tokenised on its own (rollout/tokens.py observation_ids) and appended to the
exact ids sampled so far; the next turn is sampled from those ids. The conversation is
never re-tokenised from text: each turn checks that the ids vLLM received
(`prompt_token_ids`) are the ones sent.

Model tokens carry their behaviour logprobs and loss_mask 1; observation tokens carry
mask 0 (and logprob 0.0, never read). Each turn records the policy versions that
produced it (so staleness counts the oldest). Turn t of attempt a of a sample draws
with a seed derived from the sample's seed, t and a (the first turn of the first attempt
with the sample's own seed), so a re-run samples anew, reproducibly.

When every episode of a prompt is over, the prompt's group goes to the reward pool:
the verifiers score each episode's whole text; the environment's own reward is added
(`add_env_rewards`, logged as rewards/env).
"""
from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from rewards.protocol import plain
from rollout.seeds import derive_seed
from rollout.types import BoundaryError, Group, Sample, check_sampled

ID_BITS = 32
"""An environment knows an episode's attempt by `attempt << ID_BITS | episode` (env_key):
a late answer of an earlier attempt never lands on its re-run."""


def _count(value: Any) -> int:
    """An environment's count in `info` (tool_call, tool_error): a finite number, else 0."""
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0


@dataclass
class EpisodeSettings:
    max_turns: int
    max_episode_tokens: int
    stop: list[str]
    max_tokens: int
    """rollout.max_tokens: the bound of one turn (a side request's own max_tokens wins)."""
    max_attempts: int = 3
    timeout_s: float = 30.0
    """env.timeout_s: one environment call."""
    concurrency: int = 1
    """rewards.concurrency: environment processes per reward worker."""
    slack_s: float = 15.0
    """Added to a batch's deadline (its worker's start, a probe)."""

    def deadline_s(self, per_slot: int) -> float:
        """How long a reward worker may take over a batch of environment calls whose
        busiest process holds `per_slot` of them (a process answers its episodes one
        at a time): each at reset + step + close timeouts, plus slack."""
        return 3 * self.timeout_s * per_slot + self.slack_s


@dataclass
class Episode:
    id: int
    parent: int
    """The key of the prompt's ticket."""
    k: int
    """The sample's index in its group."""
    seed: int
    sampling: dict[str, Any] | None
    logprobs: bool
    attempt: int = 0
    worker: int = -1
    """The reward worker its environment lives on (-1: none yet)."""
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    versions: list[tuple[int, int]] = field(default_factory=list)
    segments: list[list] = field(default_factory=list)
    """[text, 1 for a model turn / 0 for an observation], in order."""
    turns: int = 0
    received: list[int] = field(default_factory=list)
    """Per turn, how many prompt ids the engine received (checked equal to those sent)."""
    finish: str = "stop"
    stats: Counter = field(default_factory=Counter)
    reward: float = 0.0
    outcome: str = "done"
    """How it ended: done (the environment ended it), max_turns, max_tokens, timeout, error, abandoned."""
    sample: Sample | None = None

    def restart(self) -> None:
        self.attempt += 1
        self.worker, self.ids, self.lps, self.mask, self.versions, self.segments = -1, [], [], [], [], []
        self.turns, self.reward, self.finish, self.received = 0, 0.0, "stop", []
        reruns, env_s = self.stats["reruns"] + 1, self.stats["env_seconds"]
        self.stats = Counter(reruns=reruns, env_seconds=env_s)

    @property
    def env_key(self) -> int:
        """This attempt's name at its environment."""
        return self.attempt << ID_BITS | self.id

    def turn_seed(self) -> int:
        return self.seed if self.turns == 0 and self.attempt == 0 else derive_seed(self.seed, "turn", self.turns,
                                                                                     self.attempt)


@dataclass
class TurnRequest:
    """One model turn to sample: the episode, the ids so far, its seed and sampling."""

    episode: int
    prompt_ids: list[int] | None
    """None: the first turn, from the prompt's own row."""
    seed: int
    sampling: dict[str, Any]


class Conductor:
    def __init__(self, settings: EpisodeSettings, observe: Callable[[str], list[int]]) -> None:
        """observe: an observation's text -> its ids (rollout.tokens.observation_ids)."""
        self.s, self.observe = settings, observe
        self.episodes: dict[int, Episode] = {}
        self.by_parent: dict[int, list[Episode]] = {}
        self.rows: dict[int, dict[str, Any]] = {}
        self.outbox: list[tuple[Episode, dict[str, Any]]] = []  # environment calls not yet sent
        self.pending: dict[Any, tuple[int, list[int], float]] = {}  # ref -> (worker, episode ids, deadline)
        self.counts: Counter = Counter()  # reruns, abandoned, timeouts, requeued turns: over the run
        self._ids = itertools.count()

    # ------------------------------------------------------------ turns
    def start(self, key: int, row: dict[str, Any], seeds: list[int], sampling: dict[str, Any] | None,
              logprobs: bool) -> list[TurnRequest]:
        """A prompt's n episodes -> their first turns."""
        self.rows[key] = row
        eps = [Episode(next(self._ids), key, k, seed, sampling, logprobs) for k, seed in enumerate(seeds)]
        self.by_parent[key] = eps
        for e in eps:
            self.episodes[e.id] = e
        return [self._turn(e) for e in eps]

    def _turn(self, e: Episode) -> TurnRequest:
        base = dict(e.sampling or {})
        left = self.s.max_episode_tokens - len(e.ids)
        base.update(stop=list(self.s.stop) or None, max_tokens=min(base.get("max_tokens", self.s.max_tokens), left))
        return TurnRequest(e.id, (e.prompt_ids + e.ids) if e.turns else None, e.turn_seed(), base)

    def turn_done(self, episode: int, group: Group, source: str) -> list[TurnRequest]:
        """A turn sampled (a one-sample group) -> turns to sample now (none: the turn
        went to its environment, whose call is in the outbox)."""
        e = self.episodes[episode]
        check_sampled(group, source, logprobs=e.logprobs)
        sent = e.prompt_ids + e.ids if e.turns else None
        if sent is not None and list(group.prompt_ids) != sent:
            raise BoundaryError(f"{source}: episode {e.id} turn {e.turns + 1}: the engine received other token ids "
                                f"than the {len(sent)} sent (the conversation must never be re-tokenised)")
        if not e.turns:
            e.prompt_ids = list(group.prompt_ids)
        e.received.append(len(group.prompt_ids))
        [s] = group.samples
        at = len(e.ids)
        e.versions += [(v, at + i) for v, i in s.versions]
        e.ids += s.completion_ids
        e.lps += s.logprobs
        e.mask += [1] * len(s.completion_ids)
        e.segments.append([s.text, 1])
        e.turns += 1
        e.finish = s.finish_reason
        request = {"episode": e.env_key, "turn": s.text}
        if e.turns == 1:
            request["row"] = plain(self.rows[e.parent])  # a field msgpack cannot carry must not fail the reset
        if e.turns >= self.s.max_turns or len(e.ids) >= self.s.max_episode_tokens:
            request["close"] = True  # its reward still counts; nothing follows it
        self.outbox.append((e, request))
        return []

    # ------------------------------------------------------------ the environment
    def flush(self, pool: Any) -> None:
        """Send the outbox: one call per reward worker (an episode stays on its worker)."""
        by_worker: dict[int, list[tuple[Episode, dict]]] = {}
        for e, request in self.outbox:
            if e.worker < 0 or not pool.up[e.worker]:
                live = [i for i in range(len(pool.workers)) if pool.up[i]]
                e.worker = min(live, key=lambda i: (sum(len(v) for w, v, _ in self.pending.values() if w == i)
                                                    + len(by_worker.get(i, [])), i))
            by_worker.setdefault(e.worker, []).append((e, request))
        self.outbox = []
        for w, calls in by_worker.items():
            ref = pool.workers[w].env_steps.remote([r for _, r in calls])
            # a worker answers its calls one after another: this one's clock starts when the last ends
            start = max([time.monotonic()] + [d for worker, _, d in self.pending.values() if worker == w])
            busiest = max(Counter(r["episode"] % self.s.concurrency for _, r in calls).values())
            self.pending[ref] = (w, [r["episode"] for _, r in calls], start + self.s.deadline_s(busiest))

    def _current(self, key: int) -> Episode | None:
        """The episode whose current attempt `key` names (None: gone, or an earlier attempt)."""
        e = self.episodes.get(key & (1 << ID_BITS) - 1)
        return e if e is not None and e.env_key == key else None

    def env_done(self, ref: Any, results: list[dict[str, Any]]) -> tuple[list[TurnRequest], list[int]]:
        """A reward worker's answers -> (turns to sample, prompts whose episodes are all over)."""
        w, keys, _ = self.pending.pop(ref)
        turns, finished = [], []
        for key, r in zip(keys, results, strict=True):
            if r["episode"] != key:
                raise BoundaryError(f"reward worker {w}: answered episode {r['episode']} for {key}")
            e = self._current(key)
            if e is None or e.sample is not None:  # an earlier attempt's answer, or a closing call's
                continue
            e.stats["env_seconds"] += r["seconds"]
            turns += self._answer(e, r, finished)
        return turns, finished

    def _answer(self, e: Episode, r: dict[str, Any], finished: list[int]) -> list[TurnRequest]:
        if r["kind"] == "lost":
            return self._rerun(e, finished)
        if r["kind"] != "ok":
            e.stats["timeouts" if r["kind"] == "timeout" else "errors"] += 1
            return self._end(e, r["kind"], finished)
        reward = r["reward"]
        if not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise BoundaryError(f"reward worker {e.worker}: episode {e.id}: a non-finite environment reward {reward!r}")
        e.reward += float(reward)
        e.stats["tool_calls"] += _count(r["info"].get("tool_call", 0))
        e.stats["tool_errors"] += _count(r["info"].get("tool_error", 0))
        if r["done"]:
            return self._end(e, "done", finished)
        if e.turns >= self.s.max_turns:
            return self._end(e, "max_turns", finished)
        try:
            obs = self.observe(r["observation"])
        except ValueError:  # an observation with no tokens (empty text): the environment's fault, this episode's end
            e.stats["errors"] += 1
            return self._end(e, "error", finished)
        if len(e.ids) + len(obs) >= self.s.max_episode_tokens:
            e.finish = "length"
            return self._end(e, "max_tokens", finished)
        e.ids += obs
        e.lps += [0.0] * len(obs) if e.logprobs else []
        e.mask += [0] * len(obs)
        e.segments.append([r["observation"], 0])
        e.stats["observation_tokens"] += len(obs)
        return [self._turn(e)]

    def _rerun(self, e: Episode, finished: list[int]) -> list[TurnRequest]:
        if e.attempt + 1 >= self.s.max_attempts:
            self.counts["abandoned"] += 1
            return self._end(e, "abandoned", finished)
        self.counts["reruns"] += 1
        e.restart()
        return [self._turn(e)]

    def _end(self, e: Episode, outcome: str, finished: list[int]) -> list[TurnRequest]:
        e.outcome = outcome
        e.sample = Sample(list(e.ids), list(e.lps), "".join(t for t, _ in e.segments), e.finish, list(e.versions),
                          e.seed, None if all(e.mask) else list(e.mask))
        if all(x.sample is not None for x in self.by_parent[e.parent]):
            finished.append(e.parent)
        return []

    def worker_lost(self, w: int) -> tuple[list[TurnRequest], list[int]]:
        """Reward worker w is lost: its environments' episodes are re-run (those whose
        calls it held now; the others find their environment gone at their next call).
        -> as env_done."""
        turns, finished = [], []
        for ref in [r for r, (worker, _, _) in self.pending.items() if worker == w]:
            _, keys, _ = self.pending.pop(ref)
            for key in keys:
                e = self._current(key)
                if e is not None and e.sample is None:
                    turns += self._rerun(e, finished)
        return turns, finished

    def overdue(self) -> list[int]:
        """Reward workers holding environment calls past their deadline (hung)."""
        now = time.monotonic()
        return sorted({w for w, _, deadline in self.pending.values() if now > deadline})

    # ------------------------------------------------------------ the group
    def group(self, key: int, source: str) -> Group:
        """The prompt's group, once every episode is over (its episodes forgotten)."""
        eps = self.by_parent.pop(key)
        row = self.rows.pop(key)
        for e in eps:
            del self.episodes[e.id]
        group = Group(eps[0].prompt_ids, row["prompt"] if isinstance(row.get("prompt"), str) else "", row,
                      [e.sample for e in eps], key=key)
        group.episode = {
            "env_reward": [e.reward for e in eps], "turns": [e.turns for e in eps],
            "outcome": [e.outcome for e in eps], "segments": [e.segments for e in eps],
            "received": [e.received for e in eps],
            **{stat: [e.stats[stat] for e in eps] for stat in
               ("tool_calls", "tool_errors", "observation_tokens", "reruns", "timeouts", "errors", "env_seconds")}}
        check_sampled(group, source, logprobs=eps[0].logprobs)
        return group


def episode_settings(cfg: Any) -> EpisodeSettings | None:
    """Multi-turn episodes of env.* (None: env.name unset, single-turn)."""
    e = cfg.env
    if e.name is None:
        return None
    return EpisodeSettings(max_turns=e.max_turns, max_episode_tokens=e.max_episode_tokens, stop=e.turn_stop(),
                           max_tokens=cfg.rollout.max_tokens, max_attempts=e.max_attempts, timeout_s=e.timeout_s,
                           concurrency=cfg.rewards.concurrency, slack_s=cfg.faults.health_timeout_s)


def observer(tok: Any, template: str) -> Callable[[str], list[int]]:
    """An observation's text -> its ids, for data.template `template` (observation_ids:
    plain text, or the chat template's tool turn)."""
    from rollout.tokens import observation_ids

    return lambda text: observation_ids(tok, text, template)


def add_env_rewards(group: Group) -> None:
    """The environment's own reward of each episode, added to the verifiers' total and
    logged as rewards/env."""
    if group.episode is None:
        return
    env = group.episode["env_reward"]
    group.reward_parts = {**(group.reward_parts or {}), "env": list(env)}
    group.rewards = [r + e for r, e in zip(group.rewards, env, strict=True)]
