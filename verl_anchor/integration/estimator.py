"""The `anchor_*` names in verl's estimator registry.

The anchor trainer (`integration.trainer`) never calls these: during the advantage step it
runs verl's own code path for the base estimator (`algorithm.anchor.base_estimator`) and then
scales the result by gamma. The names are registered so that verl knows them, and so that a
pipeline that bypasses the anchor trainer (a custom launcher, the legacy trainer) fails
loudly instead of silently training without the attention weights.
"""

from __future__ import annotations

from typing import Any

from verl_anchor.integration.settings import ANCHOR_ESTIMATORS


def refuse_outside_anchor_trainer(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        f"an anchor estimator ({', '.join(ANCHOR_ESTIMATORS)}) was called directly by verl's compute_advantage: "
        "its gamma weights are applied only by the anchor trainer, which verl_anchor puts in place of every v1 "
        "trainer (trainer.use_v1=true, trainer.v1.trainer_mode=sync|colocate_async|separate_async, started by "
        "python -m verl.trainer.main_ppo); this pipeline bypassed it"
    )


def register_estimators() -> None:
    """Register every anchor estimator name (idempotent: verl accepts the same function again)."""
    from verl.trainer.ppo.core_algos import register_adv_est

    for name in ANCHOR_ESTIMATORS:
        register_adv_est(name)(refuse_outside_anchor_trainer)
