"""The calculator tool: arithmetic on integers and decimals, parsed, never executed as code.

The model writes an expression (``"4821 * 7395"``); it is parsed with
:mod:`ast` and only numbers, ``+ - * / // % **``, unary signs and parentheses
are evaluated. Sizes are bounded before any operation (operand digits, exponent),
so no expression can run long or take memory: the calculator needs no sandbox.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from fractions import Fraction

MAX_DIGITS = 60
"""Largest operand or result, in decimal digits."""
MAX_EXPONENT = 64
MAX_LENGTH = 200
"""Longest expression accepted, in characters."""


class CalculatorError(ValueError):
    """The expression is not arithmetic the calculator does; the message is for the model."""


_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: operator.mod,
}


def _digits(x: Fraction) -> int:
    return max(len(str(abs(x.numerator))), len(str(x.denominator)))


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = Fraction(str(node.value))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        inner = _eval(node.operand)
        value = -inner if isinstance(node.op, ast.USub) else inner
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exp = _eval(node.left), _eval(node.right)
        if exp.denominator != 1 or abs(exp) > MAX_EXPONENT:
            raise CalculatorError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
        if base == 0 and exp < 0:
            raise CalculatorError("division by zero")
        if _digits(base) * abs(exp.numerator) > 4 * MAX_DIGITS:
            raise CalculatorError(f"result longer than {MAX_DIGITS} digits")
        value = base ** int(exp)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        value = _BINARY[type(node.op)](left, right)
    else:
        raise CalculatorError("only numbers, + - * / // % **, and parentheses are allowed")
    if _digits(value) > MAX_DIGITS:
        raise CalculatorError(f"result longer than {MAX_DIGITS} digits")
    return value


def evaluate(expression: str) -> str:
    """The value of ``expression`` as text: an integer exactly, anything else to 12 significant digits."""
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot parse {text!r} as arithmetic") from None
    value = _eval(tree)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.12g}"
