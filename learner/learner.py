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


def build_batch(groups: list[Group], advantages: torch.Tensor, pad_id: int) -> Batch:
    """Flatten groups into padded tensors; advantages (G, n) in the groups' order."""
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
        loss_mask[i, P - 1 : P + C - 1] = 1.0
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
        self.temperature = temperature
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
        if cfg.kl_coef > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self.engine.device).eval()
            self.ref.requires_grad_(False)
        self.broadcaster = None
        self.steps_done = 0

    # ----------------------------------------------------------------- training
    def _logprobs(self, model, batch: Batch) -> torch.Tensor:
        """-> logprob of each next token (B, L-1)."""
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        return algos.token_logprobs(logits, batch.input_ids[:, 1:], self.temperature)

    @torch.no_grad()
    def _score(self, model, batch: Batch) -> torch.Tensor:
        out = []
        for start in range(0, len(batch), self.micro):
            out.append(self._logprobs(model, batch.slice(start, start + self.micro)))
        return torch.cat(out)

    def _global_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """One rollout batch (this rank's share of the groups) -> cfg.updates_per_step
        optimizer steps. Returns metrics averaged over the batch."""
        t0 = time.perf_counter()
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)  # (G, n)
        adv_fn = algos.lookup(algos.ADVANTAGES, self.cfg.advantage, "advantage estimator")
        loss_fn = algos.lookup(algos.POLICY_LOSSES, self.cfg.policy_loss, "policy loss")
        reduce = algos.lookup(algos.REDUCTIONS, self.cfg.reduction, "reduction")
        batch = build_batch(groups, adv_fn(rewards, self.cfg.adv_eps), self.pad_id).to(self.engine.device)

        self.engine.eval()  # no dropout in the recomputation
        old_logprobs = self._score(self.engine.module, batch)
        ref_logprobs = self._score(self.ref, batch) if self.ref is not None else None
        self.engine.train()

        sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "tokens": 0.0, "sampler_logprob_diff": 0.0}
        sums["sampler_logprob_diff"] = float(((old_logprobs - batch.sampler_logprobs).abs() * batch.loss_mask).sum())
        grad_norms: list[float] = []
        minibatch = math.ceil(len(batch) / self.cfg.updates_per_step)
        for m_start in range(0, len(batch), minibatch):
            mini = batch.slice(m_start, m_start + minibatch)
            # Token-mean over the whole mini-batch on every rank, however it is split.
            normaliser = self._global_sum(float(mini.loss_mask.sum()))
            micro_slices = [(s, min(s + self.micro, len(mini))) for s in range(0, len(mini), self.micro)]
            for k in range(self.accumulation):
                start, stop = micro_slices[k] if k < len(micro_slices) else (len(mini), len(mini))
                loss = self._micro_step(mini.slice(start, stop), old_logprobs[m_start + start : m_start + stop],
                                        None if ref_logprobs is None else ref_logprobs[m_start + start : m_start + stop],
                                        normaliser, loss_fn, reduce, sums)
                # DeepSpeed averages gradients over ranks: undo it (normaliser is global).
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                if k == self.accumulation - 1:
                    grad_norms.append(self._grad_norm())
                self.engine.step()
        self.steps_done += 1
        tokens = sums.pop("tokens")
        metrics = {f"train/{k}": v / max(tokens, 1.0) for k, v in sums.items()}
        metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["train/lr"] = float(self.engine.get_lr()[0])
        metrics["train/seconds"] = time.perf_counter() - t0
        return metrics

    def _grad_norm(self) -> float:
        """Global L2 norm of the accumulated gradients (before clipping)."""
        norm = self.engine.get_global_grad_norm()  # set by the ZeRO optimizers
        if norm is None:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0.0
        return float(norm)

    def _micro_step(self, micro: Batch, old_logprobs, ref_logprobs, normaliser, loss_fn, reduce, sums):
        if len(micro) == 0:  # an empty slot keeps DeepSpeed's accumulation count aligned
            return sum(p.sum() * 0.0 for p in self.engine.module.parameters())
        logp = self._logprobs(self.engine.module, micro)
        per_token, clipped = loss_fn(logp, old_logprobs, micro.advantages, self.cfg.clip_eps)
        mask = micro.loss_mask
        if ref_logprobs is not None:
            kl = algos.kl_k3(logp, ref_logprobs)
            per_token = per_token + self.cfg.kl_coef * kl
            sums["kl"] += float((kl.detach() * mask).sum())
        loss = reduce(per_token, mask, normaliser)
        sums["loss"] += float((per_token.detach() * mask).sum())
        sums["clip_frac"] += float((clipped * mask).sum())
        sums["tokens"] += float(mask.sum())
        return loss

    # ------------------------------------------------------------ weights out
    def connect_generators(self, generators: list[Any], engine_world_sizes: list[int], sync: WeightSyncConfig) -> None:
        from learner.broadcast import WeightBroadcaster
        from rollout.client import GeneratorsClient

        client = GeneratorsClient(generators, engine_world_sizes)
        self.broadcaster = WeightBroadcaster(self.engine.module, sync, client)
        self.broadcaster.connect(client.world_size)

    def broadcast_weights(self, version: int) -> dict[str, float]:
        return self.broadcaster.send(version)

    def save_hf(self, path: str) -> str:
        """Export the policy as an HF model directory (transformers and vLLM load it)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.engine.module.save_pretrained(str(out), safe_serialization=True)
        for f in Path(self.model_path).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, out / f.name)
        return str(out)

    def state_dict_numpy(self) -> dict[str, Any]:
        return {k: v.detach().float().cpu().numpy().copy() for k, v in self.engine.module.state_dict().items()}

    def ready(self) -> int:
        return self.rank
