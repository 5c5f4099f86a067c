"""Built-in verifiers: positive and negative cases, and the verifier contract."""
import inspect

import pytest

from rewards import api
from rewards.api import Score
from rewards.verifiers import VERIFIERS, extract_answer


def score(name, completion, **fields):
    args = fields.pop("_args", {})
    return api.run_one(VERIFIERS[name], completion, fields, args).value


def wrap(answer, think="work"):
    return f"<think>{think}</think><answer>{answer}</answer>"


def test_extraction_prefers_answer_tag_then_boxed_and_ignores_thinking():
    assert extract_answer("<answer>1</answer> text <answer> 2 </answer>") == "2"
    assert extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == "x^{2}"
    assert extract_answer("<answer>5</answer> \\boxed{6}") == "5"
    assert extract_answer("<think><answer>7</answer>\\boxed{7}</think> no answer here") is None
    assert extract_answer("<think>unclosed <answer>7</answer>") is None
    assert extract_answer("\\boxed{\\frac{1}{2}") is None  # unbalanced


@pytest.mark.parametrize(
    "gold, answer",
    [
        ("1000", "1,000"), ("0.5", "\\frac{1}{2}"), ("\\frac{3}{4}", "\\dfrac{3}{4}"), ("50\\%", "0.5"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("2\\pi", "2 \\pi"), ("e^{2}", "e^2"), ("[1, 2)", "[1,2)"),
        ("\\{1, 2, 3\\}", "\\{3, 1, 2\\}"), ("(1, 2)", "(1, 2)"), ("x \\geq 3", "3 \\leq x"), ("7", "x = 7"),
        ("\\begin{pmatrix}1 & 2\\\\ 3 & 4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
        ("2x + 2", "2(x+1)"), ("3.50", "3.5"),
    ],
)
def test_math_equivalent(gold, answer):
    assert score("math", wrap(answer), answer=gold) == 1.0


@pytest.mark.parametrize(
    "gold, answer",
    [("1000", "100"), ("(1, 2)", "(2, 1)"), ("[1, 2)", "[1, 2]"), ("x \\geq 3", "x > 3"), ("\\pi", "3.14159"),
     ("\\frac{1}{3}", "0.33"), ("2x + 2", "2x + 1"), ("5", "")],
)
def test_math_not_equivalent(gold, answer):
    assert score("math", wrap(answer), answer=gold) == 0.0


def test_math_ignores_the_right_answer_in_reasoning():
    assert score("math", "<think>the answer is 12</think><answer>13</answer>", answer="12") == 0.0
    assert score("math", "<think>\\boxed{12}</think><answer>12</answer>", answer="12") == 1.0


def test_format():
    good = ["<think>a</think><answer>1</answer>", "  <think>a\nb</think>\n\n<answer>1</answer>\n"]
    bad = ["<answer>1</answer>", "<think>a</think>", "<think>a</think><answer>1</answer><answer>2</answer>",
           "<answer>1</answer><think>a</think>", "<think><think>a</think></think><answer>1</answer>",
           "x<think>a</think><answer>1</answer>", "<think>a</think><answer>1", "<think>a<answer>1</answer></think>",
           "<think>a</think>b<answer>1</answer>", "<think>a</think><think>b</think><answer>1</answer>"]
    assert [score("format", g) for g in good] == [1.0, 1.0]
    assert [score("format", b) for b in bad] == [0.0] * len(bad)


@pytest.mark.parametrize(
    "answer, expected",
    [("(6 - 2) * 5 + 1", 1.0), ("1 + 5 * (6 - 2)", 1.0), ("6 * 5 - 2 - 1 * 7", 0.0),  # 7 is not given
     ("6 * 5 - 2 - 1", 0.0),  # = 27, not 21
     ("6 / (2 - 2) + 5 + 1", 0.0),  # uses 2 twice, and divides by zero
     ("(6 - 2) * 5 + 1 = 21", 1.0), ("6 ** 2 - 5 * 1 * 3", 0.0), ("abs(6) * 5 - 2 - 1", 0.0),
     ("x", 0.0), ("-6 + 2 * 5 + 1", 0.0)],
)
def test_countdown(answer, expected):
    assert score("countdown", wrap(answer), numbers=[6, 2, 5, 1], target=21) == expected


def test_countdown_exact_rationals_and_division_by_zero():
    assert score("countdown", wrap("(1 / 3) * 3 * 4"), numbers=[1, 3, 3, 4], target=4) == 1.0
    assert score("countdown", wrap("4 / (3 - 3) + 1"), numbers=[1, 3, 3, 4], target=4) == 0.0
    info = api.run_one(VERIFIERS["countdown"], wrap("9**9**9**9"), {"numbers": [9, 9, 9, 9], "target": 1}, {}).info
    assert "Pow" in info["reason"]


def test_overlong_soft_punishment():
    args = {"max_tokens": 100, "buffer": 20}
    values = [score("overlong", "x", completion_tokens=n, _args=args) for n in (50, 80, 90, 100, 101)]
    assert values == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_repetition_and_language():
    assert score("repetition", "a b c d e") == 0.0
    # word trigrams: (a b a) (b a b) (a b a) (b a b) -> 2 unique of 4
    assert score("repetition", "a b a b a b") == pytest.approx(-0.5)
    assert score("language", "<think>the cat sat</think><answer>1</answer>") == 1.0
    assert score("language", "<think>the 猫 sat on 垫子</think><answer>x</answer>") == pytest.approx(3 / 5)
    assert score("language", "<think>猫 垫子</think>", _args={"script": "cjk"}) == 1.0
    assert score("language", "<answer>no thinking</answer>") == 0.0


def example_plugins():
    return {name: api.resolve(name) for name in ("examples.my_verifiers:keyword", "examples.my_verifiers:ShortAnswer")}


CONTRACT_CASES = {
    "math": {"answer": "2"}, "accuracy": {"answer": "2"}, "format": {}, "countdown": {"numbers": [1, 1], "target": 2},
    "code": {"tests": [{"input": "", "output": "2"}]}, "overlong": {}, "repetition": {}, "language": {},
    "examples.my_verifiers:keyword": {}, "examples.my_verifiers:ShortAnswer": {},
}
CONTRACT_ARGS = {"overlong": {"max_tokens": 10, "buffer": 2}}


@pytest.mark.parametrize("name", sorted(CONTRACT_CASES))
def test_verifier_contract(name):
    """(completion: str, fields: dict, **args) -> float | Score | (float, dict), info msgpack-able."""
    import msgpack

    fn = VERIFIERS.get(name) or example_plugins()[name]
    params = list(inspect.signature(fn).parameters.values())
    assert len(params) >= 2 and [p.kind for p in params[:2]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
    fields = {**CONTRACT_CASES[name], "completion_tokens": 5}
    for completion in ["<think>1+1</think><answer>1+1</answer>", "```python\nprint(2)\n```", "", "garbage <answer>"]:
        result = api.run_one(fn, completion, fields, CONTRACT_ARGS.get(name, {}))
        assert isinstance(result, Score) and isinstance(result.value, float)
        msgpack.packb(result.info)
    assert set(VERIFIERS) <= set(CONTRACT_CASES)  # every built-in is covered


def test_contract_violations_are_errors():
    with pytest.raises(TypeError):
        api.normalize("1.0")
    with pytest.raises(ValueError):
        api.normalize(float("nan"))
    with pytest.raises(ValueError, match="cannot be imported"):
        api.resolve("examples.nope:thing")
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        api.resolve("nope")


# The contract's optional attributes (rewards/api.py): answer_classes and correctness_priority.
CLASS_CASE = ["2", "2.0", None, "", " 2 ", "x", "x", "y"]


@pytest.mark.parametrize("name", sorted(CONTRACT_CASES))
def test_answer_classes_contract(name):
    """answer_classes(answers) -> one class per answer: None exactly for no answer, else
    the index of the first answer of its class (so a class's first answer is its own class)."""
    from rewards.verifiers import classes_of

    fn = VERIFIERS.get(name) or example_plugins()[name]
    out = classes_of(fn)(list(CLASS_CASE))
    assert len(out) == len(CLASS_CASE)
    assert [c is None for c in out] == [not a for a in CLASS_CASE]
    assert all(isinstance(c, int) and c <= i and out[c] == c for i, c in enumerate(out) if c is not None)
    assert out[5] == out[6] == 5 and out[7] == 7  # the same text is always one class, "x" != "y"


def test_answer_classes_values_and_default():
    from rewards.verifiers import classes_of, group_answers

    accuracy, math = classes_of(VERIFIERS["accuracy"]), classes_of(VERIFIERS["math"])
    assert accuracy(["2", "2.0", "4/2", "3", None, " 3 "]) == [0, 0, 0, 3, None, 3]
    assert math(["1/2", "0.5", "\\frac{1}{2}", "2", "x"]) == [0, 0, 0, 3, 4]
    assert accuracy(["1/2", "0.5", "\\frac{1}{2}"]) == [0, 0, 2]  # exact rationals, not LaTeX
    # no answer_classes of its own: the default (numbers as rationals, else stripped text)
    assert not hasattr(VERIFIERS["countdown"], "answer_classes")
    assert classes_of(VERIFIERS["countdown"]) is group_answers
    assert classes_of(VERIFIERS["countdown"])(["1+2", "2+1", " 1+2", "3", "3.0"]) == [0, 1, 0, 3, 3]


def test_answer_classes_is_a_request_kind_served_by_the_verifier_process():
    """The child answers the protocol's "answer_classes" kind with the served verifier's
    own method (a plug-in's included); a verifier name is never a request kind."""
    from rewards import child

    def upper(completion, fields):
        return 0.0

    upper.answer_classes = lambda answers: [0 if a else None for a in answers]  # everything is one class
    served = {"accuracy": (VERIFIERS["accuracy"], {}), "mine": (upper, {})}
    ask = {"id": 7, "kind": "answer_classes", "verifier": "accuracy", "answers": [["2", "2.0", None], ["a", "b"]]}
    assert child.answer(served, ask) == {"id": 7, "score": 0.0, "info": {"classes": [[0, 0, None], [0, 1]]}, "error": None}
    assert child.answer(served, {**ask, "verifier": "mine"})["info"] == {"classes": [[0, 0, None], [0, 0]]}
    assert child.answer(served, {**ask, "kind": "nope"})["error"].startswith("protocol: unknown request kind 'nope'")
    assert "answers" in child.answer(served, {**ask, "answers": "2"})["error"]
    magic = {"id": 8, "verifier": "grpo:answer_classes", "completion": "", "fields": {"verifier": "accuracy", "answers": [["2"]]}}
    assert child.answer(served, magic)["error"] == "unknown verifier 'grpo:answer_classes'"


def test_correctness_verifier_is_declared_by_the_verifiers():
    from rewards.api import correctness_verifier

    declared = {n: fn.correctness_priority for n, fn in VERIFIERS.items() if hasattr(fn, "correctness_priority")}
    assert declared == {"accuracy": 1, "math": 2}
    assert correctness_verifier({"accuracy": 1.0, "format": 0.2}) == "accuracy"
    assert correctness_verifier({"math": 1.0, "format": 0.2}) == "math"
    assert correctness_verifier(["accuracy", "math"]) == correctness_verifier(["math", "accuracy"]) == "math"
    assert correctness_verifier(["format", "countdown", "examples.my_verifiers:keyword", "mine"]) is None
    assert correctness_verifier([]) is None


def test_register_knows_only_the_contracts_attributes():
    from rewards.verifiers import register

    with pytest.raises(ValueError, match="unknown attributes"):
        register("judge", judges_correctness=True)
    assert "judge" not in VERIFIERS
