"""LoRA (learner.lora) through the real stack: a DeepSpeed learner with peft adapters,
a vLLM engine (CPU) receiving the merged weights of the adapted layers only."""
import json

import numpy as np
import pytest
import ray
import torch

from cluster.actors.factory import ActorFactory
from tests.helpers import SEQ, hf_logprobs, placed, synthetic_groups

COMMON = ["rollout.num_generators=1", "run.prompts_per_step=4", "rollout.n=4", "sync.bucket_mb=0.1",
          "learner.lora.rank=8", "learner.lora.alpha=16", "learner.lora.target_modules=[q_proj,v_proj]"]


@pytest.fixture(scope="module")
def generator(tiny_model):
    [gen] = ActorFactory.for_job(placed(COMMON), str(tiny_model)).generators()
    ray.get(gen.ready.remote())
    yield gen
    ray.shutdown()


def base_state(model_dir) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def qkv_bytes(state: dict) -> int:
    """Every weight and bias of q, k and v: whole fused qkv layers (k has no adapter here)."""
    return sum(v.size * 4 for k, v in state.items() if any(f".{m}_proj." in k for m in "qkv"))


def test_lora_trains_only_the_adapters_and_pushes_whole_fused_layers(tiny_model, generator, tmp_path):
    cfg = placed([*COMMON, "learner.lr=0.05", "learner.kl_coef=0.1"])
    learners = ActorFactory.for_job(cfg, str(tiny_model)).learner_group()
    [rank] = learners.ranks
    try:
        ray.get(rank.ready.remote())
        learners.connect([generator])
        held = ray.get(rank.trainable.remote())
        assert held["optimizer_params"] and all(".lora_" in n for n in held["optimizer_params"])
        assert not any(".lora_" in n for n in held["frozen_params"])
        assert len(held["optimizer_params"]) == 2 * 2 * 2  # A and B of q and v, 2 layers
        raw_before = ray.get(rank.state_dict_numpy.remote(raw=True))
        base = base_state(tiny_model)
        old = np.array(ray.get(generator.prompt_logprobs.remote(SEQ)))

        for _ in range(3):
            metrics = learners.train(synthetic_groups())
            assert metrics["train/skipped_updates"] == 0
        assert metrics["train/kl"] > 0  # the policy has left its reference
        held = ray.get(rank.trainable.remote())  # Adam's two moments of the adapters, nothing else
        assert 2 * held["gradient_bytes"] <= held["optimizer_state_bytes"] <= 2 * held["gradient_bytes"] + 64 * len(held["optimizer_params"])
        assert held["gradient_bytes"] == held["trainable_elements"] * 4 < 0.2 * held["total_elements"] * 4

        # the base weights are bit-unchanged; only the adapters moved
        raw_after = ray.get(rank.state_dict_numpy.remote(raw=True))
        for k, v in raw_before.items():
            if ".lora_B" in k:
                assert np.abs(raw_after[k] - v).max() > 0, k
            elif ".lora_" not in k:
                np.testing.assert_array_equal(raw_after[k], v, err_msg=k)

        # the KL reference is the base model (adapters off); the policy is not
        t = cfg.rollout.temperature
        base_lp = hf_logprobs(tiny_model, base, SEQ, temperature=t)
        ref_lp = np.array(ray.get(rank.sequence_logprobs.remote(SEQ, True)))
        policy_lp = np.array(ray.get(rank.sequence_logprobs.remote(SEQ)))
        assert np.abs(ref_lp - base_lp).max() < 1e-5
        assert np.abs(policy_lp - base_lp).max() > 1e-2

        merged = ray.get(rank.state_dict_numpy.remote())
        assert set(merged) - {"lm_head.weight"} == set(base) - {"lm_head.weight"}
        for k in base:
            if ".q_proj.weight" in k or ".v_proj.weight" in k:
                assert np.abs(merged[k] - base[k]).max() > 0, k
            else:
                np.testing.assert_array_equal(merged[k], base[k], err_msg=k)

        # a push carries whole qkv layers (k_proj without an adapter too), nothing else
        sync = learners.push(1)
        assert sync["sync/bytes"] == qkv_bytes(base) < 0.25 * sum(v.size * 4 for v in base.values())
        new = np.array(ray.get(generator.prompt_logprobs.remote(SEQ)))
        assert np.abs(new - hf_logprobs(tiny_model, merged, SEQ)).max() < 1e-4
        assert np.abs(new - old).max() > 1e-2
        assert ray.get(generator.ready.remote())["version"] == 1

        # final/: a merged HF model directory, and the adapter in peft's format beside it
        out = tmp_path / "final"
        learners.save_hf(str(out))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert not any("lora" in k for k in model.state_dict())
        np.testing.assert_allclose(hf_logprobs(out, merged, SEQ), hf_logprobs(tiny_model, merged, SEQ), atol=1e-6)
        adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == 8 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
        assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 0.1 * (out / "model.safetensors").stat().st_size
    finally:
        learners.kill()


def test_zero3_lora_on_two_ranks_trains_pushes_and_resumes_exactly(tiny_model, generator, tmp_path):
    cfg = placed([*COMMON, "learner.num_ranks=2", "learner.zero_stage=3", "learner.lr=0.05",
                  "cluster.learner_cpus=0.5"])
    learners = ActorFactory.for_job(cfg, str(tiny_model)).learner_group()
    resumed = None
    try:
        ray.get([r.ready.remote() for r in learners.ranks])
        learners.connect([generator])
        held = ray.get([r.trainable.remote() for r in learners.ranks])
        assert all(h["optimizer_params"] and all(".lora_" in n for n in h["optimizer_params"]) for h in held)
        learners.train(synthetic_groups())
        # each rank's optimizer holds its partition of the adapters (about half) and their state
        held = ray.get([r.trainable.remote() for r in learners.ranks])
        sizes = [(h["trainable_elements"], h["optimizer_state_bytes"]) for h in held]
        assert all(0.4 * 8 * t <= b <= 0.6 * 8 * t + 64 for t, b in sizes), sizes  # Adam's 2 fp32 moments
        results = ray.get([r.broadcast_weights.remote(2) for r in learners.ranks])
        merged = ray.get([r.state_dict_numpy.remote() for r in learners.ranks])  # a gather: every rank
        base = base_state(tiny_model)
        assert results[0]["sync/bytes"] == qkv_bytes(base)
        np.testing.assert_array_equal(merged[0]["model.layers.0.self_attn.q_proj.weight"],
                                      merged[1]["model.layers.0.self_attn.q_proj.weight"])
        assert np.abs(merged[0]["model.layers.0.self_attn.q_proj.weight"]
                      - base["model.layers.0.self_attn.q_proj.weight"]).max() > 0
        new = np.array(ray.get(generator.prompt_logprobs.remote(SEQ)))
        assert np.abs(new - hf_logprobs(tiny_model, merged[0], SEQ)).max() < 1e-4
        assert ray.get(generator.ready.remote())["version"] == 2

        # a checkpoint holds the adapters and their (partitioned) optimizer state, not the base;
        # a fresh group resumed from it takes the next steps exactly as the original does
        ck = tmp_path / "ck"
        learners.save_checkpoint(str(ck))
        files = {f.name: f.stat().st_size for f in (ck / "state").iterdir()}
        model_file = (tiny_model / "model.safetensors").stat().st_size
        assert sum(files.values()) < 0.5 * model_file, files
        later = [learners.train(synthetic_groups(seed=s)) for s in (1, 2)]
        after = ray.get([r.state_dict_numpy.remote(raw=True) for r in learners.ranks])[0]
        learners.kill()
        resumed = ActorFactory.for_job(cfg, str(tiny_model)).learner_group()
        ray.get([r.ready.remote() for r in resumed.ranks])
        resumed.load_checkpoint(str(ck))
        again = [resumed.train(synthetic_groups(seed=s)) for s in (1, 2)]
        for a, b in zip(later, again):
            assert a["train/grad_norm"] > 1e-3 and abs(a["train/loss"] - b["train/loss"]) < 1e-5, (a, b)
            assert abs(a["train/grad_norm"] - b["train/grad_norm"]) < 1e-5 * a["train/grad_norm"]
        again_state = ray.get([r.state_dict_numpy.remote(raw=True) for r in resumed.ranks])[0]
        assert set(again_state) == set(after)
        for k, v in after.items():
            np.testing.assert_allclose(again_state[k], v, atol=1e-6, rtol=0, err_msg=k)
    finally:
        learners.kill()
        if resumed is not None:
            resumed.kill()


def test_adapter_push_sends_only_the_adapter_and_the_engine_serves_it(tiny_model, generator):
    """learner.lora.push=adapter: the generator's engine serves the adapter (vLLM's LoRA
    support, CPU punica) from a peft directory written per push; a replacement starts
    from the base and gets the current adapter with its first push."""
    cfg = placed([*COMMON, "learner.lr=0.05", "learner.lora.push=adapter"])
    factory = ActorFactory.for_job(cfg, str(tiny_model))
    ray.kill(generator)  # two engines on 2 cores only fight: this test's own takes its place
    [gen] = factory.generators()
    learners = factory.learner_group()
    try:
        ray.get([gen.ready.remote(), *[r.ready.remote() for r in learners.ranks]])
        learners.connect([gen])
        base = base_state(tiny_model)
        np.testing.assert_allclose(ray.get(gen.prompt_logprobs.remote(SEQ)), hf_logprobs(tiny_model, base, SEQ), atol=1e-4)
        for version in (1, 2):
            for _ in range(2):
                learners.train(synthetic_groups(seed=version))
            sync = learners.push(version)
            merged = ray.get(learners.ranks[0].state_dict_numpy.remote())
            raw = ray.get(learners.ranks[0].state_dict_numpy.remote(raw=True))
            adapter_bytes = sum(v.size * 4 for k, v in raw.items() if ".lora_" in k)
            assert sync["sync/bytes"] == adapter_bytes < 0.05 * sum(v.size * 4 for v in base.values())
            served = np.array(ray.get(gen.prompt_logprobs.remote(SEQ)))
            assert np.abs(served - hf_logprobs(tiny_model, merged, SEQ)).max() < 1e-4
            assert np.abs(served - hf_logprobs(tiny_model, base, SEQ)).max() > 1e-2
            assert ray.get(gen.ready.remote())["version"] == version
        # sampling goes through the adapter too, and records the version that made it
        [group] = ray.get(gen.generate.remote([{"prompt": SEQ[:4]}], [[1, 2]]))
        assert {s.version for s in group.samples} == {2}

        ray.kill(gen, no_restart=True)  # a replacement: the base model, then the current adapter
        gen = factory.generator(0, 2, str(tiny_model))
        ray.get(gen.ready.remote())
        learners.connect([gen])
        learners.push(2)
        np.testing.assert_allclose(ray.get(gen.prompt_logprobs.remote(SEQ)), served, atol=1e-6)
    finally:
        ray.kill(gen)
        learners.kill()
