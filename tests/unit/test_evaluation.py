"""pass@k and cons@k against hand-computed values (ties and equivalent answers
included), and answer equivalence as each verifier sees it."""
import math

import pytest

from cluster.artifacts.eval_report import majority_correct, pass_at_k, powers_of_two, summarize_eval
from rewards.verifiers import answer_classes


def test_unbiased_pass_at_k_by_hand():
    # 4 samples, 2 correct: pass@1 = 1/2; pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 2, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    # 8 samples, 1 correct: pass@4 = 1 - C(7,4)/C(8,4) = 1 - 35/70
    assert pass_at_k(8, 1, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs at least 8"):
        pass_at_k(4, 1, 8)
    assert powers_of_two(8) == [1, 2, 4, 8] and powers_of_two(6) == [1, 2, 4]


def test_majority_vote_ties_go_to_the_answer_seen_first():
    # classes 0 and 1 have two votes each: class 0 was seen first, and is right
    assert majority_correct([0, 1, 1, 0], [True, False, False, True]) is True
    assert majority_correct([1, 0, 0, 1], [False, True, True, False]) is False  # first seen: class 1, wrong
    # no answer never wins, even when most frequent
    assert majority_correct([None, None, None, 3], [False, False, False, True]) is True
    assert majority_correct([None, None], [False, False]) is False


def test_equivalent_answers_are_counted_together():
    assert answer_classes("accuracy", ["2", "2.0", "4/2", "3", None, " 3 "]) == [0, 0, 0, 3, None, 3]
    assert answer_classes("math", ["1/2", "0.5", "\\frac{1}{2}", "2", "x"]) == [0, 0, 0, 3, 4]
    assert answer_classes("countdown", ["1+2", "2+1", "1+2"]) == [0, 1, 0]  # text, as written


def test_summary_by_hand():
    # prompt A: answers 0.5, 1/2, 3, 3 with the first two right -> cons: classes {0: 2, 2: 2} tie -> first: right
    # prompt B: answers 7, 8, 8, None, right only the first -> cons: class of "8" wins -> wrong
    results = [
        {"scores": [1.0, 1.0, 0.0, 0.0], "classes": [0, 0, 2, 2], "lengths": [10, 20, 30, 40]},
        {"scores": [1.0, 0.0, 0.0, 0.0], "classes": [0, 1, 1, None], "lengths": [50, 60, 70, 80]},
    ]
    out = summarize_eval(results, 4)
    assert out["k"] == 4 and out["n_prompts"] == 2
    assert out["pass@1"] == pytest.approx((0.5 + 0.25) / 2)
    assert out["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - math.comb(3, 2) / math.comb(4, 2))) / 2)
    assert out["pass@4"] == 1.0 and out["cons@4"] == 0.5
    assert out["mean_length"] == 45
    # quartiles by length: (10, 20) both right; (30, 40) none; (50, 60) one; (70, 80) none
    assert [q["accuracy"] for q in out["accuracy_by_length"]] == [1.0, 0.0, 0.5, 0.0]
