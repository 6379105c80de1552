"""Built-in rule rewards against hand-checked cases."""

from __future__ import annotations

from typing import Any

import pytest

from miles.reward import BUILTIN_REWARDS, f1_score, gsm8k_answer, last_boxed, math_equal, resolve_rule

NO_META: dict[str, Any] = {}


def score(rm_type: str, response: str, label: Any) -> float:
    rule = resolve_rule(rm_type)
    assert rule is not None
    return rule(response, label, NO_META)


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{{a}}", "{a}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\left\{1, \{2\}\right\}}", r"\left\{1, \{2\}\right\}"),
        (r"\fbox{7}", "7"),
        (r"$\boxed 42$", "42"),
        (r"\boxed{unclosed", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text: str, boxed: str | None) -> None:
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        (r"Half: \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{1}{2}}", r"\boxed{\frac12}", 1.0),
        (r"\boxed{{a}}", "a", 1.0),
        (r"\boxed{1,234}", 1234, 1.0),
        (r"\boxed{x + 1}", "1+x", 1.0),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
        (r"\boxed{3}", "4", 0.0),
        (r"\boxed{3}", ["4", "3"], 1.0),  # a label list holds several acceptable answers
        ("the answer is 0.5", "0.5", 0.0),  # math needs a boxed answer
        (r"\boxed{}", "0", 0.0),
    ],
)
def test_math(response: str, label: Any, reward: float) -> None:
    assert score("math", response, label) == reward


def test_math_equal_sympy_fallback_for_what_math_verify_cannot_parse() -> None:
    assert math_equal("2x", "x*2")
    assert not math_equal("2x", "3x")


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        ("She pays 1000 + 234 = 1234.\n#### 1,234", "1234", 1.0),
        ("#### 1234", "The total is 1,234 dollars.\n#### 1,234", 1.0),  # label as a full GSM8K solution
        ("#### $18.00", 18, 1.0),
        ("3 apples and 4 pears make 7", "7", 1.0),  # no ####: the last number
        ("#### 7 apples, not 8", "7", 1.0),  # the number right after ####
        ("#### 12", "13", 0.0),
        ("no number at all", "1", 0.0),
        ("#### -5", "-5", 1.0),
    ],
)
def test_gsm8k(response: str, label: Any, reward: float) -> None:
    assert score("gsm8k", response, label) == reward


def test_gsm8k_answer_extraction() -> None:
    assert gsm8k_answer("12 then #### 1,234.5") == 1234.5
    assert gsm8k_answer("a 3 b 4.25") == 4.25
    assert gsm8k_answer("####") is None


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        ("Paris", "Paris", 1.0),
        ("  Paris \n", "Paris", 1.0),
        ("New   York", "New York", 1.0),
        ("paris", "Paris", 0.0),
        ("Paris.", "Paris", 0.0),
        ("Rome", ["Paris", "Rome"], 1.0),
    ],
)
def test_exact_match(response: str, label: Any, reward: float) -> None:
    assert score("exact_match", response, label) == reward


def test_f1() -> None:
    # pred tokens [cat, sat, mat], gold [cat, sat, on, mat] (articles and punctuation dropped): P=1, R=3/4
    assert f1_score("The cat sat, the mat!", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert f1_score("Paris", "paris") == 1.0
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("", "") == 1.0
    assert score("f1", "big red dog", ["red", "big red dog"]) == 1.0
    assert score("f1", "big red dog", "red cat") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        ("reasoning...\nAnswer: 42", "42", 1.0),
        ("Answer: 41\nwait, recheck\nanswer : 42", "42", 1.0),  # the last Answer: counts, case-insensitive
        ("Answer: $1,000$", "1000", 1.0),
        ("Answer: x = 7", "7.0", 1.0),
        (r"Answer: \boxed{12}", "12", 1.0),
        ("Answer: 43", "42", -1.0),
        (r"the answer is \boxed{42}", "42", -1.0),  # no "Answer:" line: DAPO scores -1
        ("Answer: 42" + " filler" * 60, "42", -1.0),  # only the last 300 characters are read
    ],
)
def test_dapo(response: str, label: Any, reward: float) -> None:
    assert score("dapo", response, label) == reward


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        (r"<think>maybe \boxed{3}</think> The answer is \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"<think>it is \boxed{0.5}</think> so \boxed{3}", "0.5", 0.0),  # only the part after </think>
        (r"<think>never closes \boxed{0.5}", "0.5", 0.0),
        (r"<think>x</think> no box", "0.5", 0.0),
        (r"###Response \boxed{5}", r"\boxed{5}", 1.0),
    ],
)
def test_deepscaler(response: str, label: Any, reward: float) -> None:
    assert score("deepscaler", response, label) == reward


def test_boxed_prefix_and_registry() -> None:
    assert score("boxed_exact_match", r"I think \boxed{Paris}", "Paris") == 1.0
    assert score("exact_match", r"I think \boxed{Paris}", "Paris") == 0.0
    assert score("boxed_gsm8k", r"3 then \boxed{5} and 9", "5") == 1.0
    assert resolve_rule("boxed_nonsense") is None and resolve_rule("nonsense") is None
    assert set(BUILTIN_REWARDS) == {"math", "gsm8k", "exact_match", "f1", "dapo", "deepscaler", "final_turn"}
