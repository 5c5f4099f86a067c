"""Advantage, loss and reduction values against numbers worked out by hand."""
import math
import random
import os
import subprocess
import sys

import pytest
import torch

from learner import algos
from learner.batch import build_micro, flatten
from learner.schedule import micro_and_accumulation, plan_by_tokens, plan_step
from rollout.seeds import sample_seeds
from rollout.types import Group, Sample
from tests.helpers import ROOT


def test_grpo_advantages_match_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    adv = algos.ADVANTAGES["grpo"](rewards, 1e-6)
    # group 1: mean 0.5, unbiased std sqrt(((.5^2)*4)/3) = sqrt(1/3) = 0.57735
    s = math.sqrt(1 / 3)
    expected = [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6)]
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-9)
    assert adv[0, 0].item() == pytest.approx(0.866024, abs=1e-5)
    # all-equal group: no signal
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_ppo_clip_loss_values():
    # ratios: exp(0)=1, exp(ln 1.5)=1.5, exp(ln 0.5)=0.5
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 3)
    loss, clipped = algos.POLICY_LOSSES["ppo_clip"](algos.LossInputs(logp, old, adv, mask, 0.2, 0.2))
    # A=+2: max(-2r, -2 clip(r)): r=1 -> -2; r=1.5 -> max(-3, -2.4) = -2.4 (clipped); r=.5 -> max(-1, -1.6) = -1
    # A=-1: r=1 -> 1; r=1.5 -> max(1.5, 1.2) = 1.5; r=.5 -> max(.5, .8) = .8 (clipped)
    assert torch.allclose(loss, torch.tensor([[-2.0, -2.4, -1.0], [1.0, 1.5, 0.8]]), atol=1e-6)
    assert clipped.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_ppo_clip_gradient_is_advantage_at_ratio_one():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = algos.POLICY_LOSSES["ppo_clip"](algos.LossInputs(logp, torch.zeros(1, 2), torch.tensor([0.7]), torch.ones(1, 2), 0.2, 0.2))
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.7, -0.7]]))


def test_kl_k3_values():
    logp = torch.tensor([0.0, -1.0, -2.0])
    ref = torch.tensor([0.0, -2.0, -1.0])
    # d = ref - logp = [0, -1, 1]; k3 = e^d - d - 1 = [0, e^-1, e - 2]
    assert algos.kl_k3(logp, ref).tolist() == pytest.approx([0.0, math.exp(-1), math.e - 2], abs=1e-6)


@pytest.mark.parametrize(
    "name, expected",
    [
        # rows' valid sums: 0+1 = 1, 4+5+6+7 = 22, 9 = 9; lengths 2, 4, 1; 7 tokens, 3 sequences
        ("token_mean", 32 / 7),
        ("seq_mean_token_mean", (1 / 2 + 22 / 4 + 9 / 1) / 3),
        ("seq_mean_token_sum_norm", (1 + 22 + 9) / 8 / 3),  # constant 8
    ],
)
def test_reductions_values_and_split_invariance(name, expected):
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float32)
    norm = algos.Normaliser(tokens=7.0, sequences=3.0, constant=8.0)
    reduce = algos.REDUCTIONS[name]
    assert reduce(values, mask, norm).item() == pytest.approx(expected)
    parts = sum(reduce(values[i : i + 1], mask[i : i + 1], norm) for i in range(3))
    assert parts.item() == pytest.approx(expected)


def test_other_advantage_estimators():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    assert algos.ADVANTAGES["dr_grpo"](r, 1e-6).tolist() == [[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]
    # rloo: r_i - mean(others): group 1: 1 - 1/3, 0 - 2/3; group 2: 3 - 5/3, 1 - 7/3, 2 - 2, 2 - 2
    rloo = algos.ADVANTAGES["rloo"](r, 1e-6)
    assert torch.allclose(rloo, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [4 / 3, -4 / 3, 0, 0]], dtype=torch.float64))
    # reinforce++: centre per group -> [.5,-.5,-.5,.5, 1,-1,0,0]; batch mean 0, unbiased std sqrt(3/7)
    rpp = algos.ADVANTAGES["reinforce_pp"](r, 0.0)
    centred = torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(rpp, centred / math.sqrt(3 / 7))


def test_clip_higher_bounds_are_separate():
    logp = torch.log(torch.tensor([[1.25, 0.7]]))
    x = algos.LossInputs(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.28)
    loss, clipped = algos.POLICY_LOSSES["ppo_clip"](x)
    # A > 0: r = 1.25 stays under 1 + 0.28 (no clip); r = 0.7 is below 1 - 0.2 but max() keeps -0.7
    assert torch.allclose(loss, torch.tensor([[-1.25, -0.7]])) and clipped.tolist() == [[0.0, 0.0]]
    x.clip_high = 0.2
    loss, clipped = algos.POLICY_LOSSES["ppo_clip"](x)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.7]])) and clipped.tolist() == [[1.0, 0.0]]


def test_gspo_sequence_ratio_and_gradient():
    # sequence 1: log-ratios 0.1, 0.3 (mask 1, 1) -> s = exp(0.2); sequence 2 masked after 1 token
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.3], [-0.5, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    x = algos.LossInputs(logp, old, torch.tensor([1.0, -1.0]), mask, 0.5, 0.5)
    loss, clipped = algos.POLICY_LOSSES["gspo"](x)
    s1, s2 = math.exp(0.2), math.exp(-0.5)
    assert torch.allclose(loss[0], torch.tensor([-s1, -s1])) and loss[1, 0].item() == pytest.approx(s2)
    assert clipped.sum() == 0
    algos.REDUCTIONS["seq_mean_token_mean"](loss, mask, algos.Normaliser(3, 2, 1)).backward()
    # d/dlogp_t of -A s / |y| averaged over 2 sequences: seq 1 tokens: -s1 / 2 / 2; seq 2: +s2 / 1 / 2
    assert torch.allclose(logp.grad, torch.tensor([[-s1 / 4, -s1 / 4], [s2 / 2, 0.0]]))
    # a ratio far outside the bounds is clipped for the whole sequence
    far = algos.LossInputs(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.2)
    assert algos.POLICY_LOSSES["gspo"](far)[1].tolist() == [[1.0, 1.0]]


def test_pg_loss_and_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    loss, _ = algos.POLICY_LOSSES["pg"](algos.LossInputs(logp, logp, torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.2))
    assert loss.tolist() == [[2.0, 4.0]]
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    assert algos.KL_ESTIMATORS["k1"](lp, ref).tolist() == [1.0, -1.0]
    assert algos.KL_ESTIMATORS["k2"](lp, ref).tolist() == [0.5, 0.5]
    assert algos.KL_ESTIMATORS["k3"](lp, ref).tolist() == pytest.approx([math.exp(-1), math.e - 2])


def test_entropy_of_uniform_and_peaked():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    _, ent = algos.logprobs_and_entropy(logits, torch.tensor([[0, 0]]))
    assert ent[0, 0].item() == pytest.approx(math.log(4)) and ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_token_logprobs_uses_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp = algos.token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert lp.item() == pytest.approx(math.log(math.e / (math.e + 1)))


def test_fused_logprobs_and_entropy_match_log_softmax_in_values_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    lp, ent = algos.logprobs_and_entropy(logits, targets, temperature=0.7, chunk_rows=4)  # chunks split rows
    ref_logp = torch.log_softmax(logits / 0.7, -1)
    expected = ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp, expected, atol=1e-6)
    assert torch.allclose(ent, -(ref_logp.exp() * ref_logp).sum(-1), atol=1e-5) and not ent.requires_grad
    (g1,) = torch.autograd.grad(lp.sum(), logits)
    (g2,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_is_corrections_against_hand_computed_weights():
    behaviour = torch.log(torch.tensor([[0.5, 0.2, 0.1, 0.4]]))
    proximal = torch.log(torch.tensor([[0.5, 0.6, 0.01, 0.3]]))
    # ratios pi_prox / pi_behaviour: 1, 3, 0.1, 0.75
    tis = algos.IS_CORRECTIONS["tis"](proximal, behaviour, 0.5, 2.0)
    assert tis[0].tolist() == pytest.approx([1.0, 2.0, 0.1, 0.75], abs=1e-6)  # min(ratio, 2)
    mask = algos.IS_CORRECTIONS["mask"](proximal, behaviour, 0.5, 2.0)
    assert mask.tolist() == [[1.0, 0.0, 0.0, 1.0]]  # 3 and 0.1 fall outside [0.5, 2]
    assert algos.IS_CORRECTIONS["none"](proximal, behaviour, 0.5, 2.0).tolist() == [[1.0] * 4]
    kl = algos.mismatch_kl(proximal, behaviour)  # r - 1 - log r
    assert kl[0].tolist() == pytest.approx([0.0, 2 - math.log(3), 0.1 - 1 - math.log(0.1), 0.75 - 1 - math.log(0.75)], abs=1e-6)


def test_seeds_give_every_sample_of_a_run_its_own_stream():
    seeds = [s for key in range(5000) for s in sample_seeds(0, "train", key, 16)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    # reproducible: another process, with another string-hash seed, derives the same seeds
    # (a resumed run, or another generator, must draw the same streams)
    code = "from rollout.seeds import sample_seeds; print(sample_seeds(0, 'train', 7, 4))"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                   env={**os.environ, "PYTHONHASHSEED": "12345"}, cwd=ROOT, check=True)
    assert other_process.stdout.strip() == str(sample_seeds(0, "train", 7, 4))
    other_run = sample_seeds(1, "train", 7, 4)
    assert not set(other_run) & set(sample_seeds(0, "train", 7, 4))


def test_lookup_names_the_registered_choices():
    with pytest.raises(ValueError, match="unknown policy loss 'nope'.*ppo_clip"):
        algos.lookup(algos.POLICY_LOSSES, "nope", "policy loss")


def test_build_micro_can_mask_truncated_samples():
    g = Group([5], "p", {}, [Sample([8, 9], [-0.1, -0.2], "", "stop", [(0, 0)]), Sample([8, 8], [-0.3, -0.3], "", "length", [(0, 0)])])
    b = build_micro(flatten([g], torch.tensor([[1.0, -1.0]])), pad_id=0, mask_truncated=True)
    assert b.loss_mask.tolist() == [[1, 1], [0, 0]]


def test_tokens_the_model_did_not_sample_carry_no_loss_and_no_behaviour_logprob():
    """A sample's loss_mask (an episode's observation tokens are 0) reaches the learner's
    mask and its token count; whatever logprob an observation carries is ignored."""
    from learner.batch import counts
    from rollout.types import BoundaryError, check_sampled

    episode = Sample([8, 9, 10, 11, 12], [-0.1, float("nan"), 7.0, -0.4, -0.5], "", "stop", [(0, 0)],
                     loss_mask=[1, 0, 0, 1, 1])
    plain = Sample([8, 9], [-0.1, -0.2], "", "stop", [(0, 0)])
    g = Group([5], "p", {}, [episode, plain], key=3)
    check_sampled(g, "generator 0")  # observation logprobs (nan, 7.0) are not the model's: not checked
    seqs = flatten([g], torch.tensor([[1.0, -1.0]]))
    b = build_micro(seqs, pad_id=0)
    assert b.loss_mask.tolist() == [[1, 0, 0, 1, 1], [1, 1, 0, 0, 0]]
    assert torch.allclose(b.behaviour, torch.tensor([[-0.1, 0, 0, -0.4, -0.5], [-0.1, -0.2, 0, 0, 0]]))
    assert counts(seqs, False) == (5.0, 2.0)  # 3 model tokens + 2
    # the loss's gradient never reaches a masked position, whatever the policy's logprob there
    torch.manual_seed(0)  # near the behaviour policy (no clipping) at model tokens, anything elsewhere
    logp = torch.where(b.loss_mask.bool(), b.behaviour - 0.01 * torch.rand(2, 5), torch.randn(2, 5)).requires_grad_()
    loss, _ = algos.POLICY_LOSSES["ppo_clip"](algos.LossInputs(logp, b.behaviour, b.advantages, b.loss_mask, 0.2, 0.2))
    algos.REDUCTIONS["token_mean"](loss, b.loss_mask, algos.Normaliser(5.0, 2.0, 48.0)).backward()
    assert (logp.grad[b.loss_mask == 0] == 0).all() and (logp.grad[b.loss_mask == 1] != 0).all()

    for mask, error in [([1, 0], "one 0 or 1 per token"), ([1, 2, 0, 1, 1], "one 0 or 1 per token"),
                        ([0, 0, 0, 0, 0], "no token the model sampled")]:
        bad = Group([5], "p", {}, [Sample([8, 9, 10, 11, 12], [-0.1] * 5, "", "stop", [(0, 0)], loss_mask=mask)], key=4)
        with pytest.raises(BoundaryError, match=error):
            check_sampled(bad, "generator 0")
    bad = Group([5], "p", {}, [Sample([8, 9], [float("nan"), -0.1], "", "stop", [(0, 0)], loss_mask=[1, 0])], key=5)
    with pytest.raises(BoundaryError, match="not a finite"):  # a model token's logprob is still checked
        check_sampled(bad, "generator 0")


def test_build_micro_masks_exactly_the_completion_targets_and_pads_to_its_own_longest():
    g = Group([5, 6, 7], "p", {}, [Sample([8, 9], [-0.1, -0.2], "", "stop", [(3, 0)]), Sample([8], [-0.3], "", "length", [(3, 0)])])
    seqs = flatten([g], torch.tensor([[1.0, -1.0]]))
    b = build_micro(seqs, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]]
    # targets are input_ids[:, 1:] = [6, 7, 8, 9]: completion tokens 8, 9 at positions 2, 3
    assert b.loss_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert torch.allclose(b.behaviour, torch.tensor([[0, 0, -0.1, -0.2], [0, 0, -0.3, 0]]))
    assert b.advantages.tolist() == [1.0, -1.0]
    assert build_micro(seqs[1:], pad_id=0).input_ids.shape == (1, 4)  # no padding to the batch's longest


@pytest.mark.parametrize("sequences, world, updates", [(64, 2, 1), (64, 2, 2), (4, 2, 2), (3, 4, 1), (1, 2, 2), (13, 3, 2)])
def test_step_plan_gives_every_rank_the_same_number_of_micro_steps(sequences, world, updates):
    micro, acc = micro_and_accumulation(64, world, updates, micro_batch_size=8)
    plan = plan_step(sequences, world, updates, micro, acc)
    covered = sorted(i for rank in range(world) for m in plan.rank_sequences(rank) for i in m)
    assert covered == list(range(sequences))  # every sequence exactly once
    for u in plan.updates:
        assert u.stop > u.start  # no optimizer step on no data
        assert all(len(slots) == acc for slots in u.micro)  # same count on every rank
        assert all(list(m) == list(range(m[0], m[-1] + 1)) and u.start <= m[0] and m[-1] < u.stop and len(m) <= micro
                   for slots in u.micro for m in slots if m)  # contiguous slices of the mini-batch
    assert len(plan.updates) == min(updates, sequences)
    # mini-batches are defined over the whole batch, so they do not depend on the ranks
    assert [(u.start, u.stop) for u in plan.updates] == [(u.start, u.stop) for u in plan_step(sequences, 1, updates, 64, 1).updates]


def test_step_plan_refuses_what_it_cannot_hold_and_empty_steps():
    with pytest.raises(ValueError, match="exceed the learner's capacity"):
        plan_step(100, 2, 1, micro=8, accumulation=2)
    with pytest.raises(ValueError, match="at least one sequence"):
        plan_step(0, 2, 1, micro=8, accumulation=2)


def test_lr_schedule_warmup_then_cosine():
    from learner.config import LearnerConfig
    from learner.learner import lr_factor

    cfg = LearnerConfig(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg, total=7) for s in range(7)]
    # warm-up 1/3, 2/3; then cosine over steps 2..6 (span 4): 1, (1+cos(pi/4))/2 scaled, ..., 0.1
    expected_mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[3] == pytest.approx(expected_mid) and factors[4] == pytest.approx(0.55)
    assert factors[6] == pytest.approx(0.1)
    assert lr_factor(5, LearnerConfig(lr_schedule="constant"), total=7) == 1.0


def test_plans_agree_with_the_learner_capacity():
    plan = plan_step(3, 2, 1, micro=8, accumulation=1)
    assert plan.updates[0].micro == (((0, 1),), ((2,),))


@pytest.mark.parametrize("world, updates", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 1)])
def test_token_plan_balances_ranks_by_tokens_and_keeps_each_micro_batch_within_the_budget(world, updates):
    rng = random.Random(world * 10 + updates)
    lengths = [rng.choice([5, 9, 20, 47, 60]) for _ in range(41)]
    budget = 128
    plan = plan_by_tokens(lengths, world, updates, budget)
    assert plan.accumulation == 0  # varies with the batch
    covered = sorted(i for rank in range(world) for m in plan.rank_sequences(rank) for i in m)
    assert covered == list(range(len(lengths)))
    # the mini-batches are the count plan's: the same sequences in each optimizer step
    assert [(u.start, u.stop) for u in plan.updates] == [(u.start, u.stop) for u in plan_step(41, 1, updates, 64, 1).updates]
    for u in plan.updates:
        assert len({len(slots) for slots in u.micro}) == 1  # the same number of micro-steps on every rank
        for slots in u.micro:
            for m in slots:
                assert all(u.start <= i < u.stop for i in m)
                assert len(m) <= 1 or max(lengths[i] for i in m) * len(m) <= budget
        loads = [sum(lengths[i] for m in slots for i in m) for slots in u.micro]
        assert max(loads) - min(loads) <= max(lengths[u.start:u.stop])  # greedy by tokens: within one sequence


def test_token_plan_packs_long_sequences_alone_and_short_ones_together():
    plan = plan_by_tokens([100, 10, 10, 10, 300, 10], world=1, updates=1, max_tokens_per_micro=40)
    assert plan.updates[0].micro == (((4,), (0,), (1, 2, 3, 5)),)
    two = plan_by_tokens([100, 10, 10, 10, 300, 10], world=2, updates=1, max_tokens_per_micro=40)
    # rank 0 takes the 300; rank 1 the 100 and then every 10 (its load stays below 300)
    assert two.updates[0].micro == (((4,), ()), ((0,), (1, 2, 3, 5)))
    with pytest.raises(ValueError, match="at least one sequence"):
        plan_by_tokens([], 1, 1, 40)
