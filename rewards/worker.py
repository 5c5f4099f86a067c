"""A reward worker (a Ray actor, wrapped by cluster/actors/factory.py): scores groups.

Every verifier call runs in a separate, killable process (rewards/child.py for
Python verifiers, the configured program or server for external ones), with a
wall-clock timeout. A hang or crash costs that one sample (score 0, counted in
reward/timeouts or reward/errors); the process is replaced and scoring goes on.
A worker keeps `rewards.concurrency` sets of verifier processes and scores that
many samples at a time. Every process it starts gets a minimal environment (plus the
variables the config's `env` entries name: rewards/spawn.py), never the worker's own.
`preflight_external` checks the external verifiers of a config before a run starts.
"""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.api import VerifierError
from rewards.config import EnvConfig, RewardConfig
from rewards.peer import Peer, ProcessPeer, child_env, external_peer
from rewards.protocol import ANSWER_CLASSES
from rollout.host import node_id, redirect_output_from_env
from rollout.types import Group


def child_argv(specs: dict[str, dict[str, Any]]) -> list[str]:
    return [sys.executable, "-m", "rewards.child", json.dumps(specs)]


def preflight_external(cfg: RewardConfig) -> None:
    """Start (or connect to) each external verifier of `cfg` once and have it answer one
    request, as a reward worker would, then stop it: a program that does not exist,
    exits, hangs, or does not speak the protocol, and a server that does not answer,
    -> VerifierError naming it, before any actor starts. The probe is a score request of
    an empty completion with no fields: any answer, an error answer included, passes."""
    for name, ext in cfg.external.items():
        timeout = (cfg.spec(name).timeout_s if name in cfg.verifiers else None) or cfg.timeout_s
        _probe(external_peer(name, ext), {"verifier": ext.verifier or name, "completion": "", "fields": {}}, timeout,
               f"external verifier {name!r}", ext.command)


def _probe(peer: Peer, request: dict[str, Any], timeout_s: float, what: str, command: list[str] | None) -> None:
    """Start (or reach) `peer`, send it one request, stop it: any answer, an error answer
    included, passes; a peer that cannot start or does not answer -> VerifierError naming `what`."""
    try:
        if isinstance(peer, ProcessPeer):
            peer.start()  # the ready handshake, when configured, has its own deadline
        result = peer.send(request, timeout_s)
    except OSError as e:
        raise VerifierError(f"{what} cannot start {command}: {e}") from None
    finally:
        peer.close()
    if peer.restarts:  # the peer itself failed (an answer, even an error, never resets it)
        raise VerifierError(f"{what} did not answer a probe request: {result['error']}")


def preflight_env(env: EnvConfig) -> None:
    """The environment of multi-turn episodes, checked before any actor starts: a Python
    one imports and takes env.args; an external one starts (or is reached) and answers a
    probe, a close of no episode (any answer, an error included, passes). -> VerifierError
    naming it."""
    if env.name is None:
        return
    if env.external is None:
        from rewards.envs import EnvError, resolve_env

        try:
            resolve_env(env.name)(**env.args)
        except EnvError as e:
            raise VerifierError(str(e)) from None
        except Exception as e:
            raise VerifierError(f"env.args: environment {env.name!r} refused {env.args}: {type(e).__name__}: {e}") from None
        return
    _probe(external_peer(env.name, env.external), {"verifier": env.name, "kind": "close", "episode": -1},
           env.timeout_s, f"external environment {env.name!r}", env.external.command)


class RewardWorker:
    def __init__(self, cfg: RewardConfig, index: int = 0, env: EnvConfig | None = None) -> None:
        """env: multi-turn episodes (env.name set): this worker also runs environment
        steps (rewards/env_host.py), in processes of their own."""
        redirect_output_from_env()
        self.cfg, self.index = cfg, index
        self.envs = None
        specs = {name: cfg.spec(name) for name in cfg.verifiers}
        self.weights = {name: spec.weight for name, spec in specs.items()}
        self.timeouts = {name: spec.timeout_s or cfg.timeout_s for name, spec in specs.items()}
        self.slots: list[dict[str, tuple[Peer, str]]] = []
        try:
            for k in range(cfg.concurrency):
                self.slots.append(self._peers(k))
        except BaseException:  # a verifier that cannot start: stop the ones that did
            self.close()
            raise
        self._free: queue.Queue[int] = queue.Queue()
        for k in range(cfg.concurrency):
            self._free.put(k)
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix=f"reward-{index}")
        self.cache: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._cache_lock = threading.Lock()
        if env is not None and env.name is not None:
            from rewards.env_host import EnvHost

            self.envs = EnvHost(env, cfg, index)

    def env_steps(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Turns of episodes for their environments (rewards/env_host.py EnvHost.step)."""
        if self.envs is None:
            raise RuntimeError(f"reward worker {self.index} runs no environment (env.name is unset)")
        return self.envs.step(requests)

    def _peers(self, slot: int) -> dict[str, tuple[Peer, str]]:
        """One set of verifier peers: verifier name -> (peer, the name it answers to)."""
        cfg, peers = self.cfg, {}
        internal = {name: {"target": name, "args": cfg.spec(name).args}
                    for name in cfg.verifiers if name not in cfg.external}
        if internal:
            peer = ProcessPeer(child_argv(internal), env=child_env(cfg), handshake=True,
                               name=f"reward worker {self.index} verifier process {slot}")
            peer.start()  # imports happen while the generators work (a failed start closes itself)
            peers.update({name: (peer, name) for name in internal})
        for name, ext in cfg.external.items():
            peers[name] = (external_peer(name, ext), ext.verifier or name)
        return peers

    def verify(self, name: str, completion: str, fields: dict[str, Any], slot: int = 0) -> dict[str, Any]:
        """One score: {"score", "info", "error", "kind"} (kind: ok / error / timeout / cached)."""
        key = (name, completion, json.dumps(fields, sort_keys=True, default=str))
        with self._cache_lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return {**self.cache[key], "kind": "cached"}
        peer, remote_name = self.slots[slot][name]
        result = peer.call(remote_name, completion, fields, self.timeouts[name])
        if not (isinstance(result["score"], (int, float)) and math.isfinite(result["score"])):
            result = {**result, "score": 0.0, "kind": "error", "error": f"non-finite score {result['score']!r}"}
        if result["kind"] == "ok" and self.cfg.cache_size:
            with self._cache_lock:
                self.cache[key] = result
                if len(self.cache) > self.cfg.cache_size:
                    self.cache.popitem(last=False)
        return result

    def _score_sample(self, group: Group, i: int) -> dict[str, dict[str, Any]]:
        slot = self._free.get()
        try:
            fields = {**group.row, "completion_tokens": group.samples[i].model_tokens()}  # an episode's observations not counted
            return {name: self.verify(name, group.samples[i].text, fields, slot) for name in self.weights}
        finally:
            self._free.put(slot)

    def score(self, groups: list[Group] | Group) -> list[Group]:
        """Fill each group's `rewards` (weighted sum), `reward_parts` (per verifier),
        `reward_info` and `reward_stats`; samples are scored `concurrency` at a time."""
        groups = [groups] if isinstance(groups, Group) else groups
        tasks = [(g, i) for g in groups for i in range(len(g.samples))]
        results = list(self._pool.map(lambda t: self._score_sample(*t), tasks))
        at = 0
        for g in groups:
            mine, at = results[at : at + len(g.samples)], at + len(g.samples)
            g.reward_parts = {name: [r[name]["score"] for r in mine] for name in self.weights}
            g.reward_info = {name: [_info(r[name]) for r in mine] for name in self.weights}
            g.reward_stats = {stat: sum(r[name]["kind"] == kind for r in mine for name in self.weights)
                              for stat, kind in (("timeouts", "timeout"), ("errors", "error"), ("cache_hits", "cached"))}
            g.rewards = [sum(self.weights[n] * g.reward_parts[n][i] for n in self.weights) for i in range(len(g.samples))]
        return groups

    def answer_classes(self, verifier: str, answers: list[list[str | None]]) -> list[list[int | None]]:
        """Equivalence classes of each prompt's extracted answers under `verifier`'s notion
        of equality (its `answer_classes`, rewards/api.py), computed in a verifier process."""
        internal = [name for name in self.cfg.verifiers if name not in self.cfg.external]
        if not internal:
            raise ValueError("answer classes need one built-in verifier in rewards.verifiers")
        peer, _ = self.slots[0][internal[0]]  # our own verifier process: it serves this request kind
        result = peer.send({"kind": ANSWER_CLASSES, "verifier": verifier, "answers": answers},
                           self.cfg.timeout_s * max(1, len(answers)))
        if result["error"]:
            raise RuntimeError(f"reward worker {self.index}: {result['error']}")
        return result["info"]["classes"]

    def _unique_peers(self) -> list[Peer]:
        return list({id(p): p for slot in self.slots for p, _ in slot.values()}.values())

    def restarts(self) -> int:
        """Verifier processes or connections replaced so far."""
        return sum(p.restarts for p in self._unique_peers())

    def close(self) -> None:
        for p in self._unique_peers():
            p.close()
        if self.envs is not None:
            self.envs.close()

    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "node_id": node_id(), "pid": os.getpid()}

    def health(self) -> dict[str, Any]:
        return {"index": self.index, "free_slots": self._free.qsize()}


def _info(result: dict[str, Any]) -> dict[str, Any]:
    """What a verifier reported about one sample, with its error if any. `error` is ours
    (rewards/api.py): a verifier's own is kept as `verifier_error`."""
    info = dict(result.get("info") or {})
    if "error" in info:
        info["verifier_error"] = info.pop("error")
    if result.get("error"):
        info["error"] = result["error"]
    return info
