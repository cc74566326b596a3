"""Rule-based rewards for verl, routed by ``data_source``.

Use as verl's custom reward::

    reward.custom_reward_function.path=pkg://verl_anchor.rewards
    reward.custom_reward_function.name=compute_score

Routing (names written by ``verl-anchor data``, see docs/data-and-rewards.md):

- ``countdown`` -> :func:`verl_anchor.rewards.countdown.score_countdown` (1.0 / 0.1 / 0.0);
- ``verl_anchor/<set>`` (``verl_anchor/gsm8k``, ``verl_anchor/math500``, ...; the prompts ask for
  ``\\boxed{}``) -> :func:`verl_anchor.rewards.boxed_math.score_math` (math-verify, 1.0 / 0.0);
- anything else -> verl's ``default_compute_score`` (e.g. ``openai/gsm8k`` with ``#### 72``,
  ``math_dapo``, ``aime*``), whose return value (a float, or a dict for ``math_dapo``) is passed on.

Our math sets deliberately use names verl does not know: with the custom reward not configured,
verl raises ``NotImplementedError`` for them instead of silently scoring boxed answers with its
``####`` (gsm8k) or ``Answer:`` (math_dapo) extractors.
"""

from __future__ import annotations

from typing import Any

from verl_anchor.rewards.boxed_math import DEFAULT_TIMEOUT_S, score_math
from verl_anchor.rewards.countdown import score_countdown

COUNTDOWN_SOURCE = "countdown"
MATH_SOURCE_PREFIX = "verl_anchor/"


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> float | dict:
    """verl custom-reward entry point; ``solution_str`` is the decoded response only.

    Keyword options (set through ``reward.custom_reward_function.reward_kwargs``):
    ``format_score`` (countdown, default 0.1) and ``timeout_s`` (math-verify, default 10).
    Other keywords (verl's own, e.g. ``sandbox_fusion_url``) reach ``default_compute_score``.
    """
    if data_source == COUNTDOWN_SOURCE:
        return score_countdown(solution_str, ground_truth, format_score=kwargs.get("format_score", 0.1))
    if data_source.startswith(MATH_SOURCE_PREFIX):
        return score_math(solution_str, ground_truth, timeout_s=kwargs.get("timeout_s", DEFAULT_TIMEOUT_S))
    # Imported here: importing verl pulls in torch and takes seconds.
    from verl_anchor.integration.verl_api import default_compute_score

    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)


def check_reward_config(config: Any) -> None:
    """Driver-side check of a verl config whose custom reward is this module, before Ray starts.

    The math reward's own checks run at its first comparison, i.e. after a rollout; this runs
    them at start-up instead: `reward_kwargs.timeout_s` must be valid and math-verify importable.
    """
    from verl_anchor.rewards.math_verify_pool import check_timeout, require_math_verify

    reward = config.get("reward", None) or {}
    custom = reward.get("custom_reward_function", None) or {}
    path = str(custom.get("path", None) or "")
    if "verl_anchor.rewards" not in path and "verl_anchor/rewards" not in path:
        return
    kwargs = custom.get("reward_kwargs", None) or {}
    if "timeout_s" in kwargs:
        try:
            check_timeout(kwargs["timeout_s"])
        except ValueError as err:
            raise ValueError(f"reward.custom_reward_function.reward_kwargs.{err}") from None
    require_math_verify()


__all__ = [
    "check_reward_config",
    "COUNTDOWN_SOURCE",
    "MATH_SOURCE_PREFIX",
    "compute_score",
    "score_countdown",
    "score_math",
]
