"""LoRA adapters on the policy (peft), and the weights a LoRA policy pushes.

With `learner.lora.rank > 0` the learner wraps its model with peft's LoRA: the base
weights are frozen (the optimizer and its state hold only the adapters), the KL
reference is the same model with the adapters switched off (no second copy), and what
reaches the generators is the *merged* weight W + scaling * B @ A of each adapted
module, in the HF names vLLM loads.

vLLM fuses q/k/v into one `qkv_proj` layer and gate/up into `gate_up_proj`, and its
layerwise reload rebuilds a layer only from *all* of its weights: a layer given some of
them is left partly uninitialised, one given none keeps its weights. So a push carries
every parameter (weights and biases) of each fused layer that holds an adapted module,
and nothing of the layers without one (they are frozen: they never change).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rollout.buckets import TensorMeta, vllm_layer

_PREFIX = "base_model.model."


def wrap(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> torch.nn.Module:
    """The peft LoRA model around `model` (adapters initialised with B = 0: the
    policy starts equal to the base)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    peft_model = get_peft_model(model, cfg)
    if not any(_is_lora(m) for m in peft_model.modules()):
        raise ValueError(f"learner.lora.target_modules={list(targets)}: no module of the model matched")
    return peft_model


def is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "disable_adapter") and hasattr(module, "peft_config")


def _is_lora(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def hf_name(name: str) -> str:
    """A peft parameter name -> the base model's (HF) name."""
    return name.removeprefix(_PREFIX).replace(".base_layer.", ".")


@dataclass
class PushEntry:
    """One tensor of a push: its meta (HF name, dtype, shape), the parameters it is
    computed from (gathered together under ZeRO-3), and how (None: it is sources[0])."""

    meta: TensorMeta
    sources: list[torch.nn.Parameter]
    merge: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def value(self) -> torch.Tensor:
        tensors = [p.detach() for p in self.sources]
        return tensors[0] if self.merge is None else self.merge(tensors)


def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def _meta(name: str, p: torch.nn.Parameter) -> TensorMeta:
    return TensorMeta(name, str(p.dtype).removeprefix("torch."), _shape(p))


def _merged(scaling: float) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        w, a, b = tensors
        return (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)

    return merge


def _adapted(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """HF module name -> its peft LoRA layer."""
    return {hf_name(name): m for name, m in module.named_modules() if _is_lora(m)}


def _merge_of(adapted: dict[str, torch.nn.Module], hf: str) -> tuple[list[torch.nn.Parameter], Callable] | None:
    """For an adapted module's weight: the adapter's (A, B) and the merge; else None."""
    owner = adapted.get(hf.rpartition(".")[0])
    if owner is None or not hf.endswith(".weight"):
        return None
    [adapter] = owner.active_adapters
    return [owner.lora_A[adapter].weight, owner.lora_B[adapter].weight], _merged(float(owner.scaling[adapter]))


def push_entries(module: torch.nn.Module) -> list[PushEntry]:
    """What a weight push carries, in layer order: every parameter of a plain model;
    for a peft LoRA model, every parameter of each vLLM layer holding an adapter, with
    the adapted weights merged."""
    if not is_peft(module):
        return [PushEntry(_meta(name, p), [p]) for name, p in module.named_parameters()]
    adapted = _adapted(module)
    layers = {vllm_layer(f"{name}.weight") for name in adapted}
    entries = []
    for name, p in module.named_parameters():
        hf = hf_name(name)
        if ".lora_" in name or vllm_layer(hf) not in layers:
            continue
        merge = _merge_of(adapted, hf)
        entries.append(PushEntry(_meta(hf, p), [p]) if merge is None else
                       PushEntry(_meta(hf, p), [p, *merge[0]], merge[1]))
    return entries


def merged_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model in HF names, adapters merged (values must be gathered already)."""
    adapted = _adapted(module)
    out = {}
    for name, v in module.state_dict().items():
        if ".lora_" in name:
            continue
        hf = hf_name(name)
        merge = _merge_of(adapted, hf)
        out[hf] = v if merge is None else merge[1]([v, *(p.detach() for p in merge[0])])
    return out


def adapter_entries(module: torch.nn.Module) -> list[PushEntry]:
    """An adapter push: every lora_A / lora_B tensor, under the names of peft's saved
    adapter (`...q_proj.lora_A.weight`: the adapter's own name dropped), in layer order."""
    [adapter] = module.active_adapters
    return [PushEntry(_meta(name.replace(f".{adapter}.", "."), p), [p])
            for name, p in module.named_parameters() if ".lora_" in name]


def adapter_config(module: torch.nn.Module) -> dict:
    """peft's adapter_config.json of the active adapter, as plain JSON values."""
    [adapter] = module.active_adapters
    out = {}
    for key, value in module.peft_config[adapter].to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value"):  # an enum (peft_type, task_type)
            value = value.value
        out[key] = value
    return out
