"""Built-in verifiers, registered by short name. The contract (the signature and the
optional `answer_classes` and `correctness_priority`) is in rewards/api.py.

accuracy   exact match of the extracted answer (numbers as exact rationals): cheap
math       math-verify equivalence (LaTeX, sets, intervals, matrices, relations, ...)
format     exactly one <think>...</think> then exactly one <answer>...</answer>
countdown  an arithmetic expression over the row's `numbers` that hits its `target`
code       the answer's python program against the row's `tests`, in a sandbox
overlong   DAPO's soft overlong punishment (needs `max_tokens`, `buffer` args)
repetition minus the share of repeated n-grams
language   R1's language consistency: share of the chain of thought in one script
"""
from __future__ import annotations

import ast
import operator
import re
import unicodedata
from fractions import Fraction
from typing import Any, Callable

from rewards.score import Score

VERIFIERS: dict[str, Callable[..., Any]] = {}
OPTIONAL_ATTRIBUTES = ("answer_classes", "correctness_priority")
"""What a verifier may offer beyond its signature (rewards/api.py)."""


def register(name: str, **attributes: Any) -> Callable:
    """Register a built-in verifier as `name`, with the contract's optional attributes."""
    unknown = set(attributes) - set(OPTIONAL_ATTRIBUTES)
    if unknown:
        raise ValueError(f"verifier {name!r}: unknown attributes {sorted(unknown)}; known: {OPTIONAL_ATTRIBUTES}")

    def deco(fn):
        if name in VERIFIERS:
            raise ValueError(f"verifier {name!r} is already registered")
        for key, value in attributes.items():
            setattr(fn, key, value)
        VERIFIERS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------ answer extraction
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_TAG_FREE = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT = re.compile(rf"\s*<think>{_TAG_FREE}</think>\s*<answer>{_TAG_FREE}</answer>\s*", re.DOTALL)


def strip_thinking(completion: str) -> str:
    """The completion without its <think> blocks (an unclosed <think> runs to the end)."""
    text = _THINK_BLOCK.sub(" ", completion)
    cut = text.find("<think>")
    return text if cut < 0 else text[:cut]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(completion: str) -> str | None:
    """The last <answer>...</answer>'s content, else the last \\boxed{...}; never text
    inside <think>. Stripped; None when there is neither."""
    visible = strip_thinking(completion)
    found = _ANSWER.findall(visible)
    answer = found[-1] if found else last_boxed(visible)
    return None if answer is None else answer.strip()


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


# ------------------------------------------------------- answer equivalence
def _plain_key(answer: str) -> Any:
    number = _number(answer)
    return number if number is not None else answer.strip()


def group_answers(answers: list[str | None], key: Callable[[str], Any] = _plain_key,
                  same: Callable[[Any, Any], bool] = operator.eq) -> list[int | None]:
    """Each answer -> the index of the first answer equal to it (None: no answer), two
    answers being equal when `same(key(a), key(b))`. With the defaults, the contract's
    default `answer_classes`: numbers as exact rationals (2 = 2.0 = 4/2), else stripped text."""
    reps: list[tuple[int, Any]] = []  # (class, key)
    out: list[int | None] = []
    for i, answer in enumerate(answers):
        if not answer:
            out.append(None)
            continue
        k = key(answer)
        found = next((c for c, other in reps if same(k, other)), None)
        if found is None:
            found = i
            reps.append((i, k))
        out.append(found)
    return out


def classes_of(verifier: Callable[..., Any] | None) -> Callable[[list[str | None]], list[int | None]]:
    """The verifier's `answer_classes`, or the contract's default."""
    return getattr(verifier, "answer_classes", None) or group_answers


def answer_classes(verifier: str, answers: list[str | None]) -> list[int | None]:
    """Group extracted answers as the registered verifier `verifier` sees them (the
    default for any other name): `accuracy` compares numbers as exact rationals, `math`
    with math-verify (1/2 = 0.5 = \\frac{1}{2}). Call it inside a verifier process
    (math-verify may hang on model-written input)."""
    return classes_of(VERIFIERS.get(verifier))(answers)


# ------------------------------------------------------------------- verifiers
@register("format")
def format_reward(completion: str, fields: dict) -> float:
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


@register("accuracy", answer_classes=group_answers, correctness_priority=1)
def accuracy_reward(completion: str, fields: dict) -> Score:
    answer = extract_answer(completion)
    if not answer:
        return Score(0.0, {"extracted": answer})
    expected = str(fields["answer"]).strip()
    a, b = _number(answer), _number(expected)
    if a is not None and b is not None:
        return Score(float(a == b), {"extracted": answer})
    return Score(float(answer == expected), {"extracted": answer})


def _math_parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # math-verify's own (signal-based) timeouts stay on; the worker's kill is the backstop
    # for what a signal cannot interrupt.
    parsed = parse(f"${text}$", extraction_config=configs)
    return parsed or parse(text, extraction_config=configs)


def _math_same(a: Any, b: Any) -> bool:
    from math_verify import verify

    return bool(a) and bool(b) and bool(verify(a, b))


def _math_classes(answers: list[str | None]) -> list[int | None]:
    """Answers equal under math-verify (1/2 = 0.5 = \\frac{1}{2}), each parsed once."""
    return group_answers(answers, _math_parse, _math_same)


@register("math", answer_classes=_math_classes, correctness_priority=2)
def math_reward(completion: str, fields: dict) -> Score:
    """math-verify equivalence of the extracted answer and the row's `answer`."""
    from math_verify import verify

    answer = extract_answer(completion)
    if not answer:
        return Score(0.0, {"reason": "no answer"})
    gold, pred = _math_parse(str(fields["answer"])), _math_parse(answer)
    if not gold:
        raise ValueError(f"the row's answer {fields['answer']!r} could not be parsed")
    if not pred:
        return Score(0.0, {"reason": "unparsable answer", "extracted": answer})
    return Score(float(verify(gold, pred)), {"parsed": str(pred[0])[:200], "extracted": answer})


_COUNTDOWN_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                  ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _eval_countdown(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_countdown(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _COUNTDOWN_OPS:
        left, right = _eval_countdown(node.left, used), _eval_countdown(node.right, used)
        return _COUNTDOWN_OPS[type(node.op)](left, right)  # ZeroDivisionError -> caller
    what = type(node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node).__name__
    raise ValueError(f"{what} is not allowed (only integers, + - * / and parentheses)")


@register("countdown")
def countdown_reward(completion: str, fields: dict) -> Score:
    """1 when the answer is an expression using each of `numbers` exactly once that
    evaluates exactly (rationals) to `target`. Parsed with an AST whitelist, never eval."""
    answer = extract_answer(completion)
    if not answer or len(answer) > 500:
        return Score(0.0, {"reason": "no answer" if not answer else "too long"})
    expr = answer.split("=")[0]
    try:
        used: list[int] = []
        value = _eval_countdown(ast.parse(expr, mode="eval"), used)
    except ZeroDivisionError:
        return Score(0.0, {"reason": "division by zero"})
    except (SyntaxError, ValueError) as e:
        return Score(0.0, {"reason": str(e)[:200]})
    if sorted(used) != sorted(int(n) for n in fields["numbers"]):
        return Score(0.0, {"reason": f"numbers used {sorted(used)} are not {sorted(fields['numbers'])}"})
    return Score(float(value == Fraction(fields["target"])), {"value": str(value)})


@register("code")
def code_reward(completion: str, fields: dict, **limits) -> Score:
    """Share of the row's `tests` ({"input", "output"}) the program passes; the program
    is the last ```python block of the answer (or of the completion)."""
    from rewards.sandbox import extract_program, run_tests

    program = extract_program(extract_answer(completion) or "") or extract_program(strip_thinking(completion))
    if program is None:
        return Score(0.0, {"reason": "no python block"})
    passed, info = run_tests(program, fields["tests"], **limits)
    return Score(passed / max(len(fields["tests"]), 1), info)


# --------------------------------------------------------------------- shaping
@register("overlong")
def overlong_penalty(completion: str, fields: dict, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer, then linearly
    down to -1 at max_tokens, -1 beyond."""
    length = int(fields["completion_tokens"])
    if length <= max_tokens - buffer:
        return 0.0
    if length <= max_tokens:
        return (max_tokens - buffer - length) / buffer
    return -1.0


@register("repetition")
def repetition_penalty(completion: str, fields: dict, n: int = 3, unit: str = "word") -> float:
    """Minus the share of n-grams (of words, or of characters) that repeat an earlier one."""
    items = completion.split() if unit == "word" else list(completion)
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    if not grams:
        return 0.0
    return -(1.0 - len(set(grams)) / len(grams))


_SCRIPTS = {"latin": ("LATIN",), "cyrillic": ("CYRILLIC",), "greek": ("GREEK",), "arabic": ("ARABIC",),
            "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")}


@register("language")
def language_consistency(completion: str, fields: dict, script: str = "latin") -> float:
    """R1's language consistency reward: the share of the words in the chain of thought
    (inside <think>) whose letters are all in the target script."""
    prefixes = _SCRIPTS[script]
    thought = " ".join(m[len("<think>"): -len("</think>")] for m in _THINK_BLOCK.findall(completion))
    words = [w for w in re.findall(r"\w+", thought) if any(ch.isalpha() for ch in w)]
    if not words:
        return 0.0
    in_script = sum(
        all(unicodedata.name(ch, "").startswith(prefixes) for ch in w if ch.isalpha()) for w in words
    )
    return in_script / len(words)
