"""verl plugin entry point (`verl.plugins` group): loaded by `import verl` in every process.

Registers the `anchor_*` advantage estimators, the `anchor_sync` v1 trainer mode, the CPU
platform and HF rollout of `verl_anchor.cpu`, and adds the anchor checks to verl's
`validate_config` so a bad `algorithm.anchor.*` fails in the driver before Ray starts.

verl swallows plugin import errors at DEBUG level; this module logs its own at WARNING,
with the traceback, so a broken install is visible.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("verl_anchor")


def _with_anchor_checks(validate_config):
    """verl's `validate_config`, preceded by the anchor checks (idempotent wrapper)."""
    if getattr(validate_config, "_verl_anchor", False):
        return validate_config

    @functools.wraps(validate_config)
    def validate(config, *args, **kwargs):
        from verl_anchor.integration.settings import read_settings

        read_settings(config)
        return validate_config(config, *args, **kwargs)

    validate._verl_anchor = True
    return validate


def register() -> None:
    """Register everything with verl. Safe to call more than once."""
    import verl.utils.config as verl_config

    from verl_anchor import cpu

    cpu.register()  # first: importing the trainer resolves verl's platform, which may be "cpu"

    from verl_anchor.integration import trainer  # noqa: F401  (registers the trainer mode on import)
    from verl_anchor.integration.estimator import register_estimators

    register_estimators()
    verl_config.validate_config = _with_anchor_checks(verl_config.validate_config)


try:
    register()
except Exception:  # noqa: BLE001 - verl would hide it; make it loud instead
    logger.warning("verl_anchor failed to register with verl; anchor estimators are unavailable", exc_info=True)
