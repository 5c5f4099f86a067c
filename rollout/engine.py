"""The generator's vLLM engine: its environment, its arguments, and one sample's
sampling parameters (benchmarks build raw engines from the same pieces).

The engine runs in the actor's own process (no engine subprocess). Every sample is its
own vLLM request with its own seed (rollout/seeds.py), and records the behaviour logprob
of each token (`logprobs_mode=processed_logprobs`: temperature applied).
"""
from __future__ import annotations

import os
from typing import Any

from rollout.buckets import ENGINE_NAME
from rollout.config import RolloutConfig

# Set before vLLM is imported (the actor's runtime_env sets them too).
ENGINE_ENV = {
    # Run the engine inside the actor process: ~3-10 s start instead of ~30 s, no
    # core pinning, and tensors pass through collective_rpc as tensors.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Every weight sync logs several INFO/WARNING lines per engine (layerwise reload
    # of the tied output layer and rotary buffers, which are not sent on purpose).
    "VLLM_LOGGING_LEVEL": "ERROR",
}


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts."""


def engine_kwargs(model_path: str, cfg: RolloutConfig, index: int = 0, lora_rank: int = 0,
                  sleep_mode: bool = False) -> dict[str, Any]:
    """Arguments of the engine's `vllm.LLM(...)` (benchmarks build raw engines from these too).
    lora_rank > 0: the engine serves a LoRA adapter of that rank (learner.lora.push=adapter;
    vLLM's CPU build then turns compilation off). sleep_mode: vLLM's sleep mode (CUDA only;
    colocated on GPUs)."""
    lora = {}
    if lora_rank:
        rank = next((r for r in LORA_RANKS if r >= lora_rank), None)
        if rank is None:
            raise ValueError(f"learner.lora.rank={lora_rank}: vLLM serves adapters of rank <= {LORA_RANKS[-1]}")
        lora = dict(enable_lora=True, max_lora_rank=rank, max_loras=1, max_cpu_loras=2)
    sleep = {"enable_sleep_mode": True} if sleep_mode else {}
    return dict(**lora, **sleep,
        model=model_path,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
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
        enable_chunked_prefill=not cpu_platform(),
        # Tensor parallel inside a Ray actor: vLLM's Ray executor, on the placement group
        # the actor was scheduled in (cluster/actors/factory.py).
        distributed_executor_backend="ray" if cfg.tensor_parallel_size > 1 else None,
    )


def sample_params(cfg: RolloutConfig, seed: int, sampling: dict[str, Any] | None = None,
                  stop_ids: list[int] | None = None) -> Any:
    """One sample's SamplingParams: the training settings, or `sampling` overrides
    (temperature, top_p, max_tokens; logprobs=False to skip them) for evaluation;
    `stop`: strings that end the completion (kept in it).
    stop_ids: the tokens that end a completion (rollout/tokens.py), kept in its ids."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, logprobs=True, stop=None)
    s.update(sampling or {})
    stop = list(s["stop"] or [])
    if any(not isinstance(x, str) or not x for x in stop):
        raise ValueError(f"sampling stop: each stop string must be a non-empty string, got {stop!r}")
    # detokenize=False: no incremental detokenisation at every engine step (on the default
    # batch, 1 core: 1.22 -> 0.97 s raw); the generator decodes each finished sample once.
    # Stop strings (one turn of an episode, e.g. "</python>") need vLLM to detokenise as it
    # samples; they are kept in the output, and the sample's text is still decoded from its ids.
    return SamplingParams(n=1, temperature=s["temperature"], top_p=s["top_p"], max_tokens=s["max_tokens"],
                          logprobs=0 if s["logprobs"] else None, seed=seed, output_kind=RequestOutputKind.FINAL_ONLY,
                          detokenize=bool(stop), stop=stop or None, include_stop_str_in_output=bool(stop),
                          stop_token_ids=list(stop_ids or []))


def start_engine(model_path: str, cfg: RolloutConfig, index: int = 0, lora_rank: int = 0,
                 sleep_mode: bool = False) -> Any:
    """A vLLM engine in this process, with ENGINE_ENV applied first."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
    from vllm import LLM

    return LLM(**engine_kwargs(model_path, cfg, index, lora_rank, sleep_mode))


def cpu_platform() -> bool:
    """Whether vLLM runs on its CPU backend here."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
