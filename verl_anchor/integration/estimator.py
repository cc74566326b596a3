"""The `anchor_*` names in verl's estimator registry.

The anchor step (`integration.trainer` for v1, `integration.legacy` for `RayPPOTrainer`) never
calls these: during the advantage step it runs verl's own code path for the base estimator
(`algorithm.anchor.base_estimator`) and then scales the result by gamma. The names are registered
so that verl knows them, and so that a pipeline that bypasses the anchor step (a custom trainer
that calls verl's estimator registry itself) fails loudly instead of silently training without
the attention weights.
"""

from __future__ import annotations

from typing import Any

from verl_anchor.integration.settings import ANCHOR_ESTIMATORS


def refuse_outside_anchor_trainer(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        f"an anchor estimator ({', '.join(ANCHOR_ESTIMATORS)}) was called directly by verl's compute_advantage: "
        "its gamma weights are applied only by the anchor step, which verl_anchor adds to every v1 trainer mode "
        "and to the legacy RayPPOTrainer (and its subclasses) after their init_workers; this pipeline bypassed it"
    )


def register_estimators() -> None:
    """Register every anchor estimator name (idempotent: verl accepts the same function again)."""
    from verl_anchor.integration.verl_api import register_adv_est

    for name in ANCHOR_ESTIMATORS:
        register_adv_est(name)(refuse_outside_anchor_trainer)
