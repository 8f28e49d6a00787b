"""The built-in `calculator` tool: arithmetic evaluated without `eval`. The query is parsed as one Python expression
(`ast.parse(mode="eval")`) and only numbers, `+ - * / // % **`, unary `+ -` and parentheses are evaluated; anything
else (a name, a call, an attribute, a string…) is refused. Inputs are bounded so that no call runs long or builds a
huge number: the query's length, a power's exponent and every value's magnitude."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from stages import python_ast

MAX_QUERY_CHARS = 200  # a longer query is refused
MAX_EXPONENT = 100  # `a ** b` with |b| above this is refused
MAX_MAGNITUDE = 10 ** 50  # a literal or intermediate value above this (in absolute value) is refused
SIGNIFICANT_DIGITS = 10  # a fractional result is written with at most this many significant digits

Number = int | float

BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def bounded(value: object) -> Number:
    """`value` if it is a finite real number within MAX_MAGNITUDE; else ValueError."""
    if type(value) not in (int, float):  # bool is refused too; a negative base's fractional power is complex
        raise ValueError(f"not a real number: {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result is not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"number too large (limit 1e{len(str(MAX_MAGNITUDE)) - 1})")
    return value


def binary(node: ast.BinOp) -> Number:
    if type(node.op) not in BINARY:
        raise ValueError(f"operator {type(node.op).__name__} is not allowed")
    left, right = evaluate(node.left), evaluate(node.right)
    if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
        raise ValueError(f"exponent too large (limit {MAX_EXPONENT})")
    try:
        return bounded(BINARY[type(node.op)](left, right))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("result too large") from None


def evaluate(node: ast.AST) -> Number:
    """The value of an arithmetic expression tree; ValueError naming the first thing not allowed."""
    if isinstance(node, ast.Constant):
        return bounded(node.value)
    if isinstance(node, ast.BinOp):
        return binary(node)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return bounded(UNARY[type(node.op)](evaluate(node.operand)))
    raise ValueError(f"{type(node).__name__} is not allowed (numbers and + - * / // % ** only)")


def formatted(value: Number) -> str:
    """An integer without ".0"; a fraction in decimal with at most SIGNIFICANT_DIGITS significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 10 ** SIGNIFICANT_DIGITS:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.{SIGNIFICANT_DIGITS}g}"


def calculator(query: str, **_: object) -> str:
    """The value of the arithmetic expression `query` as text (`"(1 + 2) / 4"` -> `"0.75"`); ValueError with a short
    reason when it is not plain arithmetic or breaks a bound."""
    query = query.strip()
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"expression too long ({len(query)} > {MAX_QUERY_CHARS} characters)")
    if not query:
        raise ValueError("empty expression")
    try:
        tree = python_ast.parse(query, mode="eval")
    except (SyntaxError, MemoryError, RecursionError):  # too deeply nested parentheses are a MemoryError
        raise ValueError("not an arithmetic expression") from None
    return formatted(evaluate(tree.body))
