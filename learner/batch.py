"""A step's groups as tensors: one padded micro-batch at a time.

The step's sequences are its groups' samples in order (group 0's samples, then group
1's, ...); the schedule (learner/schedule.py) slices them. Each micro-batch is padded
only to its own longest sequence, never to the whole batch's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout.types import Group, Sample

if TYPE_CHECKING:
    import torch


@dataclass
class Sequence:
    prompt_ids: list[int]
    sample: Sample
    advantage: float


@dataclass
class Micro:
    input_ids: "torch.Tensor"  # (B, L) right-padded
    attention_mask: "torch.Tensor"  # (B, L)
    loss_mask: "torch.Tensor"  # (B, L-1): 1 where the target input_ids[:, t+1] is a completion token that counts
    advantages: "torch.Tensor"  # (B,)
    behaviour: "torch.Tensor"  # (B, L-1): the sampler's logprob of each target, 0 off-mask
    on_policy: "torch.Tensor"  # (B,): 1 where every token was sampled by the weights the learner holds

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Micro":
        return Micro(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask,
                                              self.advantages, self.behaviour, self.on_policy)))


def flatten(groups: list[Group], advantages: "torch.Tensor") -> list[Sequence]:
    """Groups and their advantages (G, n) -> the step's sequences, in order."""
    return [Sequence(g.prompt_ids, s, float(advantages[i, k])) for i, g in enumerate(groups)
            for k, s in enumerate(g.samples)]


def counts(seqs: list[Sequence], mask_truncated: bool) -> tuple[float, float]:
    """(tokens that carry loss, sequences that carry any) of these sequences."""
    live = [s for s in seqs if not (mask_truncated and s.sample.finish_reason == "length")]
    return float(sum(s.sample.model_tokens() for s in live)), float(sum(1 for s in live if s.sample.model_tokens()))


def on_policy(sample: Sample, version: int | None) -> bool:
    """Whether every token of the sample was produced by policy `version` (None: any)."""
    return version is None or all(v == version for v, _ in sample.versions)


def build_micro(seqs: list[Sequence], pad_id: int, mask_truncated: bool = False, version: int | None = None) -> Micro:
    """Padded tensors of a non-empty slice of sequences. mask_truncated: samples cut
    at max_tokens get no loss (DAPO's overlong filtering); version: the policy the
    learner holds (for on_policy)."""
    import torch

    length = max(len(s.prompt_ids) + len(s.sample.completion_ids) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    loss_mask = torch.zeros((B, length - 1))
    behaviour = torch.zeros((B, length - 1))
    for i, s in enumerate(seqs):
        P, C = len(s.prompt_ids), len(s.sample.completion_ids)
        input_ids[i, : P + C] = torch.tensor(list(s.prompt_ids) + list(s.sample.completion_ids))
        attention[i, : P + C] = 1
        loss_mask[i, P - 1 : P + C - 1] = 0.0 if (mask_truncated and s.sample.finish_reason == "length") else 1.0
        behaviour[i, P - 1 : P + C - 1] = torch.tensor(s.sample.logprobs)
        if s.sample.loss_mask is not None:  # tokens the model did not sample: no loss, no behaviour logprob
            model = torch.tensor(s.sample.loss_mask, dtype=torch.bool)
            loss_mask[i, P - 1 : P + C - 1] *= model
            behaviour[i, P - 1 : P + C - 1] = torch.where(model, behaviour[i, P - 1 : P + C - 1], 0.0)  # nan * 0 is nan
    advantages = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    fresh = torch.tensor([float(on_policy(s.sample, version)) for s in seqs])
    return Micro(input_ids, attention, loss_mask, advantages, behaviour, fresh)


def dummy_micro(pad_id: int) -> Micro:
    """One padding token, no loss: the forward/backward of an empty schedule slot."""
    import torch

    return Micro(torch.full((1, 2), pad_id, dtype=torch.long), torch.ones((1, 2), dtype=torch.long),
                 torch.zeros((1, 1)), torch.zeros(1), torch.zeros((1, 1)), torch.zeros(1))
