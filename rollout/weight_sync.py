"""Learner -> generator weight transfer over a dedicated torch.distributed group.

One implementation for CPU and GPU: the group's backend is "gloo" (CPU) or "nccl"
(GPU) and nothing else differs. It plugs into vLLM's weight-transfer API
(`LLM(weight_transfer_config={"backend": ENGINE_NAME})`, then
`init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
`finish_weight_update`): the worker-side engine below is registered with vLLM's
factory when vLLM imports `WorkerExtension` (named by `worker_extension_cls`).

Wire format (rollout/buckets.py): the sender (group rank 0) sends the tensors named
in the update info, in that order, packed into flat uint8 buckets, one broadcast each.
Group ranks: 0 is the learner; engine i's worker w is `1 + i * world + w`, where
world = TP * PP of one engine (`rank_offset` carries `1 + i * world`).
"""
from __future__ import annotations

import logging
import random
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rollout import delta
from rollout.buckets import ENGINE_NAME, TensorMeta, bucket_layout, plan_buckets, unpack, vllm_layer
from rollout.shared import open_shared

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

def rendezvous_port(host: str = "") -> int:
    """A free TCP port for a rendezvous store, picked below the kernel's ephemeral range
    (/proc/sys/net/ipv4/ip_local_port_range): a port-0 bind (vLLM's get_open_port, Ray's
    workers) or an outgoing connection lands in that range, and could take the port
    between this pick and the store's listen (EADDRINUSE, seen in CI). Ray's own worker
    ports sit at 10002-19999, so the pick is from 20000 up to the range's start."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    top = low - 1 if low > 21000 else 65535  # an unusual range: fall back to above it
    bottom = 20000 if low > 21000 else 61000
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(bottom, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise OSError(f"no free port in {bottom}-{top} after 200 tries")


def open_group(
    host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
) -> "ProcessGroup":
    """Join the learner<->generators group without touching torch's default group
    (vLLM's and DeepSpeed's own groups stay as they are)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        host, port, rank, world_size, backend=backend, timeout=timedelta(seconds=timeout_s)
    )


def close_group(pg: "ProcessGroup") -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    stateless_destroy_torch_distributed_process_group(pg)


def broadcast(pg: "ProcessGroup", tensor: torch.Tensor) -> None:
    """Broadcast from group rank 0 (the learner) to every generator worker."""
    broadcast_async(pg, tensor).wait()


def broadcast_async(pg: "ProcessGroup", tensor: torch.Tensor) -> Any:
    """Start the broadcast and return its Work (wait() before touching `tensor`):
    both sides keep one bucket in flight while they pack or load the other."""
    return pg.broadcast([tensor], torch.distributed.BroadcastOptions())


def update_info(metas: list[TensorMeta], bucket_bytes: int, partial: bool = False, seq: int = 0,
                keep: bool = False, delta: dict[str, Any] | None = None,
                adapter: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a push carries (every tensor's name, dtype and full shape, in order).
    partial: the push carries only some layers (a LoRA policy's adapted ones, whole);
    the others keep their weights. seq: the push's number in this group; keep: the
    receivers keep what they received (sync.delta: the base of the next delta);
    delta: {"base": the seq it applies to, "counts": changed elements per tensor};
    adapter: a LoRA adapter push (its peft adapter_config): the tensors are the adapter's,
    written to a local peft directory that the engine serves, not loaded into the model."""
    return {
        "names": [m.name for m in metas],
        "dtype_names": [m.dtype for m in metas],
        "shapes": [list(m.shape) for m in metas],
        "bucket_bytes": bucket_bytes,
        "partial": partial,
        "seq": seq,
        "keep": keep,
        "delta": delta,
        "adapter": adapter,
    }


class WeightSyncClient(Protocol):
    """The generators' side of a sync, as the learner drives it (vLLM's
    `VLLMWeightSyncClient` shape). `update_weights` blocks until the matching
    broadcasts are done, so the learner runs it concurrently with sending."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self, weight_version: int) -> None: ...


# ----------------------------------------------------------------- generator side
# Everything below runs inside a vLLM worker process.

from vllm.distributed.weight_transfer.base import (  # noqa: E402
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory  # noqa: E402


@dataclass
class CollectiveInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    backend: str
    timeout_s: float  # sync.timeout_s, sent by the learner
    transport: str = "collective"  # sync.transport: "shared" opens no group (rollout/shared.py)
    node_id: str = ""  # shared: the learner's Ray node (the generator checks it shares it)


@dataclass
class CollectiveUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int
    partial: bool = False
    seq: int = 0
    keep: bool = False
    delta: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = None
    shared: dict[str, Any] | None = None  # sync.transport=shared: the handle of the learner's buffer

    def metas(self) -> list[TensorMeta]:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError("update info: names, dtype_names and shapes differ in length")
        return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


class CollectiveWeightTransferEngine(
    WeightTransferEngine[CollectiveInitInfo, CollectiveUpdateInfo]
):
    """Receives bucketed broadcasts and loads them through vLLM's layerwise reload
    (the only reload path that works on the CPU backend, which repacks linear weights)."""

    init_info_cls = CollectiveInitInfo
    update_info_cls = CollectiveUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: ProcessGroup | None = None
        self.shared = False  # sync.transport=shared: buckets are copied out of the learner's buffer
        self._source: tuple[Any, torch.Tensor] | None = None  # (its handle's identity, the buffer opened)
        self.timings: dict[str, float] = {}
        self.buffers: dict[str, torch.Tensor] = {}  # "arena": full pushes, "delta": delta pushes
        self.received: list[list[tuple[str, torch.Tensor]]] | None = None
        self.partial = False
        self.mirror: dict[str, torch.Tensor] | None = None  # sync.delta: the weights of push `mirror_seq`
        self.mirror_seq = -1
        self.reloading = False  # vLLM's layerwise reload begun (at the first tensor loaded into the model)
        self.adapter: dict[str, Any] | None = None  # the received push is an adapter (its peft config)
        self.adapter_path: str | None = None  # the last adapter written
        self.adapters_written = 0

    def init_transfer_engine(self, init_info: CollectiveInitInfo) -> None:
        self.shutdown()  # re-initialising (e.g. a new set of generators) leaves the old group
        self.mirror, self.mirror_seq = None, -1  # a new group starts with a full push
        self.shared = init_info.transport == "shared"
        if self.shared:
            return
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.group = open_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            init_info.backend,
            init_info.timeout_s,
        )

    def start_weight_update(self) -> None:
        """The model's layerwise reload begins at the first tensor loaded into it
        (`begin_reload`): an adapter push loads none."""
        self.reloading = False

    def begin_reload(self) -> None:
        if not self.reloading:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)
            self.reloading = True

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which fails on
        # CPU; broadcasts here are waited on, so only CUDA needs a sync.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _buckets(self, metas: list[TensorMeta], info: CollectiveUpdateInfo) -> tuple[list[list[TensorMeta]], list[int]]:
        if self.group is None and not self.shared:
            raise RuntimeError("weight transfer not initialised: call init_weight_transfer_engine")
        if self.shared != (info.shared is not None):
            raise RuntimeError(f"update info: this engine was set up for the {'shared' if self.shared else 'collective'} "
                               f"transport, the push comes by the {'shared' if info.shared else 'collective'} one")
        self.partial = info.partial
        buckets = [[metas[i] for i in b] for b in plan_buckets(metas, info.bucket_bytes)]
        return buckets, [sum(m.nbytes for m in b) for b in buckets]

    def _receive(self, metas: list[TensorMeta], info: CollectiveUpdateInfo, slot: str) -> list[list[tuple[str, torch.Tensor]]]:
        """Every bucket of `metas` into the buffer `slot`, kept across syncs: -> the
        tensors, per bucket (views into the buffer)."""
        buckets, sizes = self._buckets(metas, info)
        starts, total = bucket_layout(sizes)
        arena = self._buffer(slot, total)
        flats = [arena[start : start + size] for start, size in zip(starts, sizes)]
        if info.shared is not None:  # the same layout in the learner's buffer: one copy
            arena[:total].copy_(self._shared_source(info.shared, total)[:total])
        else:
            for work in [broadcast_async(self.group, flat) for flat in flats]:
                work.wait()
        return [unpack(flat, b) for flat, b in zip(flats, buckets)]

    def receive_into_arena(self, info: CollectiveUpdateInfo) -> None:
        """CPU (and GPU with sync.delta): receive every bucket into one arena kept across
        syncs, loading nothing (the engine may keep sampling meanwhile); `load_received`
        loads them. The arena then holds the weights just sent: a delta push (sync.delta)
        is applied to it, and only its vLLM layers that changed are loaded.

        malloc returns big blocks to the OS, and faulting fresh pages in costs more
        than the transfer, hence the kept arena. It never reuses memory within a sync
        (partly loaded layers may keep views of earlier buckets), so all buckets are
        received first, then loaded: on CPU the receiving thread and the loader's
        OpenMP threads would compete for the same cores (measured: overlapping them is
        ~15% slower on 2 cores)."""
        t0 = time.perf_counter()
        metas = info.metas()
        self.adapter = info.adapter
        if info.delta is None:
            self.received = self._receive(metas, info, "arena")
            self.mirror = {name: t for bucket in self.received for name, t in bucket} if info.keep else None
            self.mirror_seq = info.seq
        else:
            self.received = [self._apply_delta(metas, info)]
        self.timings = {"sync/wait": time.perf_counter() - t0, "sync/load": 0.0}

    def _apply_delta(self, metas: list[TensorMeta], info: CollectiveUpdateInfo) -> list[tuple[str, torch.Tensor]]:
        """Receive a delta push, bring the kept copy up to date -> the tensors of every
        vLLM layer that changed (whole layers: vLLM reloads a layer from all of them)."""
        base, counts = info.delta["base"], list(info.delta["counts"])
        if self.mirror is None or self.mirror_seq != base:
            raise RuntimeError(f"delta push {info.seq} applies to push {base}, but this worker holds "
                               f"{'no kept push' if self.mirror is None else f'push {self.mirror_seq}'}: "
                               f"it needs a full push (reconnect)")
        if [m.name for m in metas] != list(self.mirror):
            raise RuntimeError("delta push: its tensors are not those of the kept push")
        parts = iter(t for bucket in self._receive(delta.wire(metas, counts), info, "delta") for _, t in bucket)
        layers = set()
        for meta, count in zip(metas, counts):
            kind = delta.encoding(meta, count)
            delta.apply(self.mirror[meta.name], meta, count,
                        [next(parts) for _ in range(delta.PARTS[kind])])
            if count:
                layers.add(vllm_layer(meta.name))
        self.mirror_seq = info.seq
        return [(name, t) for name, t in self.mirror.items() if vllm_layer(name) in layers]

    def load_received(self) -> None:
        """Load what receive_into_arena received (between start_ and finish_weight_update)."""
        if self.received is None:
            raise RuntimeError("no received weights to load")
        t0 = time.perf_counter()
        if self.adapter is not None:
            self.adapter_path = self._write_adapter([t for bucket in self.received for t in bucket])
        else:
            for tensors in self.received:
                if tensors:
                    self.begin_reload()
                    self.model.load_weights(iter(tensors))
        self.received = None
        self.timings["sync/load"] = time.perf_counter() - t0

    def _write_adapter(self, tensors: list[tuple[str, torch.Tensor]]) -> str:
        """The adapter as a peft directory (adapter_config.json, adapter_model.safetensors),
        written beside the last two and renamed into place: vLLM never reads half a file.
        The directory is local to this node and this process (a LoRARequest needs a path)."""
        import json
        import os
        import shutil
        import tempfile

        from safetensors.torch import save_file

        root = os.path.join(tempfile.gettempdir(), f"grpo-adapters-{os.getpid()}")
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.adapters_written += 1
        final = os.path.join(root, f"push-{self.adapters_written}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({name: t.contiguous().cpu() for name, t in tensors}, os.path.join(tmp, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(self.adapter, f)
        os.rename(tmp, final)
        shutil.rmtree(os.path.join(root, f"push-{self.adapters_written - 2}"), ignore_errors=True)  # keep the last two
        return final

    def receive_weights(self, info: CollectiveUpdateInfo) -> None:
        """Receive and load (vLLM's update_weights path). On GPUs the caching allocator
        already reuses memory and a spare model copy costs too much: each bucket gets
        its own buffer, and the next bucket arrives while this one loads."""
        # sync.delta: the kept copy costs the model's size; an adapter is written, not loaded
        if self.device.type == "cpu" or info.keep or info.adapter is not None:
            self.receive_into_arena(info)
            self.load_received()
            return
        buckets, sizes = self._buckets(info.metas(), info)
        if info.shared is not None:  # GPU, shared: load straight from the learner's buffer
            t0 = time.perf_counter()
            starts, total = bucket_layout(sizes)
            source = self._shared_source(info.shared, total)
            for bucket_metas, start, size in zip(buckets, starts, sizes):
                self.begin_reload()
                self.model.load_weights(unpack(source[start : start + size], bucket_metas))
            self.timings = {"sync/wait": 0.0, "sync/load": time.perf_counter() - t0}
            return
        waited = loaded = 0.0
        pending = None
        for k, bucket_metas in enumerate(buckets):
            if pending is None:
                flat = torch.empty(sizes[k], dtype=torch.uint8, device=self.device)
                pending = flat, broadcast_async(self.group, flat)
            flat, work = pending
            t0 = time.perf_counter()
            work.wait()
            t1 = time.perf_counter()
            pending = None
            if k + 1 < len(buckets):  # arrives while this bucket loads
                nxt = torch.empty(sizes[k + 1], dtype=torch.uint8, device=self.device)
                pending = nxt, broadcast_async(self.group, nxt)
            self.begin_reload()
            self.model.load_weights(unpack(flat, bucket_metas))
            waited += t1 - t0
            loaded += time.perf_counter() - t1
        self.timings = {"sync/wait": waited, "sync/load": loaded}

    def _shared_source(self, handle: dict[str, Any], nbytes: int) -> torch.Tensor:
        """The learner's buffer, opened once per export (a grown buffer comes with a new handle)."""
        # a regrown buffer may reuse the CUDA segment at another offset: all three name it
        key = (handle.get("path") or handle.get("handle"), handle.get("storage_offset_bytes"), handle.get("nbytes"))
        if self._source is None or self._source[0] != key:
            self._source = None
            self._source = (key, open_shared(handle, self.device))
        source = self._source[1]
        if source.numel() < nbytes:
            raise ValueError(f"shared transport: the learner's buffer holds {source.numel()} bytes, the push needs {nbytes}")
        return source

    def _buffer(self, slot: str, nbytes: int) -> torch.Tensor:
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            self.buffers.pop(slot, None)  # free the old one first
            buf = self.buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        # a partial push leaves the other layers as they were, each of which vLLM reports as
        # "Failed to load weights": expected there, so not logged
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        quiet = _DropMessage("Failed to load weights")
        if not self.reloading:  # nothing was loaded into the model (an adapter push, an empty delta)
            return
        if self.shared and self.device.type == "cuda":  # the reload's last layers still read the learner's buffer
            torch.cuda.synchronize(self.device)
        if self.partial:
            layerwise.addFilter(quiet)
        try:
            finalize_layerwise_reload(self.model, self.model_config)
        finally:
            layerwise.removeFilter(quiet)
            self.reloading = False
        _refresh_tied_lm_head(self.model)

    def shutdown(self) -> None:
        self._source = None
        if self.group is not None:
            close_group(self.group)
            self.group = None


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def _refresh_tied_lm_head(model: torch.nn.Module) -> None:
    """With tied embeddings, the layerwise reload post-processes only the embedding:
    the output layer's repacked copy (CPU backend) stays stale unless re-processed."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or lm_head.weight is not embed.weight:
        return
    quant_method = getattr(lm_head, "quant_method", None)
    if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
        quant_method.process_weights_after_loading(lm_head)


try:
    WeightTransferEngineFactory.register_engine(ENGINE_NAME, CollectiveWeightTransferEngine)
except ValueError:  # already registered (module imported twice)
    pass


class WorkerExtension:
    """Named by `worker_extension_cls`, so that vLLM imports this module in every
    worker process (TP workers included) before the engine is created, which
    registers ENGINE_NAME with vLLM's factory. Its methods join the worker's
    (`LLM.collective_rpc(name)`)."""

    def weight_sync_timings(self) -> dict[str, float]:
        """Seconds the last update spent waiting on the wire and loading (this worker)."""
        engine = getattr(self, "weight_transfer_engine", None)
        return dict(engine.timings) if isinstance(engine, CollectiveWeightTransferEngine) else {}

    def receive_weights_only(self, update_info: dict[str, Any]) -> None:
        """CPU: receive an update into the arena without touching the model (safe while
        the engine steps: only the transfer group and the arena are used)."""
        engine = self.weight_transfer_engine
        engine.receive_into_arena(engine.parse_update_info(update_info))

    def load_received_weights(self) -> None:
        self.weight_transfer_engine.load_received()

    def received_adapter_path(self) -> str | None:
        """The peft directory of the last adapter push (None: no adapter received)."""
        engine = getattr(self, "weight_transfer_engine", None)
        return getattr(engine, "adapter_path", None)

    def kept_weights_digest(self) -> dict[str, str]:
        """sync.delta: a SHA-256 of each tensor of the kept copy (the weights of the last
        push, which the next delta applies to), as float32 bytes; {} when none is kept."""
        import hashlib

        engine = getattr(self, "weight_transfer_engine", None)
        mirror = getattr(engine, "mirror", None) or {}
        return {name: hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest() for name, t in mirror.items()}

