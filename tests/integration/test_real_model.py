"""A real pretrained chat model through the real stack: SmolLM2-135M-Instruct (Llama,
tied embeddings, 49k BPE vocabulary, ChatML template) on a vLLM generator and a DeepSpeed
learner rank. One stack for the module: prompts formatted on ids, stopping at the
template's end-of-turn, logprobs of vLLM and the learner before and after an update that
moved them, and the exported model in transformers and vLLM."""
import json

import numpy as np
import pytest
import ray

from cluster.actors.factory import ActorFactory
from cluster.data import apply_template
from rollout.seeds import sample_seeds
from rollout.tokens import end_of_turn_id, stop_token_ids
from tests.helpers import placed

QUESTIONS = ["What is 2 + 3? Reply with just the number.", "Name a colour of the sky."]


@pytest.fixture(scope="module")
def stack(real_model):
    cfg = placed(["rollout.n=4", "rollout.max_tokens=24", "rollout.max_model_len=512", "rollout.kv_cache_gib=0.5",
                  "learner.lr=3e-5", "run.prompts_per_step=2", "data.template=chat"])
    factory = ActorFactory.for_job(cfg, str(real_model))
    [gen], learners = factory.generators(), factory.learner_group()
    ray.get([a.ready.remote() for a in [gen, *learners.ranks]])
    learners.connect([gen])
    yield cfg, factory, gen, learners
    ray.shutdown()


def sample(gen, rows, n=4, sampling=None, first_key=0):
    seeds = [sample_seeds(0, "train", first_key + i, n) for i in range(len(rows))]
    groups = ray.get(gen.generate.remote(rows, seeds, sampling))
    for i, g in enumerate(groups):
        g.key = first_key + i
    return groups


def test_prompts_are_formatted_on_ids_and_generation_stops_at_the_end_of_turn(stack, real_model):
    from transformers import AutoTokenizer

    _, _, gen, _ = stack
    tok = AutoTokenizer.from_pretrained(str(real_model))
    rows = apply_template([{"prompt": q, "answer": "5"} for q in QUESTIONS], "chat", str(real_model))
    for q, row in zip(QUESTIONS, rows):  # what transformers' own chat template gives, token for token
        ids = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True)
        assert row["prompt_ids"] == list(ids.get("input_ids", ids) if hasattr(ids, "get") else ids)
        assert row["question"] == q and row["prompt"].endswith("<|im_start|>assistant\n")
    eot = end_of_turn_id(tok)
    assert eot == tok.convert_tokens_to_ids("<|im_end|>") and stop_token_ids(tok) == [eot]  # SmolLM2: EOS is it too
    groups = sample(gen, rows, n=1, sampling={"temperature": 0.0, "top_p": 1.0, "max_tokens": 96})
    for row, g in zip(rows, groups):
        assert g.prompt_ids == row["prompt_ids"]  # sampled from the driver's ids, never re-tokenised
        assert "prompt_ids" not in g.row
    # a greedy answer this short ends the turn: the end-of-turn is kept as the last id
    [s] = groups[0].samples
    assert s.finish_reason == "stop" and s.completion_ids[-1] == eot, (s.text, s.finish_reason)
    assert "5" in s.text and "<|im_end|>" not in s.text


def test_vllm_and_the_learner_agree_before_and_after_an_update(stack, real_model, tmp_path):
    cfg, factory, gen, learners = stack
    rows = apply_template([{"prompt": q, "answer": "5"} for q in QUESTIONS], "chat", str(real_model))
    probe = rows[0]["prompt_ids"]
    before = np.array(ray.get(gen.prompt_logprobs.remote(probe)))
    groups = sample(gen, rows)
    for g in groups:
        g.rewards = [1.0, 0.0, 0.0, 1.0]
    first = learners.train(groups, version=0)
    assert first["train/sampler_logprob_diff"] < 1e-4 and first["train/on_policy_frac"] == 1.0
    assert "train/stale_logprob_diff" not in first  # none of this step's samples is stale
    learners.push(1)
    after = np.array(ray.get(gen.prompt_logprobs.remote(probe)))
    assert np.abs(after - before).max() > 1e-2  # the update moved the policy
    groups = sample(gen, rows, first_key=2)
    assert all(s.version == 1 for g in groups for s in g.samples)
    for g in groups:
        g.rewards = [0.0, 1.0, 1.0, 0.0]
    second = learners.train(groups, version=1)
    assert second["train/sampler_logprob_diff"] < 1e-4  # vLLM holds exactly the learner's version 1
    # the same samples scored as if the learner were one version further on: all stale
    assert learners.train(groups, version=2)["train/stale_logprob_diff"] > 1e-4

    # the export: transformers and vLLM load it, with the whole tokenizer and the chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learners.push(3)
    pushed = np.array(ray.get(gen.prompt_logprobs.remote(probe)))
    out = tmp_path / "hf"
    learners.save_hf(str(out))
    assert (out / "chat_template.jinja").read_text() == (real_model / "chat_template.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False,
                                   add_generation_prompt=True) == rows[0]["prompt"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.tie_word_embeddings and model.config.architectures == ["LlamaForCausalLM"]
    del model
    ray.kill(gen)
    [exported] = ActorFactory.for_job(cfg, str(out)).generators()
    ray.get(exported.ready.remote())
    served = np.array(ray.get(exported.prompt_logprobs.remote(probe)))
    assert np.abs(served - pushed).max() < 1e-4  # vLLM serves the export as the learner's weights
