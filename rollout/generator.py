"""The generator: one vLLM engine, wrapped as a Ray actor by cluster/placement.py.

The engine runs in the actor's own process (no engine subprocess) and is stepped by
one loop thread, which owns it: requests, weight updates and probes reach the engine
only through that thread, between engine steps. So prompts can be submitted while
others are being sampled (continuous batching across steps of the learner), finished
groups are collected as they complete, and a weight update lands either once the
requests in flight are done (`rollout.partial: false`) or between two engine steps
(`partial: true`): in-flight sequences then continue under the new weights, their
KV cache rebuilt with them (the running requests are re-prefilled, so no token is
sampled from a cache computed with the old weights).

Every sample is its own vLLM request with its own seed (rollout/seeds.py), and
records the behaviour logprob of each token (`logprobs_mode=processed_logprobs`:
temperature applied) and the policy versions that produced its tokens (vLLM's
`weight_versions` spans).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rollout.config import RolloutConfig
from rollout.host import node_id, pin_from_env, redirect_output_from_env
from rollout.types import Group, Sample
from rollout.buckets import ENGINE_NAME

# Set before vLLM is imported (the actor's runtime_env sets them too).
ENGINE_ENV = {
    # Run the engine inside the actor process: ~3-10 s start instead of ~30 s, no
    # core pinning, and tensors pass through collective_rpc as tensors.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Every weight sync logs several INFO/WARNING lines per engine (layerwise reload
    # of the tied output layer and rotary buffers, which are not sent on purpose).
    "VLLM_LOGGING_LEVEL": "ERROR",
}


def engine_kwargs(model_path: str, cfg: RolloutConfig, index: int = 0) -> dict[str, Any]:
    """Arguments of the engine's `vllm.LLM(...)` (benchmarks build raw engines from these too)."""
    return dict(
        model=model_path,
        dtype=cfg.dtype,
        seed=index,
        enforce_eager=cfg.enforce_eager,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
        enable_prefix_caching=True,
        # The logprob of the distribution each token was drawn from (after temperature),
        # not the raw model's: the behaviour policy of importance weights.
        logprobs_mode="processed_logprobs",
        weight_transfer_config={"backend": ENGINE_NAME},
        worker_extension_cls="rollout.weight_sync.WorkerExtension",
        # A prefill split over engine steps makes vLLM rewind the seeded sampler's
        # generator, which CPU generators cannot do ("CPU Generator does not use
        # offset"); re-prefills after a partial-rollout update are long enough to split.
        enable_chunked_prefill=not _cpu_platform(),
        # Tensor parallel inside a Ray actor: vLLM's Ray executor, on the placement group
        # the actor was scheduled in (cluster/placement.py).
        distributed_executor_backend="ray" if cfg.tensor_parallel_size > 1 else None,
    )


def sample_params(cfg: RolloutConfig, seed: int, sampling: dict[str, Any] | None = None) -> Any:
    """One sample's SamplingParams: the training settings, or `sampling` overrides
    (temperature, top_p, max_tokens; logprobs=False to skip them) for evaluation."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, logprobs=True)
    s.update(sampling or {})
    return SamplingParams(n=1, temperature=s["temperature"], top_p=s["top_p"], max_tokens=s["max_tokens"],
                          logprobs=0 if s["logprobs"] else None, seed=seed, output_kind=RequestOutputKind.FINAL_ONLY)


def start_engine(model_path: str, cfg: RolloutConfig, index: int = 0) -> Any:
    """A vLLM engine in this process, with ENGINE_ENV applied first."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
    from vllm import LLM

    return LLM(**engine_kwargs(model_path, cfg, index))


@dataclass
class _Job:
    """One prompt being sampled: its samples arrive one by one."""

    key: int
    row: dict[str, Any]
    seeds: list[int]
    sampling: dict[str, Any] | None
    sink: list | None  # a blocking call's own list; None: the shared finished list
    samples: list[Sample | None] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    remaining: int = 0


@dataclass
class _Command:
    """Work for the loop thread between engine steps; `drain`: only once nothing is in flight."""

    fn: Callable[[], Any]
    drain: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class GeneratorError(RuntimeError):
    pass


class Generator:
    def __init__(self, model_path: str, cfg: RolloutConfig, index: int = 0, version: int = 0) -> None:
        redirect_output_from_env()
        self.cores = pin_from_env()
        self.cfg = cfg
        self.index = index
        self.version = version
        t0 = time.perf_counter()
        self.llm = start_engine(model_path, cfg, index)
        self.llm.update_weight_version(str(version))
        self.init_seconds = time.perf_counter() - t0
        self._timings: dict[str, float] = {}
        self._cv = threading.Condition()
        self._pending: list[_Job] = []
        self._commands: list[_Command] = []
        self._requests: dict[str, tuple[_Job, int]] = {}
        self._finished: list[Group] = []
        self._updating = False  # GPU: between start_ and finish_weight_update, no engine steps
        self._hold = False  # no new requests until the update lands (not partial)
        self._off_loop = _receives_off_loop()
        self.sync_peer: str | None = None  # the learner's rendezvous address:port, once connected
        self._paused_at = 0.0
        self._closed = False
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._last_step = time.monotonic()
        self._steps = 0
        self._thread = threading.Thread(target=self._loop, name=f"generator-{index}-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ engine loop
    def _runnable(self) -> list[_Command]:
        """Commands at the head of the queue that may run now (in order)."""
        out = []
        while self._commands and not (self._commands[0].drain and self._requests):
            out.append(self._commands.pop(0))
        return out

    def _admitting(self) -> bool:
        return not (self._updating or self._hold) and not (self._commands and self._commands[0].drain)

    def _has_work(self) -> bool:
        return (self._closed or bool(self._commands and not (self._commands[0].drain and self._requests))
                or (bool(self._pending) and self._admitting()) or (bool(self._requests) and not self._updating))

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._has_work():
                        self._cv.wait()
                    if self._closed:
                        return
                    commands = self._runnable()
                    admit = self._pending if self._admitting() and not commands else []
                    if admit:
                        self._pending = []
                for cmd in commands:
                    try:
                        cmd.result = cmd.fn()
                    except BaseException as e:  # reported to the caller, the loop goes on
                        cmd.error = e
                    cmd.done.set()
                for job in admit:
                    self._add(job)
                if self._requests and not self._updating and not commands:
                    self._step()
        except BaseException as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._cv:
            self._error = error
            for cmd in self._commands:
                cmd.error = error
                cmd.done.set()
            self._commands = []
            self._cv.notify_all()

    def _add(self, job: _Job) -> None:
        job.samples, job.remaining = [None] * len(job.seeds), len(job.seeds)
        prompt = job.row["prompt"]
        if isinstance(prompt, list):
            from vllm.inputs import TokensPrompt

            prompt = TokensPrompt(prompt_token_ids=prompt)
        for k, seed in enumerate(job.seeds):
            params = sample_params(self.cfg, seed, job.sampling)
            if job.sampling and job.sampling.get("prompt_logprobs"):
                params.prompt_logprobs = 0
            rid = f"g{self.index}-{next(self._ids)}"
            self._requests[rid] = (job, k)
            self.llm.llm_engine.add_request(rid, prompt, params)

    def _step(self) -> None:
        t0 = time.perf_counter()
        outputs = self.llm.llm_engine.step()
        t1 = time.perf_counter()
        self._last_step, self._steps = time.monotonic(), self._steps + 1
        done = []
        for out in outputs:
            if out.finished:
                job, k = self._requests.pop(out.request_id)
                job.samples[k] = self._sample(out, job.seeds[k])
                job.prompt_ids = list(out.prompt_token_ids)
                if job.sampling and job.sampling.get("prompt_logprobs"):
                    job.row = {**job.row, "prompt_logprobs": [
                        step[tok].logprob for tok, step in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]}
                job.remaining -= 1
                if job.remaining == 0:
                    done.append(job)
        self._time("generate/engine", t1 - t0)
        if done:
            with self._cv:
                for job in done:
                    group = Group(job.prompt_ids, job.row["prompt"] if isinstance(job.row["prompt"], str) else "",
                                  job.row, job.samples, key=job.key)
                    (job.sink if job.sink is not None else self._finished).append(group)
                self._cv.notify_all()
        self._time("generate/convert", time.perf_counter() - t1)

    def _sample(self, out: Any, seed: int) -> Sample:
        c = out.outputs[0]
        ids = list(c.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(ids, c.logprobs)] if c.logprobs is not None else []
        spans = c.weight_versions or []
        versions = [(int(s.version), s.start) for s in spans if s.end > s.start] or [(self.version, 0)]
        return Sample(ids, logprobs, c.text, c.finish_reason or "length", versions, seed)

    def _run(self, fn: Callable[[], Any], drain: bool = False, timeout_s: float | None = None) -> Any:
        """Run fn on the loop thread between engine steps (after the in-flight
        requests finish when `drain`); -> its result, or raise its error."""
        cmd = _Command(fn, drain)
        with self._cv:
            self._check()
            self._commands.append(cmd)
            self._cv.notify_all()
        if not cmd.done.wait(timeout_s):
            raise GeneratorError(f"generator {self.index}: engine command timed out after {timeout_s} s")
        if cmd.error is not None:
            raise cmd.error
        return cmd.result

    def _check(self) -> None:
        if self._error is not None:
            raise GeneratorError(f"generator {self.index}: engine loop failed: {self._error!r}") from self._error
        if self._closed:
            raise GeneratorError(f"generator {self.index} is closed")

    def _time(self, key: str, seconds: float) -> None:
        self._timings[key] = self._timings.get(key, 0.0) + seconds

    # ------------------------------------------------------------ sampling
    def submit(self, jobs: list[tuple[int, dict[str, Any], list[int]]], sampling: dict[str, Any] | None = None) -> int:
        """Queue prompts to sample: (key, row, seeds) each, one sample per seed.
        Finished groups are picked up with `collect`. -> samples now queued or in flight."""
        with self._cv:
            self._check()
            if not self._load():  # idle until now: the stall clock starts with this work
                self._last_step = time.monotonic()
            self._pending += [_Job(key, row, list(seeds), sampling, None) for key, row, seeds in jobs]
            self._cv.notify_all()
            return self._load()

    def collect(self, timeout_s: float = 1.0) -> list[Group]:
        """Groups finished since the last call; waits up to timeout_s for the first."""
        with self._cv:
            self._cv.wait_for(lambda: self._finished or self._error is not None, timeout=timeout_s)
            self._check()
            out, self._finished = self._finished, []
            return out

    def generate(self, rows: list[dict[str, Any]], seeds: list[list[int]], sampling: dict[str, Any] | None = None,
                 timeout_s: float | None = None) -> list[Group]:
        """Sample every row (seeds[i]: one seed per sample of row i) and wait for all;
        -> one Group per row, in order (key = the row's index)."""
        sink: list[Group] = []
        with self._cv:
            self._check()
            self._pending += [_Job(i, row, list(s), sampling, sink) for i, (row, s) in enumerate(zip(rows, seeds))]
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: len(sink) == len(rows) or self._error is not None, timeout=timeout_s):
                raise GeneratorError(f"generator {self.index}: {len(rows) - len(sink)} prompts unfinished after {timeout_s} s")
            self._check()
        return sorted(sink, key=lambda g: g.key)

    def abort_all(self) -> int:
        """Drop every queued and in-flight prompt (their groups never arrive). -> prompts dropped."""
        def abort() -> int:
            jobs = {id(job): job for job, _ in self._requests.values()}
            self.llm.llm_engine.abort_request(list(self._requests))
            self._requests.clear()
            return len(jobs)

        with self._cv:
            dropped = len(self._pending)
            self._pending = []
        return dropped + self._run(abort)

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Logprob of each token after the first under the current weights (raw model,
        no temperature): the check that a weight update really landed."""
        sampling = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 1, "logprobs": False, "prompt_logprobs": True}
        [group] = self.generate([{"prompt": list(token_ids)}], [[0]], sampling)
        return group.row["prompt_logprobs"]

    def _load(self) -> int:
        return sum(len(j.seeds) for j in self._pending) + len(self._requests)

    def health(self) -> dict[str, Any]:
        """Cheap probe (never waits on the engine): version, load, and the seconds since
        the engine last made progress (a step, or work arriving while idle)."""
        with self._cv:
            return {"index": self.index, "version": self.version, "load": self._load(), "steps": self._steps,
                    "seconds_since_step": time.monotonic() - self._last_step, "updating": self._updating,
                    "error": None if self._error is None else repr(self._error)}

    def take_timings(self) -> dict[str, float]:
        """Seconds spent inside this actor since the last call, by phase:
        generate/engine (vLLM engine steps), generate/convert (building samples and groups),
        sync/start, sync/receive (the transfer: on CPU while the engine keeps sampling),
        sync/finish (up to the update having landed), sync/pause (how long sampling
        stopped for the update), sync/wait and sync/load (inside the engine: on the wire,
        in vLLM's loader)."""
        out, self._timings = self._timings, {}
        return out

    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "init_seconds": self.init_seconds, "version": self.version,
                "node_id": node_id(), "pid": os.getpid(), "cores": self.cores, "sync_peer": self.sync_peer}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ weight update
    # The learner drives these four through rollout.weight_sync.WeightSyncClient.
    # On CPU the update is received off the loop thread into a kept buffer while the
    # engine keeps sampling, and only the load pauses it (sync/pause); on GPUs the
    # engine pauses from start to finish while buckets stream in and load.
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.sync_peer = f"{init_info['master_address']}:{init_info['master_port']}"
        self._run(lambda: self.llm.init_weight_transfer_engine({"init_info": init_info}))

    def start_weight_update(self) -> None:
        """Without rollout.partial, no new request starts from here until the update has
        landed, which waits for the requests in flight to finish."""
        t0 = time.perf_counter()
        if self._off_loop:
            with self._cv:
                self._hold = not self.cfg.partial
        else:
            def start() -> None:
                self._paused_at = time.perf_counter()
                self.llm.start_weight_update()
                self._updating = True

            self._run(start, drain=not self.cfg.partial)
        self._time("sync/start", time.perf_counter() - t0)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        if self._off_loop:
            self.llm.collective_rpc("receive_weights_only", args=(update_info,))
        else:
            self._run(lambda: self.llm.update_weights({"update_info": update_info}))
        self._time("sync/receive", time.perf_counter() - t0)

    def finish_weight_update(self, weight_version: int) -> None:
        def finish() -> None:
            t0 = time.perf_counter() if self._off_loop else self._paused_at
            if self._off_loop:
                self.llm.start_weight_update()
                self.llm.collective_rpc("load_received_weights")
            self.llm.finish_weight_update(weight_version=str(weight_version))
            # KV computed with the old weights must not be reused: cached prefixes are
            # dropped, and running requests re-prefilled under the new weights.
            self.llm.reset_prefix_cache(reset_running_requests=bool(self._requests))
            self.version = weight_version
            self._updating = self._hold = False
            self._time("sync/pause", time.perf_counter() - t0)

        t0 = time.perf_counter()
        self._run(finish, drain=self._off_loop and not self.cfg.partial)
        workers = self.llm.collective_rpc("weight_sync_timings")
        for key in ("sync/wait", "sync/load"):  # inside the engine: the slowest worker's
            self._time(key, max(t.get(key, 0.0) for t in workers))
        self._time("sync/finish", time.perf_counter() - t0)

    def engine_world_size(self) -> int:
        """Workers (TP x PP) inside this engine: each takes one rank in the sync group."""
        return self.cfg.tensor_parallel_size


def _cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _receives_off_loop() -> bool:
    """CPU engines receive updates into a kept buffer off the engine loop (see
    rollout/weight_sync.py); GPU engines stream buckets straight into the model."""
    return _cpu_platform()
