"""`grpo sft` -> `grpo train` -> `grpo eval` on a real chat model (SmolLM2-135M-Instruct)
with data.template=chat and GSM8K-shaped rows, through the CLI, with no file copied by
hand between the commands; every command formats a question to the same token ids, the
ones transformers' own chat template gives."""
import json
import subprocess

import pytest

from cluster.artifacts.record import load
from tests.helpers import EXAMPLES, grpo, read_metrics

GSM8K = EXAMPLES / "data" / "gsm8k_tiny.jsonl"
SMALL = ["cluster.num_cpus=2", "learner.dtype=float32", "data.template=chat", "rollout.max_model_len=512", "rollout.kv_cache_gib=0.5"]


def cli(*args, timeout=600):
    proc = subprocess.run(grpo(*args), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def chain(real_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    sft_data = out / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": r["question"], "completion":
                                            f"<think>{r['answer'].split('####')[0].strip()}</think>"
                                            f"<answer>{r['answer'].split('####')[1].strip().replace(',', '')}</answer>"})
                                + "\n" for r in rows))
    cli("sft", "--data", str(sft_data), "--model", str(real_model), "--output", str(out / "sft"), "--steps", "2",
        "--batch-size", "4", "--lr", "1e-5", *SMALL)
    train = cli("train", f"model.path={out / 'sft'}", f"data.path={GSM8K}", "data.format=gsm8k", "run.steps=2",
                "run.prompts_per_step=2", "rollout.n=4", "rollout.max_tokens=32", "run.max_staleness=0",
                "learner.lr=1e-5", "eval.every=0", "run.progress=false", f"run.output_dir={out}", "run.name=chat",
                *SMALL)
    run = out / "chat"
    cli("eval", str(run), "--data", str(GSM8K), "--k", "2", "--output", str(out / "eval"), "data.format=gsm8k",
        "eval.max_prompts=3", "eval.max_tokens=32", *SMALL)
    return out, run, train, rows


def test_the_chain_runs_on_the_chat_model_and_formats_every_prompt_identically(chain, real_model):
    from transformers import AutoTokenizer

    from cluster.commands.sft import tokenize

    out, run, train, rows = chain
    # what the chat template gives for each question, by transformers itself, from the SFT output
    tok = AutoTokenizer.from_pretrained(str(out / "sft"))
    assert (out / "sft" / "chat_template.jinja").read_text() == (real_model / "chat_template.jinja").read_text()
    expected = {}
    for r in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=True,
                                      add_generation_prompt=True)
        expected[r["question"]] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    # the cold start's prompts (its own tokenisation)
    sft_ids = tokenize(str(real_model), [(r["question"], "x") for r in rows], "chat")
    assert [p for p, _ in sft_ids] == [expected[r["question"]] for r in rows]
    # training: every recorded group was sampled from exactly those ids
    steps = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    seen = 0
    for step in (1, 2):
        for g in load(run, step)["groups"]:
            assert g["prompt_ids"] == expected[g["row"]["question"]]
            assert g["row"]["answer"] in {r["answer"].split("####")[1].strip().replace(",", "") for r in rows}
            for s in g["samples"]:  # a finished turn ends with the end-of-turn, kept in the ids
                assert (s["finish_reason"] == "stop") == (s["token_ids"][-1] == eot), s
            seen += 1
    assert seen == 4
    # at S=0 every sample is on-policy: vLLM and the learner agree on every token
    assert all(r["train/sampler_logprob_diff"] < 1e-4 and r["train/on_policy_frac"] == 1.0 for r in steps)
    # evaluation of the run's final model: the same ids again
    evals = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(evals) == 3 and all(e["prompt_ids"] == expected[q] for e, q in zip(evals, [r["question"] for r in rows]))
    final = AutoTokenizer.from_pretrained(str(run / "final"))
    assert final.chat_template == tok.chat_template
