"""The engine loop: one thread that owns a vLLM engine and steps it.

Requests, weight updates and probes reach the engine only through this thread, between
engine steps. So prompts can be queued while others are being sampled (continuous
batching across steps of the learner), and finished groups are handed out as they
complete. Work for the engine itself (an abort, a weight update) is a command that runs
between two steps, or, with `drain`, once no request is in flight.

Each sample records the policy versions that produced its tokens (vLLM's
`weight_versions` spans).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rollout.config import RolloutConfig
from rollout.engine import sample_params
from rollout.tokens import stop_token_ids
from rollout.types import Group, Sample


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


def _generation_eos(llm: Any) -> int | list[int] | None:
    """The EOS ids of the model's generation_config.json, if it has one."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(llm.llm_engine.model_config.model).eos_token_id
    except Exception:  # no generation config: EOS and the template's end-of-turn only
        return None


class EngineLoop:
    """Steps `llm` on its own thread (started here); every other thread reaches the
    engine through `run`. `version`: the weights the engine serves. `keeps_kv`
    (rollout.partial=keep): running requests keep their KV cache across an update."""

    def __init__(self, llm: Any, cfg: RolloutConfig, index: int, version: int, keeps_kv: bool = False) -> None:
        self.llm, self.cfg, self.index, self.version, self.keeps_kv = llm, cfg, index, version, keeps_kv
        # vLLM detokenises no token as it samples (engine.sample_params): each finished
        # sample is decoded once here instead
        self._tokenizer = llm.get_tokenizer()
        # EOS, the generation config's EOS ids and the chat template's end-of-turn (rollout/tokens.py)
        self.stop_ids = stop_token_ids(self._tokenizer, _generation_eos(llm))
        self._timings: dict[str, float] = {}
        self._cv = threading.Condition()
        self._pending: list[_Job] = []
        self._commands: list[_Command] = []
        self._requests: dict[str, tuple[_Job, int, int]] = {}  # request id -> job, sample index, version when added
        self._finished: list[Group] = []
        self._updating = False  # GPU: between start_ and finish_weight_update, no engine steps
        self.adapter = None  # the LoRARequest every new request samples with (learner.lora.push=adapter)
        self._adapters = 0
        self._hold = False  # no new requests until the update lands (rollout.partial=off)
        self._landings = 0  # updates landed: part of the prefix cache's salt
        self._closed = False
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._last_step = time.monotonic()
        self._steps = 0
        self._thread = threading.Thread(target=self._loop, name=f"generator-{index}-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the thread
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
        # Token ids in: the driver tokenised the prompt once (cluster/data.py apply_template);
        # a row without them (a bare list, or text) is sampled as given.
        prompt = job.row.pop("prompt_ids", None) or job.row["prompt"]
        # The weights served salt the prefix cache, so a request never reuses KV that older
        # weights computed (partial=keep leaves it cached while running requests hold it).
        # The version alone can come back (a learner restarted from a checkpoint pushes it
        # again): the count of updates landed makes the salt unique.
        salt = f"v{self.version}.{self._landings}"
        if isinstance(prompt, list):
            from vllm.inputs import TokensPrompt

            prompt = TokensPrompt(prompt_token_ids=list(prompt), cache_salt=salt)
        else:
            from vllm.inputs import TextPrompt

            prompt = TextPrompt(prompt=prompt, cache_salt=salt)
        for k, seed in enumerate(job.seeds):
            params = sample_params(self.cfg, seed, job.sampling, self.stop_ids)
            if job.sampling and job.sampling.get("prompt_logprobs"):
                params.prompt_logprobs = 0  # set after SamplingParams' own checks: so is the cache skip
                params.skip_reading_prefix_cache = True  # cached positions would have no prompt logprobs
            rid = f"g{self.index}-{next(self._ids)}"
            self._requests[rid] = (job, k, self.version)
            self.llm.llm_engine.add_request(rid, prompt, params, lora_request=self.adapter)

    def _step(self) -> None:
        self.time("generate/steps", 1.0)  # counts, not seconds: how full each engine step is
        self.time("generate/sequences", float(len(self._requests)))  # in flight (running or queued)
        t0 = time.perf_counter()
        outputs = self.llm.llm_engine.step()
        t1 = time.perf_counter()
        self._last_step, self._steps = time.monotonic(), self._steps + 1
        done = []
        for out in outputs:
            if out.finished:
                job, k, added = self._requests.pop(out.request_id)
                job.samples[k] = self._sample(out, job.seeds[k], added)
                job.prompt_ids = list(out.prompt_token_ids)
                if job.sampling and job.sampling.get("prompt_logprobs"):
                    job.row = {**job.row, "prompt_logprobs": [
                        step[tok].logprob for tok, step in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]}
                job.remaining -= 1
                if job.remaining == 0:
                    done.append(job)
        self.time("generate/engine", t1 - t0)
        if done:
            with self._cv:
                for job in done:
                    group = Group(job.prompt_ids, job.row["prompt"] if isinstance(job.row["prompt"], str) else "",
                                  job.row, job.samples, key=job.key)
                    (job.sink if job.sink is not None else self._finished).append(group)
                self._cv.notify_all()
        self.time("generate/convert", time.perf_counter() - t1)

    def _sample(self, out: Any, seed: int, added: int) -> Sample:
        c = out.outputs[0]
        ids = list(c.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(ids, c.logprobs)] if c.logprobs is not None else []
        spans = c.weight_versions or []
        versions = [(int(s.version), s.start) for s in spans if s.end > s.start] or [(self.version, 0)]
        if self.keeps_kv and versions[0][0] > added:
            # Added before an update but prefilled after it (queued in vLLM): with
            # rollout.partial=keep its prompt may have reused KV cached by the older weights
            # it was salted with, so that version counts (for staleness) from token 0.
            versions.insert(0, (added, 0))
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        return Sample(ids, logprobs, text, c.finish_reason or "length", versions, seed)

    def _check(self) -> None:
        if self._error is not None:
            raise GeneratorError(f"generator {self.index}: engine loop failed: {self._error!r}") from self._error
        if self._closed:
            raise GeneratorError(f"generator {self.index} is closed")

    def _load(self) -> int:
        return sum(len(j.seeds) for j in self._pending) + len(self._requests)

    # ------------------------------------------------------------ other threads
    def run(self, fn: Callable[[], Any], drain: bool = False, timeout_s: float | None = None) -> Any:
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

    def submit(self, jobs: list[tuple[int, dict[str, Any], list[int]]], sampling: dict[str, Any] | None) -> int:
        """Queue (key, row, seeds) jobs for `collect`; -> samples now queued or in flight."""
        sample_params(self.cfg, 0, sampling, self.stop_ids)  # bad sampling settings fail here, not in the loop
        with self._cv:
            self._check()
            if not self._load():  # idle until now: the stall clock starts with this work
                self._last_step = time.monotonic()
            self._pending += [_Job(key, row, list(seeds), sampling, None) for key, row, seeds in jobs]
            self._cv.notify_all()
            return self._load()

    def collect(self, timeout_s: float) -> list[Group]:
        with self._cv:
            self._cv.wait_for(lambda: self._finished or self._error is not None, timeout=timeout_s)
            self._check()
            out, self._finished = self._finished, []
            return out

    def generate(self, rows: list[dict[str, Any]], seeds: list[list[int]], sampling: dict[str, Any] | None,
                 timeout_s: float | None) -> list[Group]:
        sink: list[Group] = []
        sample_params(self.cfg, 0, sampling, self.stop_ids)  # bad sampling settings fail here, not in the loop
        with self._cv:
            self._check()
            self._pending += [_Job(i, row, list(s), sampling, sink) for i, (row, s) in enumerate(zip(rows, seeds))]
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: len(sink) == len(rows) or self._error is not None, timeout=timeout_s):
                raise GeneratorError(f"generator {self.index}: {len(rows) - len(sink)} prompts unfinished after {timeout_s} s")
            self._check()
        return sorted(sink, key=lambda g: g.key)

    def abort_all(self) -> int:
        def abort() -> int:
            jobs = {id(job): job for job, *_ in self._requests.values()}
            self.llm.llm_engine.abort_request(list(self._requests))
            self._requests.clear()
            return len(jobs)

        with self._cv:
            dropped = len(self._pending)
            self._pending = []
        return dropped + self.run(abort)

    def health(self) -> dict[str, Any]:
        with self._cv:
            return {"index": self.index, "version": self.version, "load": self._load(), "steps": self._steps,
                    "seconds_since_step": time.monotonic() - self._last_step, "updating": self._updating,
                    "error": None if self._error is None else repr(self._error)}

    def time(self, key: str, seconds: float) -> None:
        self._timings[key] = self._timings.get(key, 0.0) + seconds

    def take_timings(self) -> dict[str, float]:
        out, self._timings = self._timings, {}
        return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ weight updates
    def hold_new_requests(self, hold: bool) -> None:
        """Whether queued requests wait (until `landed`) instead of starting."""
        with self._cv:
            self._hold = hold

    def pause_steps(self) -> None:
        """On the loop thread: no engine step until `landed` (weights stream into the model)."""
        self._updating = True

    def in_flight(self) -> bool:
        """On the loop thread: whether requests are being sampled."""
        return bool(self._requests)

    def use_adapter(self, path: str | None, version: int) -> None:
        """On the loop thread: requests added from now on sample with the LoRA adapter at
        `path` (a peft directory; vLLM loads it at the first request naming it)."""
        if path is None:
            raise GeneratorError(f"generator {self.index}: the update to version {version} brought no adapter")
        from vllm.lora.request import LoRARequest

        self._adapters += 1  # ids > 0, new per push: vLLM caches adapters by id
        self.adapter = LoRARequest(f"push-{self._adapters}", self._adapters, path)

    def landed(self, version: int) -> None:
        """On the loop thread: the engine serves `version`; sampling goes on."""
        self.version = version
        self._landings += 1
        self._updating = self._hold = False
