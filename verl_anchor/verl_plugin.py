"""verl plugin entry point (`verl.plugins` group): loaded by `import verl` in every process.

Registers the `anchor_*` advantage estimators and the CPU platform and HF rollout of
`verl_anchor.cpu`; wraps verl's `get_trainer_cls` so every v1 trainer mode comes back with the
anchor step (`integration.trainer`), and puts the anchor checks in front of verl's
`validate_config`, so a bad `algorithm.anchor.*` fails in the driver before Ray starts.

verl swallows plugin import errors at DEBUG level; this module logs its own at WARNING,
with the traceback, so a broken install is visible.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("verl_anchor")


def _with_anchor_checks(validate_config):
    """verl's `validate_config`, preceded by the anchor completion and checks (idempotent wrapper)."""
    if getattr(validate_config, "_verl_anchor", False):
        return validate_config

    @functools.wraps(validate_config)
    def validate(config, *args, **kwargs):
        from verl.trainer.ppo.utils import need_critic

        from verl_anchor.integration.settings import prepare_config
        from verl_anchor.rewards import check_reward_config

        check_reward_config(config)
        settings = prepare_config(config)
        if settings is not None and settings.base_estimator == "gae":
            # main_ppo computed use_critic before this ran; the gae base may just have enabled the critic.
            if "use_critic" in kwargs:
                kwargs["use_critic"] = need_critic(config)
            elif len(args) >= 2:
                args = (args[0], need_critic(config), *args[2:])
        return validate_config(config, *args, **kwargs)

    validate._verl_anchor = True
    return validate


def _with_anchor_trainers(get_trainer_cls):
    """verl's `get_trainer_cls`, returning the anchor variant of each mode's class (idempotent wrapper)."""
    if getattr(get_trainer_cls, "_verl_anchor", False):
        return get_trainer_cls

    @functools.wraps(get_trainer_cls)
    def lookup(name):
        from verl_anchor.integration.settings import LEGACY_TRAINER_MODE
        from verl_anchor.integration.trainer import anchor_trainer_cls

        return anchor_trainer_cls(get_trainer_cls("sync" if name == LEGACY_TRAINER_MODE else name))

    lookup._verl_anchor = True
    return lookup


def register() -> None:
    """Register everything with verl. Safe to call more than once."""
    import verl.utils.config as verl_config

    from verl_anchor import cpu

    cpu.register()  # first: importing the trainer resolves verl's platform, which may be "cpu"

    import verl.trainer.ppo.v1 as v1
    from verl.trainer.ppo.v1 import trainer_base

    from verl_anchor.integration.estimator import register_estimators

    register_estimators()
    verl_config.validate_config = _with_anchor_checks(verl_config.validate_config)
    # main_ppo's TaskRunner reads the package attribute at call time; trainer_base's for other callers.
    v1.get_trainer_cls = trainer_base.get_trainer_cls = _with_anchor_trainers(trainer_base.get_trainer_cls)


try:
    register()
except Exception:  # noqa: BLE001 - verl would hide it; make it loud instead
    logger.warning("verl_anchor failed to register with verl; anchor estimators are unavailable", exc_info=True)
