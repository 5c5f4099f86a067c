"""The learner's side of a weight sync: stream the policy's parameters to every
generator over the dedicated group defined in rollout/weight_sync.py.

Rank 0 of the learner is the sender (group rank 0). The same code runs on gloo (CPU)
and nccl (GPU): only `WeightSyncConfig.backend` differs. Under ZeRO-3 every rank
runs `send`: each bucket is gathered (a collective), sent by rank 0, and freed, so
the whole model is never gathered at once.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from learner.lora import adapter_config, adapter_entries, is_peft, push_entries
from rollout import delta
from rollout.config import WeightSyncConfig
from rollout.buckets import TensorMeta, bucket_layout, pack, plan_buckets
from rollout.shared import SharedBuffer
from rollout.weight_sync import WeightSyncClient, broadcast_async, close_group, open_group, rendezvous_port, update_info


def parameter_metas(module: torch.nn.Module) -> list[TensorMeta]:
    """Name, dtype and full shape of every tensor a push carries, in `named_parameters()`
    order (layer order, a tied output layer listed once, as vLLM's loader expects; a LoRA
    policy: learner/lora.py). Reads ZeRO-3's `ds_shape` so no gather is needed."""
    return [e.meta for e in push_entries(module)]


def gathered(params: list[torch.nn.Parameter]):
    """ZeRO-3: the full values of `params` inside the block (all ranks enter it)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class WeightBroadcaster:
    """client is None on the ranks that only join ZeRO-3's gathers (not the sender)."""

    def __init__(self, module: torch.nn.Module, cfg: WeightSyncConfig, client: WeightSyncClient | None,
                 adapter: bool = False) -> None:
        self.module = module
        self.cfg = cfg
        self.adapter = adapter  # learner.lora.push=adapter: the adapter tensors alone travel
        self.client = client
        self.group = None
        self.connected = False
        self.bucket_bytes = int(cfg.bucket_mb * 2**20)
        self._pool = ThreadPoolExecutor(max_workers=1)
        # Two pack buffers, kept across syncs (one packs while the other is sent):
        # freshly allocated ones cost page faults on every sync (CPU).
        self._pack_buffers: list[torch.Tensor | None] = [None, None]
        # sync.delta: a copy of what the last push sent (flat, per tensor) and its number in
        # this group; a new broadcaster (a new group) starts with a full push
        self._last: list[torch.Tensor] | None = None
        self._seq = 0
        # sync.transport=shared: the buffer the generators open by handle (no group)
        self.shared = SharedBuffer(next(module.parameters()).device) if cfg.transport == "shared" else None

    def connect(self, world_size: int) -> None:
        """Rendezvous with every generator worker (both sides must join at once), on this
        node's address (or sync.master_address), never a loopback others cannot reach."""
        import ray

        if self.shared is not None:  # no group: each generator checks it runs on this node
            self.client.init_weight_transfer_engine({"transport": "shared", "node_id": ray.get_runtime_context().get_node_id(),
                                                     "master_address": "", "master_port": 0, "backend": self.cfg.backend,
                                                     "timeout_s": self.cfg.timeout_s})
            self.connected = True
            return
        host = self.cfg.master_address or ray.util.get_node_ip_address()
        port = self.cfg.master_port or rendezvous_port()
        init_info = {"master_address": host, "master_port": port, "backend": self.cfg.backend,
                     "timeout_s": self.cfg.timeout_s}
        pending = self._pool.submit(self.client.init_weight_transfer_engine, init_info)
        self.group = open_group(host, port, 0, world_size, self.cfg.backend, self.cfg.timeout_s)
        pending.result(timeout=self.cfg.timeout_s)
        self.connected = True

    @torch.no_grad()
    def send(self, version: int) -> dict[str, float]:
        """Stream the policy to the generators, which serve `version` after. With
        sync.delta, every push after the group's first sends only the elements that
        changed since the previous one (rollout/delta.py); a new group (reconnect: a
        replaced generator, a new learner) or a failed push starts again from a full one."""
        sender = self.client is not None
        if sender and not self.connected:
            raise RuntimeError("WeightBroadcaster.connect() must run before send()")
        t0 = time.perf_counter()
        entries = adapter_entries(self.module) if self.adapter else push_entries(self.module)
        metas = [e.meta for e in entries]
        metrics: dict[str, float] = {}
        try:
            if sender and self.cfg.delta and self._last is not None:
                counts, tensors = [], []
                for e, last in zip(entries, self._last):
                    count, parts = delta.encode(e.meta, e.value(), last)
                    counts.append(count)
                    tensors += parts
                wire = delta.wire(metas, counts)
                metrics = {"sync/changed_frac": sum(counts) / max(sum(m.numel for m in metas), 1),
                           "sync/full_bytes": float(sum(m.nbytes for m in metas))}
                info = update_info(metas, self.bucket_bytes, partial=True, seq=self._seq + 1, keep=True,
                                   delta={"base": self._seq, "counts": counts})
                nbytes = self._stream(version, info, wire, tensors.__getitem__, lambda bucket: [])
            else:
                kept: list[torch.Tensor] | None = [] if sender and self.cfg.delta else None
                info = update_info(metas, self.bucket_bytes, partial=is_peft(self.module), seq=self._seq + 1,
                                   keep=self.cfg.delta, adapter=adapter_config(self.module) if self.adapter else None
                                   ) if sender else None

                def value(i: int) -> torch.Tensor:
                    v = entries[i].value()
                    if kept is not None:  # the base of the next delta
                        kept.append(v.detach().reshape(-1).clone())
                    return v

                nbytes = self._stream(version, info, metas, value,
                                      lambda bucket: [p for i in bucket for p in entries[i].sources])
                if kept is not None:
                    self._last = kept
        except BaseException:
            self._last = None  # the generators' copies may no longer match ours: the next push is full
            raise
        self._seq += 1
        return {"sync/bytes": float(nbytes), "sync/seconds": time.perf_counter() - t0, **metrics}

    def _stream(self, version: int, info: dict[str, Any] | None, metas: list[TensorMeta],
                value: Callable[[int], torch.Tensor], sources: Callable[[list[int]], list[torch.nn.Parameter]]) -> int:
        """Send `metas` (values from `value(i)`) as packed buckets, one broadcast each,
        while the generators receive (`info`: None on the ranks that only join ZeRO-3's
        gathers); -> bytes sent."""
        if self.shared is not None:
            return self._stream_shared(version, info, metas, value, sources)
        sender = info is not None
        if sender:
            self.client.start_weight_update()
            # The generators' receive blocks inside the broadcasts: run it alongside.
            receiving = self._pool.submit(self.client.update_weights, info)
        nbytes = 0
        in_flight = None  # the previous bucket's broadcast: it travels while this one is packed
        for k, bucket in enumerate(plan_buckets(metas, self.bucket_bytes)):
            params = sources(bucket)
            zero3 = any(hasattr(p, "ds_id") for p in params)
            with gathered(params):
                if not sender:
                    continue
                tensors = [value(i) for i in bucket]
                flat = pack(tensors, self._pack_buffer(k % 2, sum(metas[i].nbytes for i in bucket), tensors[0].device)
                            if len(tensors) > 1 else None)
                if receiving.done():  # a generator failed before joining: surface it, don't hang
                    receiving.result()
                if in_flight is not None:
                    in_flight.wait()
                in_flight = broadcast_async(self.group, flat)
                nbytes += flat.numel()
                if zero3:  # ZeRO-3 frees the gathered values when the block ends
                    in_flight.wait()
                    in_flight = None
        if in_flight is not None:
            in_flight.wait()
        if sender:
            receiving.result(timeout=self.cfg.timeout_s)
            self.client.finish_weight_update(version)
        return nbytes

    def _stream_shared(self, version: int, info: dict[str, Any] | None, metas: list[TensorMeta],
                       value: Callable[[int], torch.Tensor], sources: Callable[[list[int]], list[torch.nn.Parameter]]) -> int:
        """sync.transport=shared: every bucket packed into the exported buffer (the layout
        the receivers' arena uses), then one update call hands them its handle; the
        buffer is not touched again until every generator has copied it out."""
        sender = info is not None
        buckets = plan_buckets(metas, self.bucket_bytes)
        sizes = [sum(metas[i].nbytes for i in bucket) for bucket in buckets]
        starts, total = bucket_layout(sizes)
        buffer = self.shared.get(total) if sender else None
        if sender:
            self.client.start_weight_update()
        for bucket, start, size in zip(buckets, starts, sizes):
            with gathered(sources(bucket)):
                if sender:
                    pack([value(i) for i in bucket], buffer[start:start + size])
        if sender:
            if buffer.device.type == "cuda":
                torch.cuda.synchronize(buffer.device)  # written before another process reads it
            self.client.update_weights({**info, "shared": self.shared.handle()})
            self.client.finish_weight_update(version)
        return sum(sizes) if sender else 0

    def _pack_buffer(self, slot: int, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = self._pack_buffers[slot]
        if buf is None or buf.numel() < nbytes or buf.device != device:
            self._pack_buffers[slot] = None
            buf = self._pack_buffers[slot] = torch.empty(max(nbytes, self.bucket_bytes), dtype=torch.uint8, device=device)
        return buf

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
        elif self.group is not None:
            close_group(self.group)
        self.group, self.connected = None, False
        self._pool.shutdown(wait=False)
