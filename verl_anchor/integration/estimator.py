"""The `anchor_*` advantage estimators registered in verl's estimator registry.

verl's `compute_advantage` passes a registered estimator only the rewards, the response
mask, the uid index and `config.algorithm` (notes §3), never the attention weights. So the
estimator computes the *base* advantage (`algorithm.anchor.base_estimator`, default GRPO)
and the anchor trainer scales it by gamma right after. Called outside that trainer the
estimator refuses to run: silently training plain GRPO would be the worst failure.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from verl_anchor.integration.settings import ANCHOR_ESTIMATORS, DEFAULT_BASE_ESTIMATOR, TRAINER_MODE

_ACTIVE = threading.local()


class anchor_trainer_active:  # noqa: N801 - used as a context manager, named like one
    """Marks (in this thread) that the anchor trainer will scale the advantages computed inside."""

    def __enter__(self) -> None:
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.depth -= 1


def compute_anchor_base_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    reward_baselines: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base advantages `(advantages, returns)`, each `(batch, response_length)`; gamma comes later."""
    from verl.trainer.ppo import core_algos

    if getattr(_ACTIVE, "depth", 0) <= 0:
        raise RuntimeError(
            f"an anchor estimator ({', '.join(ANCHOR_ESTIMATORS)}) ran outside the anchor trainer, so its "
            f"attention weights would never be applied: set trainer.v1.trainer_mode={TRAINER_MODE}"
        )
    anchor = (config.get("anchor", None) if config is not None else None) or {}
    base = anchor.get("base_estimator", DEFAULT_BASE_ESTIMATOR)
    if base == "grpo":  # verl hard-codes GRPO in compute_advantage; call it the same way
        norm = config.get("norm_adv_by_std_in_grpo", True) if config is not None else True
        return core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=token_level_rewards, response_mask=response_mask, index=index,
            norm_adv_by_std_in_grpo=norm,
        )
    extra = {"index": index} if index is not None else {}
    if reward_baselines is not None:
        extra["reward_baselines"] = reward_baselines
    return core_algos.get_adv_estimator_fn(base)(
        token_level_rewards=token_level_rewards, response_mask=response_mask, config=config, **extra
    )


def register_estimators() -> None:
    """Register every anchor estimator name (idempotent: verl accepts the same function again)."""
    from verl.trainer.ppo.core_algos import register_adv_est

    for name in ANCHOR_ESTIMATORS:
        register_adv_est(name)(compute_anchor_base_advantage)
