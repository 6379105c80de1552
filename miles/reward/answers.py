"""Finding the final answer in a response and deciding whether two answers are equal.

Rule-based rewards reduce to two questions: *what did the model answer* (the
last ``\\boxed{...}``, the text after ``####`` or ``Answer:``) and *is that the
reference answer* (``1/2`` vs ``0.5``, ``x+1`` vs ``1+x``). The second is
delegated to math-verify, a maintained LaTeX/sympy equivalence checker; a
small sympy path covers what it cannot parse, and a normalized string match
comes first because it is cheap and catches most cases.

math-verify's own timeouts use ``signal.alarm`` (main thread only); rewards
run in worker threads, so they are disabled here and the reward model applies
its own per-sample timeout instead.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

# math-verify warns on every call that its signal timeouts are disabled; we time out ourselves.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``, braces balanced.

    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; an unclosed box gives ``None``.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i] == " ":  # "\boxed 5": the answer runs to the next space or dollar
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def label_answer(label: Any) -> str:
    """The reference answer as text: a boxed label is unboxed, numbers are formatted plainly."""
    if isinstance(label, bool):
        return str(label)
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    text = str(label).strip()
    return last_boxed(text) or text


def normalize(answer: str) -> str:
    """A canonical spelling for string comparison: no spaces, ``$``, ``\\left``/``\\right``, outer braces, or thousands
    commas.
    """
    s = answer.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$", " "):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
        s = s[1:-1]
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return False
    return depth == 0


def math_equal(pred: str, gold: str) -> bool:
    """Whether two final answers are mathematically the same (``\\frac{1}{2}`` == ``0.5``)."""
    a, b = normalize(pred), normalize(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    verdict = _math_verify_equal(a, b)
    if verdict is not None:
        return verdict
    return _sympy_equal(a, b)


def _math_verify_equal(pred: str, gold: str) -> bool | None:
    """math-verify's verdict, or ``None`` when it cannot parse one of the answers."""
    try:
        from math_verify import parse, verify

        parsed_gold = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)  # type: ignore[arg-type]
        parsed_pred = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)  # type: ignore[arg-type]
        if not parsed_gold or not parsed_pred:
            return None
        return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None))
    except Exception as exc:  # math-verify raises from deep inside sympy/antlr on odd input
        logger.debug("math-verify failed on %r vs %r: %s", pred, gold, exc)
        return None


_LATEX_NESTED = [
    (re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}"), r"((\1)/(\2))"),
    (re.compile(r"\\sqrt\{([^{}]*)\}"), r"sqrt(\1)"),
]
_LATEX_FLAT = [
    (re.compile(r"\\cdot|\\times"), "*"),
    (re.compile(r"\\pi"), "pi"),
    (re.compile(r"\^"), "**"),
    (re.compile(r"[{}]"), ""),
]


def _sympy_equal(pred: str, gold: str) -> bool:
    """Equality of simple expressions through sympy, after rewriting the common LaTeX forms."""
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )

        transformations = (*standard_transformations, implicit_multiplication_application)

        def to_expr(s: str) -> Any:
            for _ in range(4):  # innermost first: \frac{\sqrt{2}}{2} needs two passes
                for pattern, repl in _LATEX_NESTED:
                    s = pattern.sub(repl, s)
            for pattern, repl in _LATEX_FLAT:
                s = pattern.sub(repl, s)
            return parse_expr(s, transformations=transformations, evaluate=True)

        diff = sympy.simplify(to_expr(pred) - to_expr(gold))
        return bool(diff == 0)
    except Exception:
        return False


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def to_number(text: str) -> float | None:
    """The number spelled by ``text`` (``$1,234.50`` -> 1234.5), or ``None``."""
    m = _NUMBER.search(text.replace("$", ""))
    if m is None:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def gsm8k_answer(text: str) -> float | None:
    """GSM8K's final answer: the number after the last ``####``, else the last number in the text."""
    if "####" in text:
        return to_number(text.rsplit("####", 1)[1])
    numbers = _NUMBER.findall(text.replace("$", ""))
    for candidate in reversed(numbers):
        value = to_number(candidate)
        if value is not None:
            return value
    return None


_DAPO_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def dapo_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` in the response's final 300 characters (DAPO's convention)."""
    found = _DAPO_ANSWER.findall(text[-300:])
    return found[-1] if found else None


def dapo_normalize(answer: str) -> str:
    """DAPO-style canonical form: the right side of an ``=``, no TeX decoration, integers without commas."""
    s = answer.split("=")[-1]
    s = re.sub(r"\\(?:text|textbf|mathrm|overline)\{([^{}]*)\}", r"\1", s)
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = normalize(s)
    try:
        value = float(s)
        if value.is_integer():
            return str(int(value))
    except ValueError:
        pass
    return s


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def f1_tokens(text: str) -> list[str]:
    """SQuAD-style tokens: lower case, punctuation and articles removed, split on whitespace."""
    return _ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split()
