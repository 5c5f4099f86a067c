"""The generator: one vLLM engine, wrapped as a Ray actor by cluster/actors/factory.py.

The engine (rollout/engine.py) runs in the actor's own process and is stepped by one
loop thread (rollout/engine_loop.py), which owns it. So prompts can be submitted while
others are being sampled (continuous batching across steps of the learner), finished
groups are collected as they complete, and a weight update lands either once the
requests in flight are done (`rollout.partial: off`) or between two engine steps: in-flight
sequences then continue under the new weights, either with their KV cache rebuilt
(`recompute`: the running requests are re-prefilled, so no token is sampled from a cache
computed with the old weights) or with it kept (`keep`: no re-prefill). Either way a
request added after an update never reuses a prefix cached under older weights. How an update comes in
depends on the platform (rollout/receivers/).

Every sample is its own vLLM request with its own seed (rollout/seeds.py), and records
the behaviour logprob of each token and the policy versions that produced its tokens.
"""
from __future__ import annotations

import os
import time
from typing import Any

from rollout.config import RolloutConfig
from rollout.engine import ENGINE_ENV, start_engine
from rollout.engine_loop import EngineLoop, GeneratorError
from rollout.host import node_id, pin_from_env, redirect_output_from_env
from rollout.receivers import receiver_for_platform
from rollout.types import Group

__all__ = ["ENGINE_ENV", "Generator", "GeneratorError"]  # ENGINE_ENV and the error: re-exported


class Generator:
    def __init__(self, model_path: str, cfg: RolloutConfig, index: int = 0, version: int = 0,
                 lora_rank: int = 0, sleep_mode: bool = False) -> None:
        """lora_rank > 0 (learner.lora.push=adapter): the engine serves the adapter each push
        brings on top of the base model; an update then waits for the requests in flight
        (a request's adapter is fixed when it starts). sleep_mode (colocated on GPUs): the
        engine can give its GPU memory to the learner between phases (`sleep`)."""
        redirect_output_from_env()
        self.cores = pin_from_env()
        self.cfg = cfg
        self.index = index
        t0 = time.perf_counter()
        self.llm = start_engine(model_path, cfg, index, lora_rank, sleep_mode)
        self.sleep_mode = sleep_mode
        self.asleep: set[str] = set()  # what vLLM's sleep freed and no wake_up brought back yet
        self.serves_adapter = bool(lora_rank)
        self.llm.update_weight_version(str(version))
        self.init_seconds = time.perf_counter() - t0
        # an adapter is fixed when a request starts: with LoRA adapter pushes, updates wait
        self.partial = "off" if lora_rank else cfg.partial
        self.loop = EngineLoop(self.llm, cfg, index, version, keeps_kv=self.partial == "keep")
        self.receiver = receiver_for_platform(self.loop, self.partial != "off")
        self.sync_peer: str | None = None  # the learner's rendezvous address:port, once connected

    # ------------------------------------------------------------ sampling
    def submit(self, jobs: list[tuple[int, dict[str, Any], list[int]]], sampling: dict[str, Any] | None = None) -> int:
        """Queue prompts to sample: (key, row, seeds) each, one sample per seed.
        Finished groups are picked up with `collect`. -> samples now queued or in flight."""
        self._wake("weights", "kv_cache")
        return self.loop.submit(jobs, sampling)

    def collect(self, timeout_s: float = 1.0) -> list[Group]:
        """Groups finished since the last call; waits up to timeout_s for the first."""
        return self.loop.collect(timeout_s)

    def generate(self, rows: list[dict[str, Any]], seeds: list[list[int]], sampling: dict[str, Any] | None = None,
                 timeout_s: float | None = None) -> list[Group]:
        """Sample every row (seeds[i]: one seed per sample of row i) and wait for all;
        -> one Group per row, in order (key = the row's index)."""
        self._wake("weights", "kv_cache")
        return self.loop.generate(rows, seeds, sampling, timeout_s)

    def sleep(self) -> bool:
        """Colocated on GPUs, while the learner trains: vLLM's sleep mode (level 1) frees the
        KV cache and offloads the weights to host memory, once the requests in flight are
        done. A push wakes the weights first and the KV cache after it; sampling wakes both.
        -> whether the engine sleeps (False without sleep_mode: CPU engines have no sleep
        mode, and do not need one, since memory is not what a CPU pair shares)."""
        if not self.sleep_mode:
            return False
        if self.asleep == {"weights", "kv_cache"}:
            return True
        self._wake("weights", "kv_cache")  # half asleep (a push that failed midway): all the way first
        self.loop.run(lambda: self.llm.sleep(level=1), drain=True)
        self.asleep = {"weights", "kv_cache"}
        return True

    def _wake(self, *tags: str) -> None:
        todo = [t for t in tags if t in self.asleep]
        if todo:
            self.loop.run(lambda: self.llm.wake_up(tags=todo))
            self.asleep -= set(todo)

    def abort_all(self) -> int:
        """Drop every queued and in-flight prompt (their groups never arrive). -> prompts dropped."""
        return self.loop.abort_all()

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Logprob of each token after the first under the current weights (raw model,
        no temperature): the check that a weight update really landed."""
        sampling = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 1, "logprobs": False, "prompt_logprobs": True}
        [group] = self.generate([{"prompt": list(token_ids)}], [[0]], sampling)
        return group.row["prompt_logprobs"]

    def health(self) -> dict[str, Any]:
        """Cheap probe (never waits on the engine): version, load, and the seconds since
        the engine last made progress (a step, or work arriving while idle)."""
        return self.loop.health()

    def take_timings(self) -> dict[str, float]:
        """Seconds spent inside this actor since the last call, by phase:
        generate/engine (vLLM engine steps), generate/convert (building samples and groups),
        sync/start, sync/receive (the transfer: on CPU while the engine keeps sampling),
        sync/finish (up to the update having landed), sync/pause (how long sampling
        stopped for the update), sync/wait and sync/load (inside the engine: on the wire,
        in vLLM's loader)."""
        return self.loop.take_timings()

    def kept_weights_digest(self) -> dict[str, str]:
        """sync.delta: per tensor, a digest of the weights a delta applies to (each TP
        worker holds its own copy: worker 0's)."""
        return self.loop.run(lambda: self.llm.collective_rpc("kept_weights_digest"))[0]

    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "init_seconds": self.init_seconds, "version": self.loop.version,
                "node_id": node_id(), "pid": os.getpid(), "cores": self.cores, "sync_peer": self.sync_peer}

    def close(self) -> None:
        self.loop.close()

    # ------------------------------------------------------------ weight update
    # The learner drives these four through rollout.weight_sync.WeightSyncClient; what
    # differs between CPU and GPU engines is the receiver's (rollout/receivers/).
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        if init_info.get("transport") == "shared":  # the learner's buffer is opened on this node only
            if init_info.get("node_id") != node_id():
                raise GeneratorError(f"generator {self.index}: sync.transport=shared needs the learner's rank 0 on this "
                                     f"node ({node_id()}), it runs on {init_info.get('node_id')!r}: use "
                                     f"sync.transport=collective, or cluster.placement=colocated on one node")
            self.sync_peer = f"shared@{init_info['node_id'][:12]}"
        else:
            self.sync_peer = f"{init_info['master_address']}:{init_info['master_port']}"
        self.loop.run(lambda: self.llm.init_weight_transfer_engine({"init_info": init_info}))

    def start_weight_update(self) -> None:
        """With rollout.partial=off, no new request starts from here until the update has
        landed, which waits for the requests in flight to finish."""
        t0 = time.perf_counter()
        self._wake("weights")  # the offloaded weights back in place, for the new ones to overwrite
        self.receiver.start()
        self.loop.time("sync/start", time.perf_counter() - t0)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.receiver.receive(update_info)
        self.loop.time("sync/receive", time.perf_counter() - t0)

    def finish_weight_update(self, weight_version: int) -> None:
        def finish() -> None:
            paused_at = self.receiver.load()
            self.llm.finish_weight_update(weight_version=str(weight_version))
            if self.serves_adapter:  # requests from now on sample with the adapter just written
                self.loop.use_adapter(self.llm.collective_rpc("received_adapter_path")[0], weight_version)
            # KV computed with the old weights: no new request reuses it (the loop salts the
            # prefix cache with the version), and it is dropped from the cache now unless
            # running requests hold it. `recompute` re-prefills them under the new weights;
            # `keep` lets them go on over it.
            running = self.loop.in_flight()
            if not (running and self.partial == "keep"):
                self.llm.reset_prefix_cache(reset_running_requests=running)
            self.loop.landed(weight_version)
            self.loop.time("sync/pause", time.perf_counter() - paused_at)

        t0 = time.perf_counter()
        self.loop.run(finish, drain=self.receiver.drain_before_load)
        self._wake("kv_cache")
        workers = self.llm.collective_rpc("weight_sync_timings")
        for key in ("sync/wait", "sync/load"):  # inside the engine: the slowest worker's
            self.loop.time(key, max(t.get(key, 0.0) for t in workers))
        self.loop.time("sync/finish", time.perf_counter() - t0)

    def engine_world_size(self) -> int:
        """Workers (TP x PP) inside this engine: each takes one rank in the sync group."""
        return self.cfg.tensor_parallel_size
