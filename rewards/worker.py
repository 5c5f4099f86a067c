"""A reward worker (a Ray actor, wrapped by cluster/placement.py): scores groups.

Every verifier call runs in a separate, killable process (rewards/child.py for
Python verifiers, the configured program or server for external ones), with a
wall-clock timeout. A hang or crash costs that one sample (score 0, counted in
reward/timeouts or reward/errors); the process is replaced and scoring goes on.
"""
from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from typing import Any

from rewards.config import RewardConfig
from rewards.peer import ProcessPeer, SocketPeer, _Peer
from rollout.types import Group


def child_argv(specs: dict[str, dict[str, Any]]) -> list[str]:
    return [sys.executable, "-m", "rewards.child", json.dumps(specs)]


class RewardWorker:
    def __init__(self, cfg: RewardConfig, index: int = 0) -> None:
        self.cfg, self.index = cfg, index
        self.peers: dict[str, tuple[_Peer, str]] = {}  # verifier -> (peer, name it answers to)
        internal = {name: {"target": name, "args": cfg.spec(name).args}
                    for name in cfg.verifiers if name not in cfg.external}
        if internal:
            env = {**os.environ, "GRPO_VERIFIER_MEMORY_MB": str(cfg.memory_mb)}
            peer = ProcessPeer(child_argv(internal), env=env, name=f"reward worker {index} verifier process")
            peer.start()  # imports happen while the generators work
            self.peers.update({name: (peer, name) for name in internal})
        for name, ext in cfg.external.items():
            if ext.command is not None:
                peer = ProcessPeer(ext.command, name=f"external verifier {name!r}")
            else:
                peer = SocketPeer(ext.address, name=f"external verifier {name!r} at {ext.address}")
            self.peers[name] = (peer, ext.verifier or name)
        self.cache: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        specs = {name: cfg.spec(name) for name in cfg.verifiers}
        self.weights = {name: spec.weight for name, spec in specs.items()}
        self.timeouts = {name: spec.timeout_s or cfg.timeout_s for name, spec in specs.items()}

    def verify(self, name: str, completion: str, fields: dict[str, Any]) -> dict[str, Any]:
        """One score: {"score", "info", "error", "kind"} (kind: ok / error / timeout / cached)."""
        key = (name, completion, json.dumps(fields, sort_keys=True, default=str))
        if key in self.cache:
            self.cache.move_to_end(key)
            return {**self.cache[key], "kind": "cached"}
        peer, remote_name = self.peers[name]
        result = peer.call(remote_name, completion, fields, self.timeouts[name])
        if result["kind"] == "ok" and self.cfg.cache_size:
            self.cache[key] = result
            if len(self.cache) > self.cfg.cache_size:
                self.cache.popitem(last=False)
        return result

    def score(self, groups: list[Group]) -> list[Group]:
        """Fill each group's `rewards` (weighted sum), `reward_parts` (per verifier)
        and `reward_stats`."""
        weights = self.weights
        for g in groups:
            stats = {"timeouts": 0, "errors": 0, "cache_hits": 0}
            parts: dict[str, list[float]] = {name: [] for name in weights}
            for s in g.samples:
                fields = {**g.row, "completion_tokens": len(s.completion_ids)}
                for name in weights:
                    result = self.verify(name, s.text, fields)
                    stats["timeouts"] += result["kind"] == "timeout"
                    stats["errors"] += result["kind"] == "error"
                    stats["cache_hits"] += result["kind"] == "cached"
                    parts[name].append(result["score"])
            g.reward_parts, g.reward_stats = parts, stats
            g.rewards = [sum(weights[n] * parts[n][i] for n in weights) for i in range(len(g.samples))]
        return groups

    def _unique_peers(self) -> list[_Peer]:
        return list({id(p): p for p, _ in self.peers.values()}.values())

    def restarts(self) -> int:
        """Verifier processes or connections replaced so far."""
        return sum(p.restarts for p in self._unique_peers())

    def close(self) -> None:
        for p in self._unique_peers():
            p.close()

    def ready(self) -> int:
        return self.index
