"""Countdown reward: the equation in the response's last ``<answer>...</answer>``.

Scores (TinyZero's scale): 1.0 if the equation uses exactly the given numbers (as a multiset,
each once) and evaluates to the target; 0.1 (``format_score``) if it is a well-formed
arithmetic expression but wrong (wrong value, numbers reused/missing/extra, division by
zero); 0.0 if there is no answer tag or its content is not a well-formed expression.

Parser rules. The answer is parsed with :func:`ast.parse` and only these nodes are accepted:
non-negative integer literals, binary ``+ - * /``, unary minus and parentheses. Names, calls,
attributes, ``**``, ``//``, ``%``, floats and everything else are malformed; nothing is ever
evaluated by Python. Before parsing, the text must consist of digits, ``+ - * / ( ) =`` and
whitespace only (which also rules out ``1_000`` style literals) and be at most
:data:`MAX_ANSWER_CHARS` long, which bounds the parser's work, the nesting depth and the size
of any intermediate value. Arithmetic is exact (:class:`fractions.Fraction`), so ``2/3*3``
equals 2. One ``=`` is accepted when its right-hand side is a plain integer:
``1+2*3 = 7`` is correct iff the left side uses the numbers, evaluates to the target and the
right side equals the target; any other use of ``=`` is malformed.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

# Four numbers <= 100 with operators and brackets fit in ~40 characters; 256 leaves room for
# spacing while keeping the parser's work and every intermediate value small.
MAX_ANSWER_CHARS = 256
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/()=\s]*")
_BINARY_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


class _Malformed(Exception):
    """The answer is not an expression of the accepted grammar."""


def last_answer(response: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` in ``response``, or None."""
    end = response.rfind("</answer>")
    if end < 0:
        return None
    start = response.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return response[start + len("<answer>") : end]


def _walk(node: ast.AST, literals: list[int]) -> None:
    """Check ``node`` against the whitelist, collecting its integer literals."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, _BINARY_OPS):
        _walk(node.left, literals)
        _walk(node.right, literals)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        _walk(node.operand, literals)
    else:
        raise _Malformed(type(node).__name__)


def _value(node: ast.AST) -> Fraction:
    """Exact value of a whitelisted tree; raises ZeroDivisionError on division by zero."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        return -_value(node.operand)
    assert isinstance(node, ast.BinOp)
    left, right = _value(node.left), _value(node.right)
    if isinstance(node.op, ast.Add):
        return left + right
    if isinstance(node.op, ast.Sub):
        return left - right
    if isinstance(node.op, ast.Mult):
        return left * right
    return left / right


def parse_equation(text: str) -> tuple[ast.AST, list[int], int | None]:
    """Parse an answer into (expression tree, its integer literals, right-hand side or None).

    Raises ``ValueError`` if ``text`` is not a well-formed equation of the accepted grammar.
    """
    if len(text) > MAX_ANSWER_CHARS:
        raise ValueError(f"answer longer than {MAX_ANSWER_CHARS} characters")
    if not _ALLOWED_CHARS.fullmatch(text):
        raise ValueError("answer contains characters other than digits, + - * / ( ) = and spaces")
    sides = text.split("=")
    if len(sides) > 2:
        raise ValueError("more than one '='")
    rhs: int | None = None
    if len(sides) == 2:
        if not re.fullmatch(r"\s*[0-9]+\s*", sides[1]):
            raise ValueError("the right-hand side of '=' must be a plain integer")
        rhs = int(sides[1])
    # Newlines would end the expression early in eval mode; they carry no meaning here.
    source = " ".join(sides[0].split())
    try:
        with warnings.catch_warnings():  # e.g. "'int' object is not callable" for "7(5)", rejected below anyway
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source, mode="eval").body
        literals: list[int] = []
        _walk(tree, literals)
    except (SyntaxError, RecursionError, _Malformed) as exc:
        raise ValueError(f"not an arithmetic expression: {exc}") from None
    return tree, literals, rhs


def _target_and_numbers(ground_truth: Any) -> tuple[int, list[int]]:
    # Parquet returns the struct as a dict whose list is a numpy array; a JSON string is also accepted.
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)
    if not isinstance(ground_truth, Mapping):
        kind = type(ground_truth).__name__
        raise TypeError(f"countdown ground_truth must be a mapping with 'target' and 'numbers', got {kind}")
    return int(ground_truth["target"]), [int(n) for n in ground_truth["numbers"]]


def score_countdown(solution_str: str, ground_truth: Any, format_score: float = 0.1, score: float = 1.0) -> float:
    """Score one response (decoded response only) against ``{"target": int, "numbers": [int, ...]}``."""
    target, numbers = _target_and_numbers(ground_truth)
    answer = last_answer(solution_str)
    if answer is None:
        return 0.0
    try:
        tree, literals, rhs = parse_equation(answer.strip())
    except ValueError:
        return 0.0
    if sorted(literals) != sorted(numbers) or (rhs is not None and rhs != target):
        return format_score
    try:
        value = _value(tree)
    except ZeroDivisionError:
        return format_score
    return score if value == target else format_score
