"""One learner rank: a DeepSpeed engine in a Ray actor (wrapped by cluster/actors/factory.py).

train_step: scored groups -> group-relative advantages -> the step's schedule (the
same for every rank, learner/schedule.py) -> clipped policy-gradient updates with
the off-policy correction (optionally KL to a frozen reference) -> metrics reduced
over every rank. Rank 0 also streams the new weights to the generators
(learner/broadcast.py). A non-finite gradient skips the optimizer step on every
rank, and weights that are not finite are never sent.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from learner import algos
from learner.batch import Micro, Sequence, build_micro, counts, dummy_micro, flatten
from learner.config import LearnerConfig
from learner.export import export_tokenizer, fp32_masters_of
from learner.schedule import StepPlan, step_shape
from rollout.config import WeightSyncConfig
from rollout.host import node_id, pin_from_env, redirect_output_from_env
from rollout.types import Group, Sample, check_scored

_SUMS = ("loss", "kl", "clip_frac", "entropy", "sampler_logprob_diff", "mismatch_kl", "is_weight", "is_masked",
         "tokens", "nonfinite_losses", "stale_logprob_diff", "tokens_on_policy", "tokens_stale")
# over the tokens of on-policy samples / of stale ones only (absent from a step that has none)
_ON_POLICY, _STALE = ("sampler_logprob_diff", "mismatch_kl"), ("stale_logprob_diff",)


def _supervised(prompt: list[int], completion: list[int], mask: list[int] | None = None) -> Sequence:
    """A fixed (prompt, completion[, loss mask]) example as a sequence the learner scores:
    no behaviour logprobs, no advantage; tokens under mask 0 (an environment's
    observation in a multi-turn target) carry no loss."""
    return Sequence(prompt, Sample(completion, [0.0] * len(completion), "", "stop", [(0, 0)], loss_mask=mask), 0.0)


class NonFiniteWeights(RuntimeError):
    """The policy's weights hold NaN or inf: they must not reach the generators."""


def collective_device() -> torch.device:
    """Where a tensor must be for the default process group's collectives: the current
    GPU under NCCL (which refuses CPU tensors), else the CPU (gloo)."""
    if torch.distributed.is_initialized() and "nccl" in str(torch.distributed.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step, on every rank, when any rank's gradient holds NaN
    or inf (DeepSpeed itself skips such steps only for some stages and dtypes).
    Under ZeRO the parameters here are each rank's partition: the flag is all-reduced."""

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        self.skipped = 0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # One flag for all gradients (on a GPU: one host sync, not one per tensor), on the
        # device the group's backend reduces on (NCCL refuses CPU tensors).
        device = collective_device()
        finite = torch.ones(1, dtype=torch.float64, device=device)
        if grads:
            finite = torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all().to(torch.float64).reshape(1)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1.0:
            self.skipped += 1
            return None
        return super().step(closure)


def _load_trainable(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """A LoRA checkpoint's module state: exactly the trainable (adapter) parameters."""
    params = dict(dst.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    aliases = set(dst.state_dict()) - set(params)  # a tied output layer: saved under its own name too
    missing, unexpected = trainable - set(src), set(src) - trainable - aliases
    if missing or unexpected:
        raise ValueError(f"checkpoint: its module state holds {len(src)} tensors, the policy trains "
                         f"{len(trainable)} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): "
                         f"not a checkpoint of this LoRA policy")
    dst.load_state_dict({k: v for k, v in src.items() if k in trainable}, strict=False)


def deepspeed_config(cfg: LearnerConfig, micro: int, accumulation: int, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
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
        dist_backend: str,
        collective_timeout_s: float,
    ) -> None:
        """dist_backend: of the learner ranks' own group ("gloo" on CPU, "nccl" on GPUs);
        collective_timeout_s: deadline of each of its collectives (the caller passes
        faults.step_timeout_s, the deadline of every learner call)."""
        redirect_output_from_env()
        self.cores = pin_from_env()
        os.environ.update(
            RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size),
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from learner.checkpoint_engine import SafeCheckpointEngine

        torch.manual_seed(cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.model_path = model_path
        self.temperature, self.max_tokens = temperature, max_tokens
        self.policy_loss = algos.lookup(algos.POLICY_LOSSES, cfg.policy_loss, "policy loss")
        self.reduce = algos.lookup(algos.REDUCTIONS, cfg.reduction, "reduction")
        self.kl = algos.lookup(algos.KL_ESTIMATORS, cfg.kl_estimator, "KL estimator")
        self.advantage = algos.lookup(algos.ADVANTAGES, cfg.advantage, "advantage estimator")
        self.is_correction = algos.lookup(algos.IS_CORRECTIONS, cfg.is_correction, "IS correction")
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id or 0
        from datetime import timedelta

        # Every collective of the group has a deadline: a rank that died does not hang the others forever.
        deepspeed.init_distributed(dist_backend=dist_backend, timeout=timedelta(seconds=collective_timeout_s))
        self.dtype, self.dtype_reason = self._agreed_dtype(cfg.dtype, collective_device().type)
        self.cfg = cfg = cfg.model_copy(update={"dtype": self.dtype})  # concrete from here on (DeepSpeed, checkpoints)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.gradient_checkpointing:  # activations recomputed in the backward: memory for compute
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.rank:  # frozen base + adapters: only the adapters require grad (the optimizer's)
            from learner.lora import wrap

            model = wrap(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        self.micro, self.accumulation = step_shape(cfg, sequences_per_step, world_size)
        schedule = functools.partial(lr_factor, cfg=cfg, total=total_steps * cfg.updates_per_step)
        self._optimized = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        self.optimizer = GuardedAdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                      betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        # token budgets: DeepSpeed is told it accumulates (2: its accumulating code paths); the
        # boundary of each update is set by hand (_micro)
        ds_config = deepspeed_config(cfg, self.micro, self.accumulation or 2, world_size)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.engine.checkpoint_engine = SafeCheckpointEngine(self.engine._config)  # nothing unpickled on load
        self.ref = None
        if cfg.kl_coef > 0 and not cfg.lora.rank:  # the frozen reference: sharded like the policy under ZeRO-3
            ref = AutoModelForCausalLM.from_pretrained(cfg.reference_path or model_path, dtype=torch.float32).eval()
            ref.requires_grad_(False)
            if cfg.zero_stage == 3:
                ref_config = {k: v for k, v in ds_config.items() if k != "gradient_clipping"}
                ref = deepspeed.initialize(model=ref, config=ref_config)[0].module
            self.ref = ref.to(self.engine.device)
        self.broadcaster = None
        self.steps_done = 0
        self._version: int | None = None  # the policy version of this train step's weights

    def _agreed_dtype(self, asked: str, device: str) -> tuple[str, str]:
        """learner.dtype resolved on this rank (learner/precision.py); with auto, bf16 only
        if every rank has it (one rank in fp32 would fail the group's collectives)."""
        from learner.precision import resolve

        dtype, why = resolve(asked, device)
        if asked == "auto" and self.world_size > 1:
            flag = torch.tensor([1.0 if dtype == "bfloat16" else 0.0], device=collective_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if flag.item() < 1.0 and dtype == "bfloat16":
                dtype, why = "float32", "auto: another rank's device has no native bf16"
        return dtype, why

    # ----------------------------------------------------------------- training
    def _logprobs(self, model, micro: Micro) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logprob of each next token (B, L-1), its distribution's entropy (B, L-1), no grad).
        The policy's forward goes through the DeepSpeed engine, never its bare module: ZeRO-3
        counts micro-steps in the engine's forward, and without it every backward of an
        accumulation overwrote the one before (only the last micro-batch's gradient was kept)."""
        logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits[:, :-1]
        return algos.logprobs_and_entropy(logits, micro.input_ids[:, 1:], self.temperature)

    def _micro(self, seqs: list[Sequence], indices: tuple[int, ...], boundary: bool | None = None) -> Micro:
        """The micro-batch of seqs[indices] (none: a padding micro-step). With a varying
        number of micro-steps (token budgets), `boundary` tells DeepSpeed whether this
        one's backward ends the accumulation."""
        if boundary is not None and self.accumulation == 0:
            self.engine.set_gradient_accumulation_boundary(boundary)
        picked = [seqs[i] for i in indices]
        micro = (build_micro(picked, self.pad_id, self.cfg.mask_truncated, self._version) if picked
                 else dummy_micro(self.pad_id))
        return micro.to(self.engine.device)

    def _global_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=collective_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def train_step(self, groups: list[Group], plan: StepPlan, capture_gradients: bool = False,
                   version: int | None = None) -> dict[str, Any]:
        """One rollout batch -> len(plan.updates) optimizer steps; this rank trains on
        its slices of the plan. Advantages see every group of the step (batch-level
        estimators need them). Returns metrics over every rank; capture_gradients adds
        "gradients": the first update's final (reduced) gradient per parameter.
        version: the policy version these weights are (before the update): samples wholly
        made by it are on-policy, and only they enter train/sampler_logprob_diff and
        train/mismatch_kl (engine mismatch); the rest enter train/stale_logprob_diff
        (mismatch plus the policy's drift since they were sampled). None: all on-policy."""
        t0 = time.perf_counter()
        self._version = version
        for g in groups:
            check_scored(g, f"learner rank {self.rank}")
        if plan.world != self.world_size or plan.accumulation != self.accumulation:
            raise ValueError(f"learner rank {self.rank}: the step plan is for {plan.world} ranks x {plan.accumulation} "
                             f"micro-steps, this learner runs {self.world_size} x {self.accumulation}")
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)  # (G, n)
        seqs = flatten(groups, self.advantage(rewards, self.cfg.adv_eps))
        if len(seqs) != plan.num_sequences:
            raise ValueError(f"learner rank {self.rank}: {len(seqs)} sequences, the plan was made for {plan.num_sequences}")
        # The proximal policy (the weights before this step's first update): only a
        # separate pass when there are several updates; otherwise the training forward is it.
        proximal = self._proximal(seqs, plan) if len(plan.updates) > 1 else None
        sums = dict.fromkeys(_SUMS, 0.0)
        grad_norms, captured, skipped_before = [], None, self._skipped()
        for u in plan.updates:
            tokens, sequences = counts(seqs[u.start : u.stop], self.cfg.mask_truncated)
            # Sizes of the whole mini-batch, over every rank: the split does not change the gradient.
            norm = algos.Normaliser(tokens=max(tokens, 1.0), sequences=max(sequences, 1.0), constant=float(self.max_tokens))
            for k, indices in enumerate(u.micro[self.rank]):
                boundary = k == len(u.micro[self.rank]) - 1
                micro = self._micro(seqs, indices, boundary)
                loss = self._loss(micro, None if proximal is None else proximal[(u.start, k)], norm, sums)
                # DeepSpeed averages gradients over ranks: undo it (the normaliser is global).
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                if boundary and capture_gradients and captured is None:
                    captured = self._full_gradients()
                # Stage 0 keeps plain .grad (gone after step); ZeRO's optimizers compute the norm in step().
                norm_before = self._local_grad_norm() if boundary and self.cfg.zero_stage == 0 else None
                self.engine.step()
                if boundary:
                    grad_norms.append(norm_before if norm_before is not None else float(self.engine.get_global_grad_norm() or 0.0))
        self.steps_done += 1
        totals = dict(zip(_SUMS, self._global_sum([sums[k] for k in _SUMS])))
        tokens = max(totals.pop("tokens"), 1.0)
        nonfinite = totals.pop("nonfinite_losses")
        on, stale = totals.pop("tokens_on_policy"), totals.pop("tokens_stale")
        metrics = {f"train/{k}": v / tokens for k, v in totals.items() if k not in _ON_POLICY + _STALE}
        metrics.update({f"train/{k}": totals[k] / on for k in _ON_POLICY if on > 0})
        metrics.update({f"train/{k}": totals[k] / stale for k in _STALE if stale > 0})
        metrics["train/on_policy_frac"] = on / max(on + stale, 1.0)
        metrics["train/is_weight_mean"] = metrics.pop("train/is_weight")
        metrics["train/is_masked_frac"] = metrics.pop("train/is_masked")
        metrics.update({"train/grad_norm": sum(grad_norms) / len(grad_norms), "train/lr": float(self.engine.get_lr()[0]),
                        "train/skipped_updates": float(self._skipped() - skipped_before),
                        "train/nonfinite_losses": nonfinite, "train/updates": float(len(plan.updates)),
                        "train/seconds": time.perf_counter() - t0})
        if capture_gradients:
            metrics["gradients"] = captured
        return metrics

    def sft_step(self, examples: list[tuple], plan: StepPlan) -> dict[str, float]:
        """Supervised fine-tuning (a cold start, distillation): examples are (prompt ids,
        completion ids with EOS[, loss mask]); the loss is the completion tokens'
        negative log-likelihood (masked tokens left out), a token mean over the whole
        batch. Same schedule, same DeepSpeed engine, same guarded optimizer as the RL step."""
        t0 = time.perf_counter()
        seqs = [_supervised(*example) for example in examples]
        if len(seqs) != plan.num_sequences or plan.world != self.world_size or plan.accumulation != self.accumulation:
            raise ValueError(f"learner rank {self.rank}: the SFT plan does not match this batch or learner")
        total, skipped_before = 0.0, self._skipped()
        for u in plan.updates:
            tokens = max(counts(seqs[u.start : u.stop], False)[0], 1.0)
            for k, indices in enumerate(u.micro[self.rank]):
                micro = self._micro(seqs, indices, boundary=k == len(u.micro[self.rank]) - 1)
                logp, _ = self._logprobs(self.engine, micro)
                loss = -(logp * micro.loss_mask).sum() / tokens
                total += float(loss.detach())
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                self.engine.step()
        self.steps_done += 1
        [total] = self._global_sum([total])
        return {"sft/loss": total / len(plan.updates), "sft/skipped_updates": float(self._skipped() - skipped_before),
                "sft/lr": float(self.engine.get_lr()[0]), "sft/seconds": time.perf_counter() - t0}

    def _skipped(self) -> int:
        """Optimizer steps skipped for non-finite gradients (ours and DeepSpeed's own)."""
        return self.optimizer.skipped + int(getattr(self.engine, "skipped_steps", 0))

    @torch.no_grad()
    def _proximal(self, seqs: list[Sequence], plan: StepPlan) -> dict[tuple[int, int], torch.Tensor]:
        """Logprobs of every slot of this rank's schedule under the current weights
        (padding slots run too: ZeRO-3 gathers parameters in every forward)."""
        self.engine.eval()  # no dropout in the recomputation
        out = {}
        for u in plan.updates:
            for k, indices in enumerate(u.micro[self.rank]):
                out[(u.start, k)] = self._logprobs(self.engine, self._micro(seqs, indices))[0]
        self.engine.train()
        return out

    def _loss(self, micro: Micro, proximal: torch.Tensor | None, norm: algos.Normaliser, sums: dict) -> torch.Tensor:
        logp, ent = self._logprobs(self.engine, micro)
        prox = logp.detach() if proximal is None else proximal
        mask = micro.loss_mask
        weight = self.is_correction(prox, micro.behaviour, self.cfg.is_threshold_low, self.cfg.is_threshold_high) * mask
        per_token, clipped = self.policy_loss(
            algos.LossInputs(logp, prox, micro.advantages, mask, self.cfg.clip_low, self.cfg.clip_high)
        )
        per_token = per_token * weight.detach()
        if self.cfg.kl_coef > 0:
            ref_logp = self.reference_logprobs(micro)
            kl = self.kl(logp, ref_logp)
            per_token = per_token + self.cfg.kl_coef * kl
            sums["kl"] += float((kl.detach() * mask).sum())
        loss = self.reduce(per_token, mask, norm)
        if not torch.isfinite(loss):  # the guarded optimizer skips this update on every rank
            sums["nonfinite_losses"] += 1.0
            return loss
        sums["loss"] += float((per_token.detach() * mask).sum())
        sums["clip_frac"] += float((clipped * mask).sum())
        sums["entropy"] += float((ent * mask).sum())
        fresh = mask * micro.on_policy[:, None]
        diff = (prox - micro.behaviour).abs()
        sums["sampler_logprob_diff"] += float((diff * fresh).sum())
        sums["mismatch_kl"] += float((algos.mismatch_kl(prox, micro.behaviour) * fresh).sum())
        sums["stale_logprob_diff"] += float((diff * (mask - fresh)).sum())
        sums["tokens_on_policy"] += float(fresh.sum())
        sums["tokens_stale"] += float((mask - fresh).sum())
        sums["is_weight"] += float(weight.sum())
        sums["is_masked"] += float(((weight == 0) * mask).sum())
        sums["tokens"] += float(mask.sum())
        return loss

    @torch.no_grad()
    def reference_logprobs(self, micro: Micro) -> torch.Tensor:
        """The KL reference's logprob of each next token: the frozen reference model, or
        under LoRA the policy itself with its adapters switched off (the base model)."""
        if self.cfg.lora.rank:
            with self.engine.module.disable_adapter():
                logits = self.engine.module(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
        else:
            logits = self.ref(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
        return algos.token_logprobs(logits[:, :-1], micro.input_ids[:, 1:], self.temperature)

    def sequence_logprobs(self, ids: list[int], reference: bool = False) -> list[float]:
        """The policy's (or the KL reference's) logprob of each token of `ids` given the
        ones before, at the sampling temperature (every rank calls it under ZeRO-3)."""
        micro = build_micro([_supervised(ids[:1], ids[1:])], self.pad_id, False, None).to(self.engine.device)
        self.engine.eval()
        try:
            if reference:
                return self.reference_logprobs(micro)[0].tolist()
            with torch.no_grad():
                return self._logprobs(self.engine, micro)[0][0].tolist()
        finally:
            self.engine.train()

    def trainable(self) -> dict[str, Any]:
        """What the optimizer holds (the parameters it was given, the bytes of its state:
        this rank's partition under ZeRO) and what stays frozen, counted from the tensors."""
        params = list(self.engine.module.named_parameters())
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]

        def size(t):
            t = getattr(t, "ds_tensor", t)
            return t.numel() * t.element_size()
        grads = [p for _, p in params if p.requires_grad]
        return {"optimizer_params": self._optimized,  # the parameters it was given
                "frozen_params": sorted(n for n, p in params if not p.requires_grad),
                "optimizer_state_bytes": sum(size(t) for t in state),
                "gradient_bytes": sum(size(p) for p in grads),
                "trainable_elements": sum(getattr(p, "ds_numel", p.numel()) for p in grads),
                "total_elements": sum(getattr(p, "ds_numel", p.numel()) for _, p in params),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB

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

    def weights_finite(self) -> bool:
        """Whether every parameter is finite, on every rank (each checks what it holds:
        the full model, or its ZeRO-3 partition). A collective: every rank calls it."""
        local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all())
                    for p in self.engine.module.parameters())
        return self._global_sum([0.0 if local else 1.0])[0] == 0.0

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
        client = GeneratorsClient(generators, engine_world_sizes, sync.timeout_s)
        self.broadcaster = WeightBroadcaster(self.engine.module, sync, client,
                                             adapter=bool(self.cfg.lora.rank) and self.cfg.lora.push == "adapter")
        self.broadcaster.connect(client.world_size)

    def broadcast_weights(self, version: int) -> dict[str, float]:
        """Every rank is called; under ZeRO-3 all join the per-bucket gathers, otherwise
        only rank 0 (which holds full weights) sends. Weights that are not finite are
        refused before anything is sent (the generators keep their last good weights)."""
        if not self.weights_finite():
            raise NonFiniteWeights(f"learner rank {self.rank}: the policy holds non-finite weights; "
                                   f"version {version} is not sent to the generators")
        if self.broadcaster.client is None and self.cfg.zero_stage < 3:
            return {}
        return self.broadcaster.send(version)

    def save_hf(self, path: str) -> str:
        """Export the policy as an HF model directory (transformers and vLLM load it); every
        rank calls. A bf16 learner (full fine-tuning) exports its fp32 master weights."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state, adapter = self._full_states(fp32_masters=True)
        if self.rank != 0:
            return str(out)
        module = self.engine.module
        if self.cfg.lora.rank:  # the merged model, and the adapter in peft's format beside it
            module.save_pretrained(str(out / "adapter"), state_dict=adapter, safe_serialization=True)
            module = module.get_base_model()
        module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        if self.dtype == "bfloat16" and all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point()):
            config = copy.deepcopy(module.config)  # bf16 training, fp32 master weights: config.json says so
            config.dtype = "float32"
            config.save_pretrained(str(out))
        export_tokenizer(self.model_path, out)
        return str(out)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint of this rank (weights, optimizer, LR schedule); every rank calls it.
        A LoRA policy's holds only the adapters and their optimizer state: the frozen base is
        the model directory the run started from."""
        self.engine.save_checkpoint(path, tag="state", client_state={"steps_done": self.steps_done,
                                                                     "torch_rng": torch.get_rng_state()},
                                    exclude_frozen_parameters=bool(self.cfg.lora.rank))

    def load_checkpoint(self, path: str, trust: bool = False) -> None:
        """trust: unpickle what the files hold (only for one's own older checkpoints)."""
        self.engine.checkpoint_engine.trust = trust
        _, client = self.engine.load_checkpoint(
            path, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True,
            custom_load_fn=_load_trainable if self.cfg.lora.rank else None,
        )
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        self.steps_done = client["steps_done"]
        torch.set_rng_state(client["torch_rng"])

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._full_states()[0]

    def _full_states(self, fp32_masters: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full (unpartitioned) weights on CPU in HF names (a LoRA policy's merged), and a
        LoRA policy's adapter tensors (peft names; else empty), from one gather: a
        collective under ZeRO-3 (every rank calls). fp32_masters: a bf16 learner's fp32
        master weights (learner/export.py) instead of the module's bf16 ones."""
        from learner.broadcast import gathered

        module = self.engine.module
        out, adapter = {}, {}
        masters = fp32_masters_of(self.engine, self.rank) if fp32_masters and self.dtype == "bfloat16" \
            and not self.cfg.lora.rank else {}
        with gathered(list(module.parameters())):
            # tied weights stay one tensor (saved once); with masters (bf16), each trained
            # parameter's fp32 master weight instead of its bf16 copy
            copies = {p.data_ptr(): masters[id(p)] for p in module.parameters() if id(p) in masters}
            state = module.state_dict()
            if self.cfg.lora.rank:  # what the generators serve
                from learner.lora import merged_state

                adapter = {k: v.detach().cpu().clone() for k, v in state.items() if ".lora_" in k}
                state = merged_state(module)
            for k, v in state.items():
                if v.data_ptr() not in copies:  # beside fp32 masters, buffers (held in bf16) in fp32
                    dtype = torch.float32 if masters and v.is_floating_point() else v.dtype
                    copies[v.data_ptr()] = v.detach().to("cpu", dtype, copy=True)
                out[k] = copies[v.data_ptr()]
        return out, adapter

    def state_dict_numpy(self, raw: bool = False) -> dict[str, Any]:
        """The policy's full weights in HF names (a LoRA policy's merged); raw: the module's
        own state as it is held (a LoRA policy's base and adapter tensors, peft names)."""
        if not raw:
            return {k: v.float().numpy() for k, v in self._full_state_dict().items()}
        from learner.broadcast import gathered

        with gathered(list(self.engine.module.parameters())):
            return {k: v.detach().float().cpu().numpy().copy() for k, v in self.engine.module.state_dict().items()}

    def ready(self) -> dict[str, Any]:
        return {"rank": self.rank, "node_id": node_id(), "pid": os.getpid(), "cores": self.cores,
                "dtype": self.dtype, "dtype_reason": self.dtype_reason}
