"""The one tokenizer story (rollout/tokens.py, cluster/data.py, the SFT targets, the
export) on the project's tiny BPE chat tokenizer, whose end-of-turn is not its EOS, and
the data set shapes of data.format."""
import json

import pytest

from cluster.data import DatasetError, apply_template, gsm8k_answer, last_boxed, load_jsonl
from rollout.tokens import completion_end_id, end_of_turn_id, prompt_ids, stop_token_ids
from tests.helpers import EXAMPLES


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from learner.config import TinyModelConfig
    from learner.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("chat") / "m", TinyModelConfig(tokenizer="chat_bpe"))


@pytest.fixture(scope="module")
def tok(chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_model))


def test_the_chat_tokenizer_is_a_bpe_whose_end_of_turn_is_not_its_eos(tok):
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert eos == tok.convert_tokens_to_ids("<|endoftext|>") and eot != eos
    assert end_of_turn_id(tok) == eot and stop_token_ids(tok) == sorted({eos, eot})
    assert completion_end_id(tok, "chat") == eot and completion_end_id(tok, "none") == eos
    assert completion_end_id(tok, "r1_zero") == eos
    words = tok("assistant answer", add_special_tokens=False)["input_ids"]
    assert len(words) < len("assistant answer")  # merges: not one token per character


def test_a_template_without_a_special_end_of_turn_has_none(tok):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_id(plain) is None and stop_token_ids(plain) == [plain.eos_token_id]
    plain.chat_template = None
    assert end_of_turn_id(plain) is None


def test_chat_prompts_are_the_templates_own_ids(tok, chat_model):
    rows = apply_template([{"prompt": "12+7=", "answer": "19"}, {"prompt": "3+4=", "answer": "7"}], "chat",
                          str(chat_model))
    for row, q in zip(rows, ["12+7=", "3+4="]):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True)
        assert row["prompt_ids"] == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert row["question"] == q and row["answer"] in ("19", "7")
    plain = apply_template([{"prompt": "12+7=", "answer": "19"}], "none", str(chat_model))[0]
    assert plain["prompt"] == "12+7=" and "question" not in plain
    assert plain["prompt_ids"] == tok("12+7=")["input_ids"] == prompt_ids(tok, "12+7=", "none")
    r1 = apply_template([{"prompt": "12+7=", "answer": "19"}], "r1_zero", str(chat_model))[0]
    assert r1["prompt"].endswith("User: 12+7=\nAssistant:") and r1["prompt_ids"] == tok(r1["prompt"])["input_ids"]


def test_sft_formats_prompts_as_rl_does_and_trains_on_the_end_of_turn(tok, chat_model):
    from cluster.commands.sft import tokenize

    pairs = [("12+7=", "<answer>19</answer>")]
    [(p, c)] = tokenize(str(chat_model), pairs, "chat")
    assert p == apply_template([{"prompt": "12+7=", "answer": "19"}], "chat", str(chat_model))[0]["prompt_ids"]
    assert c[-1] == tok.convert_tokens_to_ids("<|im_end|>") and tok.decode(c[:-1]) == "<answer>19</answer>"
    [(p, c)] = tokenize(str(chat_model), pairs, "none")
    assert p == tok("12+7=")["input_ids"] and c[-1] == tok.eos_token_id


def test_a_chat_template_is_required_for_data_template_chat(tiny_model):
    with pytest.raises(DatasetError, match="data.template=chat: the tokenizer of .* has no chat template"):
        apply_template([{"prompt": "1+1=", "answer": "2"}], "chat", str(tiny_model))


def test_the_export_carries_the_whole_tokenizer_and_every_stop_token(chat_model, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from learner.export import export_tokenizer

    export_tokenizer(chat_model, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == (chat_model / "chat_template.jinja").read_text()
    out = AutoTokenizer.from_pretrained(str(tmp_path))
    src = AutoTokenizer.from_pretrained(str(chat_model))
    msgs = [{"role": "user", "content": "12+7="}]
    assert out.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        src.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert sorted(GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id) == stop_token_ids(src)


def test_gsm8k_and_math_rows_load_as_they_come():
    gsm = load_jsonl(EXAMPLES / "data" / "gsm8k_tiny.jsonl", "gsm8k")
    assert [r["answer"] for r in gsm] == ["23", "48", "33", "1500", "9", "195", "36", "17"]
    assert gsm[0]["prompt"].startswith("Mia has 14 apples") and gsm[0]["solution"].endswith("#### 23")
    math = load_jsonl(EXAMPLES / "data" / "math_tiny.jsonl", "math")
    assert [r["answer"] for r in math][:4] == ["\\frac{5}{6}", "4", "81", "180"]
    assert math[-1]["answer"] == "x^{2} + 2x + 1" and math[0]["level"] == "Level 1"  # other fields travel on
    assert gsm8k_answer("so\n#### -1,234.5 ") == "-1234.5"
    assert last_boxed("\\boxed{1} then \\boxed {\\frac{a}{b}}") == "\\frac{a}{b}"
    for bad, msg in [("no marker", "no '#### <answer>'"), ("x ####  ", "nothing after")]:
        with pytest.raises(ValueError, match=msg):
            gsm8k_answer(bad)
    for bad, msg in [("none", "no \\\\boxed"), ("\\boxed{a", "unbalanced"), ("\\boxed{ }", "empty"), ("\\boxed 3", "without")]:
        with pytest.raises(ValueError, match=msg):
            last_boxed(bad)


def test_a_bad_row_of_a_known_shape_names_its_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q", "answer": "7"}) + "\n")
    with pytest.raises(DatasetError, match=r"d.jsonl:2: no '#### <answer>' line in 'answer'"):
        load_jsonl(f, "gsm8k")
    f.write_text(json.dumps({"problem": "", "solution": "\\boxed{1}"}) + "\n")
    with pytest.raises(DatasetError, match=r"d.jsonl:1: missing or empty required field 'problem' \(data.format=math\)"):
        load_jsonl(f, "math")


def test_an_observation_is_tokenised_on_its_own_and_appended(tok):
    """Token in, token out (multi-turn episodes): the observation's ids are appended to the
    turn's exact ids. Re-tokenising the joined text would merge '>' '<' across the boundary."""
    from rollout.tokens import observation_ids

    turn = tok("<python>print(1 + 2)</python>", add_special_tokens=False)["input_ids"]
    obs = "<output>3</output>"
    plain = observation_ids(tok, obs, "none")
    assert tok.decode(plain) == obs and observation_ids(tok, obs, "r1_zero") == plain
    joined = tok("<python>print(1 + 2)</python>" + obs, add_special_tokens=False)["input_ids"]
    assert turn + plain != joined and tok.decode(turn + plain) == tok.decode(joined)  # same text, other tokens

    chat = observation_ids(tok, obs, "chat")  # the template closes the assistant turn, adds the tool turn
    assert tok.decode(chat) == "<|im_end|>\n<|im_start|>tool\n<output>3</output><|im_end|>\n<|im_start|>assistant\n"
    assert chat[0] == tok.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match="no tokens"):
        observation_ids(tok, "", "none")
