"""Math reward: the response's last ``\\boxed{...}`` checked against the ground truth with math-verify.

Score 1.0 if the boxed answer is mathematically equivalent to the ground truth (math-verify's
``parse`` + ``verify``: ``\\frac{1}{2}`` = ``0.5``, ``\\boxed{72}`` = ``72``, sets, intervals,
...), else 0.0. A response without ``\\boxed{}`` scores 0: the prompt asks for one.

Timeouts: the comparison runs in worker processes that are killed after ``timeout_s`` (the
answer then scores 0), restarted within fixed bounds when they fail, and never in the calling
process; see :mod:`verl_anchor.rewards.math_verify_pool`. Identical strings skip the workers.
"""

from __future__ import annotations

import os
from typing import Any

from verl_anchor.rewards.math_verify_pool import check_timeout, shared_verifier

DEFAULT_TIMEOUT_S = 10.0
# Longest boxed answer considered (MATH-500's longest answer has 159 characters).
MAX_BOXED_CHARS = 1000
# Worker count per process calling the reward; override with VERL_ANCHOR_MATH_WORKERS.
NUM_WORKERS = int(os.environ.get("VERL_ANCHOR_MATH_WORKERS", min(4, os.cpu_count() or 1)))


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed) or ``\\boxed x`` in ``text``."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        return None
    rest = text[idx + len("\\boxed") : idx + len("\\boxed") + MAX_BOXED_CHARS + 2]
    if rest.startswith("{"):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return rest[1:i]
        return None  # unbalanced, or longer than MAX_BOXED_CHARS
    if rest.startswith(" "):
        token = rest.split(maxsplit=1)
        return token[0].rstrip("$.") if token else None
    return None


def _normalized(answer: str) -> str:
    return "".join(answer.split()).strip("$")


def answers_match(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether answer ``pred`` is equivalent to ``gold`` (both without ``\\boxed``), within ``timeout_s``."""
    check_timeout(timeout_s)
    if _normalized(gold) == _normalized(pred):
        return True
    return shared_verifier(NUM_WORKERS).verify(gold, pred, timeout_s)


def score_math(solution_str: str, ground_truth: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the last ``\\boxed{}`` of ``solution_str`` is equivalent to ``ground_truth``, else 0.0."""
    check_timeout(timeout_s)  # a bad option fails on the first response, boxed or not
    pred = last_boxed(solution_str)
    if pred is None or not pred.strip():
        return 0.0
    return 1.0 if answers_match(str(ground_truth), pred, timeout_s) else 0.0
