"""The generator: one vLLM engine, wrapped as a Ray actor by cluster/placement.py.

It samples groups (n completions per prompt) and receives weights from the learner
through vLLM's weight-transfer API (see weight_sync.py). Every sample carries the
policy version of the weights that produced it.
"""
from __future__ import annotations

import os
import time
from typing import Any

from rollout.config import RolloutConfig
from rollout.types import Group, Sample
from rollout.weight_sync import ENGINE_NAME

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
        seed=cfg.seed + index,
        enforce_eager=cfg.enforce_eager,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
        enable_prefix_caching=True,
        weight_transfer_config={"backend": ENGINE_NAME},
        worker_extension_cls="rollout.weight_sync.WorkerExtension",
    )


def sampling_params(cfg: RolloutConfig, count: int, seed: int) -> list[Any]:
    """One SamplingParams per prompt: n samples, sampler logprobs, prompt i seeded seed + i."""
    from vllm import SamplingParams

    return [
        SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                       logprobs=0, seed=seed + i)
        for i in range(count)
    ]


def start_engine(model_path: str, cfg: RolloutConfig, index: int = 0) -> Any:
    """A vLLM engine in this process, with ENGINE_ENV applied first."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
    from vllm import LLM

    return LLM(**engine_kwargs(model_path, cfg, index))


class Generator:
    def __init__(self, model_path: str, cfg: RolloutConfig, index: int = 0) -> None:
        self.cfg = cfg
        self.index = index
        self.version = 0
        t0 = time.perf_counter()
        self.llm = start_engine(model_path, cfg, index)
        self.init_seconds = time.perf_counter() - t0
        self._timings: dict[str, float] = {}

    def _time(self, key: str, seconds: float) -> None:
        self._timings[key] = self._timings.get(key, 0.0) + seconds

    def take_timings(self) -> dict[str, float]:
        """Seconds spent inside this actor since the last call, by phase:
        generate/engine (vllm generate), generate/convert (building Groups),
        sync/start, sync/receive (broadcasts + loading; of which sync/wait on the wire and
        sync/load in vLLM's loader), sync/finish (reload post-processing)."""
        out, self._timings = self._timings, {}
        return out

    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "init_seconds": self.init_seconds, "version": self.version}

    # ----------------------------------------------------------------- sampling
    def generate(self, rows: list[dict[str, Any]], seed: int) -> list[Group]:
        """rows: dataset rows (each with a `prompt` text). Returns one Group per row.

        `seed` makes a step's sampling reproducible (each prompt gets seed + i)."""
        t0 = time.perf_counter()
        outputs = self.llm.generate([r["prompt"] for r in rows], sampling_params(self.cfg, len(rows), seed),
                                    use_tqdm=False)
        t1 = time.perf_counter()
        groups = []
        for row, out in zip(rows, outputs):
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(ids, c.logprobs)]
                samples.append(
                    Sample(
                        completion_ids=ids,
                        logprobs=logprobs,
                        text=c.text,
                        finish_reason=c.finish_reason or "length",
                        version=self.version,
                    )
                )
            groups.append(Group(list(out.prompt_token_ids), row["prompt"], row, samples))
        self._time("generate/engine", t1 - t0)
        self._time("generate/convert", time.perf_counter() - t1)
        return groups

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Logprob of each token after the first under the current weights (greedy
        scoring, no sampling noise): the check that a weight update really landed."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False)[0]
        return [step[tok].logprob for tok, step in zip(token_ids[1:], out.prompt_logprobs[1:])]

    # ------------------------------------------------------------ weight update
    # The learner drives these four through rollout.weight_sync.WeightSyncClient.
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        t0 = time.perf_counter()
        self.llm.start_weight_update()
        self._time("sync/start", time.perf_counter() - t0)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.llm.update_weights({"update_info": update_info})
        self._time("sync/receive", time.perf_counter() - t0)
        workers = self.llm.collective_rpc("weight_sync_timings")
        for key in ("sync/wait", "sync/load"):  # inside the engine: the slowest worker's
            self._time(key, max(t.get(key, 0.0) for t in workers))

    def finish_weight_update(self, weight_version: int) -> None:
        t0 = time.perf_counter()
        self.llm.finish_weight_update(weight_version=str(weight_version))
        # KV computed with the old weights must not be reused.
        self.llm.reset_prefix_cache()
        self.version = weight_version
        self._time("sync/finish", time.perf_counter() - t0)

    def engine_world_size(self) -> int:
        """Workers (TP x PP) inside this engine: each takes one rank in the sync group."""
        return self.cfg.tensor_parallel_size
