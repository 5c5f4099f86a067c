"""One learner rank: a DeepSpeed engine in a Ray actor (wrapped by cluster/placement.py).

train_step: scored groups -> group-relative advantages -> recomputed old logprobs ->
clipped policy-gradient updates (optionally KL to a frozen reference) -> metrics.
Rank 0 also streams the new weights to the generators (learner/broadcast.py).
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learner import algos
from learner.config import LearnerConfig
from rollout.config import WeightSyncConfig
from rollout.types import Group


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    loss_mask: torch.Tensor  # (B, L-1): 1 where the target input_ids[:, t+1] is a completion token
    advantages: torch.Tensor  # (B,)
    sampler_logprobs: torch.Tensor  # (B, L-1) the generator's logprobs, 0 off-mask

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.loss_mask, self.advantages, self.sampler_logprobs)

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(*(t[start:stop] for t in self._fields()))

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in self._fields()))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def build_batch(groups: list[Group], advantages: torch.Tensor, pad_id: int, mask_truncated: bool = False) -> Batch:
    """Flatten groups into padded tensors; advantages (G, n) in the groups' order.
    mask_truncated: samples cut at max_tokens get no loss (DAPO's overlong filtering)."""
    seqs = [(g.prompt_ids, s) for g in groups for s in g.samples]
    length = max(len(p) + len(s.completion_ids) for p, s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    loss_mask = torch.zeros((B, length - 1))
    sampler = torch.zeros((B, length - 1))
    for i, (prompt, s) in enumerate(seqs):
        P, C = len(prompt), len(s.completion_ids)
        input_ids[i, : P + C] = torch.tensor(list(prompt) + list(s.completion_ids))
        attention[i, : P + C] = 1
        loss_mask[i, P - 1 : P + C - 1] = 0.0 if (mask_truncated and s.finish_reason == "length") else 1.0
        sampler[i, P - 1 : P + C - 1] = torch.tensor(s.logprobs)
    return Batch(input_ids, attention, loss_mask, advantages.reshape(-1).float(), sampler)


def deepspeed_config(cfg: LearnerConfig, micro: int, accumulation: int, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no 30-50 s op compilation on first use.
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, cfg: LearnerConfig, total: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up (the
    first step already uses lr / (warmup + 1), never 0), then constant or cosine
    decay reaching min_lr_ratio at the last of `total` steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(total - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Learner:
    def __init__(
        self,
        model_path: str,
        cfg: LearnerConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        sequences_per_step: int,
        total_steps: int,
        temperature: float,
        max_tokens: int,
        dist_backend: str = "gloo",
    ) -> None:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size),
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.model_path = model_path
        self.temperature, self.max_tokens = temperature, max_tokens
        # Resolved once: an unknown name fails here, when the actor starts.
        self.policy_loss = algos.lookup(algos.POLICY_LOSSES, cfg.policy_loss, "policy loss")
        self.reduce = algos.lookup(algos.REDUCTIONS, cfg.reduction, "reduction")
        self.kl = algos.lookup(algos.KL_ESTIMATORS, cfg.kl_estimator, "KL estimator")
        algos.lookup(algos.ADVANTAGES, cfg.advantage, "advantage estimator")
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id or 0
        deepspeed.init_distributed(dist_backend=dist_backend)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        # Sequences one rank sees per optimizer step -> micro-batches to accumulate.
        per_update = math.ceil(sequences_per_step / world_size / cfg.updates_per_step)
        self.micro = min(cfg.micro_batch_size, per_update)
        self.accumulation = math.ceil(per_update / self.micro)
        schedule = functools.partial(lr_factor, cfg=cfg, total=total_steps * cfg.updates_per_step)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, self.micro, self.accumulation, world_size),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.ref = None
        if cfg.kl_coef > 0:  # the frozen reference: sharded like the policy under ZeRO-3
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
            ref.requires_grad_(False)
            if cfg.zero_stage == 3:
                ref_config = {k: v for k, v in deepspeed_config(cfg, self.micro, self.accumulation, world_size).items()
                              if k not in ("optimizer", "gradient_clipping")}
                ref = deepspeed.initialize(model=ref, config=ref_config)[0].module
            self.ref = ref.to(self.engine.device)
        self.broadcaster = None
        self.steps_done = 0

    # ----------------------------------------------------------------- training
    def _forward(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logprob of each next token (B, L-1), its distribution's entropy (B, L-1), no grad)."""
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logp = algos.token_logprobs(logits, batch.input_ids[:, 1:], self.temperature)
        with torch.no_grad():
            ent = algos.entropy(logits, self.temperature)
        return logp, ent

    @torch.no_grad()
    def _score(self, model, batch: Batch) -> torch.Tensor:
        out = []
        for start in range(0, len(batch), self.micro):
            logits = model(input_ids=batch.input_ids[start : start + self.micro],
                           attention_mask=batch.attention_mask[start : start + self.micro]).logits[:, :-1]
            out.append(algos.token_logprobs(logits, batch.input_ids[start : start + self.micro, 1:], self.temperature))
        return torch.cat(out)

    def _global_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def train_step(
        self, groups: list[Group], shard: tuple[int, int] | None = None, capture_gradients: bool = False
    ) -> dict[str, Any]:
        """One rollout batch -> cfg.updates_per_step optimizer steps on this rank's
        shard (groups[start:stop]; all when None). Advantages see every group of the
        step (batch-level estimators need them). Returns metrics over the shard;
        capture_gradients adds "gradients": the first update's final (reduced)
        gradient per parameter, for equivalence checks."""
        t0 = time.perf_counter()
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)  # (G, n)
        advantages = algos.lookup(algos.ADVANTAGES, self.cfg.advantage, "advantage estimator")(rewards, self.cfg.adv_eps)
        start, stop = shard or (0, len(groups))
        batch = build_batch(groups[start:stop], advantages[start:stop], self.pad_id, self.cfg.mask_truncated)
        batch = batch.to(self.engine.device)

        self.engine.eval()  # no dropout in the recomputation
        old_logprobs = self._score(self.engine.module, batch)
        ref_logprobs = self._score(self.ref, batch) if self.ref is not None else None
        self.engine.train()

        sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "tokens": 0.0}
        sums["sampler_logprob_diff"] = float(((old_logprobs - batch.sampler_logprobs).abs() * batch.loss_mask).sum())
        grad_norms: list[float] = []
        minibatch = math.ceil(len(batch) / self.cfg.updates_per_step)
        for m_start in range(0, len(batch), minibatch):
            mini = batch.slice(m_start, m_start + minibatch)
            # Sizes of the whole mini-batch on every rank, however it is split.
            norm = algos.Normaliser(
                tokens=self._global_sum(float(mini.loss_mask.sum())),
                sequences=self._global_sum(float((mini.loss_mask.sum(dim=-1) > 0).sum())),
                constant=float(self.max_tokens),
            )
            micro_slices = [(s, min(s + self.micro, len(mini))) for s in range(0, len(mini), self.micro)]
            if len(micro_slices) > self.accumulation:
                raise ValueError(
                    f"rank {self.rank}: {len(mini)} sequences in one update exceed the configured "
                    f"{self.micro} x {self.accumulation} (sequences_per_step / ranks / updates_per_step)"
                )
            for k in range(self.accumulation):
                lo, hi = micro_slices[k] if k < len(micro_slices) else (len(mini), len(mini))
                lo, hi = m_start + lo, m_start + hi
                loss = self._micro_step(batch.slice(lo, hi), old_logprobs[lo:hi],
                                        None if ref_logprobs is None else ref_logprobs[lo:hi], norm, sums)
                # DeepSpeed averages gradients over ranks: undo it (the normaliser is global).
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                boundary = k == self.accumulation - 1
                if boundary and capture_gradients and not grad_norms:
                    captured = self._full_gradients()
                # Stage 0 keeps plain .grad (gone after step); ZeRO's optimizers compute the norm in step().
                norm_before = self._local_grad_norm() if boundary and self.cfg.zero_stage == 0 else None
                self.engine.step()
                if boundary:
                    grad_norms.append(norm_before if norm_before is not None else float(self.engine.get_global_grad_norm() or 0.0))
        self.steps_done += 1
        tokens = sums.pop("tokens")
        metrics = {f"train/{k}": v / max(tokens, 1.0) for k, v in sums.items()}
        metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["train/lr"] = float(self.engine.get_lr()[0])
        metrics["train/seconds"] = time.perf_counter() - t0
        if capture_gradients:
            metrics["gradients"] = captured
        return metrics

    def _full_gradients(self) -> dict[str, Any]:
        """The accumulated, reduced gradient of every parameter (gathered under ZeRO;
        a collective there, so every rank calls it)."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.engine.module.named_parameters():
            grad = safe_get_full_grad(p)
            if grad is not None:
                out[name] = grad.detach().float().cpu().numpy().copy()
        return out

    def _local_grad_norm(self) -> float:
        """L2 norm of the accumulated (already reduced) .grad tensors, before clipping."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0

    def _micro_step(self, micro: Batch, old_logprobs, ref_logprobs, norm: algos.Normaliser, sums) -> torch.Tensor:
        if len(micro) == 0:  # an empty slot keeps DeepSpeed's accumulation count aligned
            return sum(p.sum() * 0.0 for p in self.engine.module.parameters())
        logp, ent = self._forward(self.engine.module, micro)
        mask = micro.loss_mask
        per_token, clipped = self.policy_loss(
            algos.LossInputs(logp, old_logprobs, micro.advantages, mask, self.cfg.clip_low, self.cfg.clip_high)
        )
        if ref_logprobs is not None:
            kl = self.kl(logp, ref_logprobs)
            per_token = per_token + self.cfg.kl_coef * kl
            sums["kl"] += float((kl.detach() * mask).sum())
        sums["loss"] += float((per_token.detach() * mask).sum())
        sums["clip_frac"] += float((clipped * mask).sum())
        sums["entropy"] += float((ent * mask).sum())
        sums["tokens"] += float(mask.sum())
        return self.reduce(per_token, mask, norm)

    # ------------------------------------------------------------ weights out
    def connect_generators(self, generators: list[Any] | None, engine_world_sizes: list[int] | None,
                           sync: WeightSyncConfig) -> None:
        """Rank 0 (with the generators' handles) opens the transfer group; the other
        ranks (generators=None) only take part in ZeRO-3's per-bucket gathers."""
        from learner.broadcast import WeightBroadcaster
        from rollout.client import GeneratorsClient

        if self.broadcaster is not None:  # reconnecting (another set of generators)
            self.broadcaster.close()
        if generators is None:
            self.broadcaster = WeightBroadcaster(self.engine.module, sync, None)
            return
        client = GeneratorsClient(generators, engine_world_sizes)
        self.broadcaster = WeightBroadcaster(self.engine.module, sync, client)
        self.broadcaster.connect(client.world_size)

    def broadcast_weights(self, version: int) -> dict[str, float]:
        """Every rank is called; under ZeRO-3 all join the per-bucket gathers, otherwise
        only rank 0 (which holds full weights) has work."""
        if self.broadcaster.client is None and self.cfg.zero_stage < 3:
            return {}
        return self.broadcaster.send(version)

    def save_hf(self, path: str) -> str:
        """Export the policy as an HF model directory (transformers and vLLM load it)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = self._full_state_dict()
        if self.rank != 0:
            return str(out)
        self.engine.module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        for f in Path(self.model_path).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, out / f.name)
        return str(out)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint of this rank (weights, optimizer, LR schedule); every rank calls it."""
        self.engine.save_checkpoint(path, tag="state", client_state={"steps_done": self.steps_done,
                                                                     "torch_rng": torch.get_rng_state()})

    def load_checkpoint(self, path: str) -> None:
        _, client = self.engine.load_checkpoint(
            path, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        self.steps_done = client["steps_done"]
        torch.set_rng_state(client["torch_rng"])

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) weights on CPU; a collective under ZeRO-3 (every rank calls)."""
        from learner.broadcast import _gathered

        module = self.engine.module
        copies: dict[int, torch.Tensor] = {}  # tied weights stay one tensor (saved once)
        out = {}
        with _gathered(list(module.parameters())):
            for k, v in module.state_dict().items():
                if v.data_ptr() not in copies:
                    copies[v.data_ptr()] = v.detach().cpu().clone()
                out[k] = copies[v.data_ptr()]
        return out

    def state_dict_numpy(self) -> dict[str, Any]:
        return {k: v.float().numpy() for k, v in self._full_state_dict().items()}

    def ready(self) -> int:
        return self.rank
