"""Stopping at the chat template's end-of-turn when it is not EOS, on a real generator
actor (vLLM): the project's tiny BPE chat model, taught (plain torch, here) to answer
and end its turn, then to go on after it, so only the template's stop token ends a sample."""
import pytest
import ray

from cluster.actors.factory import ActorFactory
from cluster.data import apply_template
from rollout.seeds import sample_seeds
from tests.helpers import placed

TURN = "<answer>7</answer><|im_end|>"


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """The tiny chat model after a few hundred steps on `prompt -> TURN TURN TURN ...`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.config import TinyModelConfig
    from learner.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("chat") / "m", TinyModelConfig(tokenizer="chat_bpe", seed=3))
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    rows = apply_template([{"prompt": f"{a}+{b}=", "answer": "7"} for a, b in [(3, 4), (2, 5), (1, 6)]], "chat", str(path))
    turn = tok(TURN * 4, add_special_tokens=False)["input_ids"]
    batch = torch.tensor([r["prompt_ids"] + turn for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(path))
    return path, tok, rows


def test_a_sample_ends_at_the_end_of_turn_not_eos(ray_session, taught):
    import torch
    from transformers import AutoModelForCausalLM

    path, tok, rows = taught
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    # without the template's stop token the model goes on past its end of turn (EOS never comes)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    out = model.generate(torch.tensor([rows[0]["prompt_ids"]]), max_new_tokens=24, do_sample=False,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(rows[0]["prompt_ids"]):].tolist()
    assert out.count(eot) >= 2 and eos not in out

    cfg = placed(["rollout.max_tokens=24", "rollout.n=2"])
    [gen] = ActorFactory.for_job(cfg, str(path)).generators()
    ray.get(gen.ready.remote())
    groups = ray.get(gen.generate.remote(rows, [sample_seeds(0, "train", i, 2) for i in range(len(rows))],
                                         {"temperature": 0.0, "top_p": 1.0, "max_tokens": 24}))
    for row, g in zip(rows, groups):
        assert g.prompt_ids == row["prompt_ids"]
        for s in g.samples:
            # the turn ends at its first end-of-turn, which stays in the ids (the learner trains on it)
            assert s.finish_reason == "stop" and s.completion_ids[-1] == eot and s.completion_ids.count(eot) == 1
            assert s.text == "<answer>7</answer>"
