"""verl plugin entry point (`verl.plugins` group): loaded by `import verl` in every process.

`import verl` runs this in every driver, TaskRunner and Ray worker, so it stays cheap: it wraps
two functions verl has already imported and defers the rest until verl imports the module
concerned (`_after_import`), so a process that never trains pays nothing for it:

- `verl.utils.config.validate_config` gets the anchor completion and checks in front, so a bad
  `algorithm.anchor.*` fails in the driver before Ray starts;
- `verl.utils.device.auto_set_device`, the first thing `fully_async_main` calls, refuses the
  anchor estimators in the pipelines that never run the anchor step (`check_entry_point`);
- on import of `verl.trainer.ppo.core_algos`: the `anchor_*` estimator names are registered;
- on import of `verl.trainer.ppo.v1`: `get_trainer_cls` is wrapped, so every v1 trainer mode comes
  back with the anchor step (`integration.trainer`);
- on import of `verl.trainer.ppo.ray_trainer` and `metric_utils`: the legacy trainer (`trainer.use_v1=false`,
  `RayPPOTrainer` and the recipes' subclasses) and its module functions are patched in place (`integration.legacy`);
- the CPU platform and HF rollout of `verl_anchor.integration.cpu`: at once under `VERL_PLATFORM=cpu` (verl
  resolves the platform early), else on import of `verl.workers.rollout` (for `rollout.name=hf`).

verl swallows plugin import errors at DEBUG level; this module logs its own at WARNING,
with the traceback, so a broken install is visible.
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger("verl_anchor")

# module name -> what to do with it once it has executed (each runs once per process).
_AFTER_IMPORT: dict[str, Callable[[ModuleType], None]] = {}


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of `_AFTER_IMPORT` with the other finders and runs their patch right after they execute,
    before the importer gets the module back (so `from module import name` already sees the patched name)."""

    def find_spec(self, name, path, target=None):
        if name not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute = spec.loader.exec_module  # the loader object is this spec's own

            def exec_module(module: ModuleType) -> None:
                execute(module)
                _run_patch(name, module)

            spec.loader.exec_module = exec_module
        return spec


_FINDER = _AfterImportFinder()


def _run_patch(name: str, module: ModuleType) -> None:
    patch = _AFTER_IMPORT.pop(name, None)
    if patch is None:
        return
    try:
        patch(module)
    except Exception:  # noqa: BLE001 - an import of verl must not fail because of the plugin; make it loud
        logger.warning("verl_anchor failed to patch %s; anchor estimators may be unavailable", name, exc_info=True)


def _after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run `patch(module)` once `name` is imported: now if it already is, else right after its import."""
    _AFTER_IMPORT[name] = patch
    if name in sys.modules:
        _run_patch(name, sys.modules[name])
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _with_anchor_checks(validate_config):
    """verl's `validate_config`, preceded by the anchor completion and checks."""

    def validate(config, *args, **kwargs):
        from verl_anchor.integration.settings import prepare_config
        from verl_anchor.rewards import check_reward_config

        check_reward_config(config)
        settings = prepare_config(config)
        if settings is not None and settings.base_estimator == "gae":
            from verl_anchor.integration.verl_api import need_critic

            # main_ppo computed use_critic before this ran; the gae base may just have enabled the critic.
            if "use_critic" in kwargs:
                kwargs["use_critic"] = need_critic(config)
            elif len(args) >= 2:
                args = (args[0], need_critic(config), *args[2:])
        return validate_config(config, *args, **kwargs)

    return validate


def _with_entry_point_check(auto_set_device):
    """verl's `auto_set_device` (every entry point's first call on the config), preceded by `check_entry_point`."""

    def set_device(config, *args, **kwargs):
        from verl_anchor.integration.settings import check_entry_point

        check_entry_point(config)
        return auto_set_device(config, *args, **kwargs)

    return set_device


def _with_anchor_trainers(get_trainer_cls):
    """verl's `get_trainer_cls`, returning the anchor variant of each mode's class."""

    def lookup(name):
        from verl_anchor.integration.settings import LEGACY_TRAINER_MODE
        from verl_anchor.integration.trainer import anchor_trainer_cls

        return anchor_trainer_cls(get_trainer_cls("sync" if name == LEGACY_TRAINER_MODE else name))

    return lookup


def _register_estimators(core_algos: ModuleType) -> None:
    from verl_anchor.integration.estimator import register_estimators

    register_estimators()


def _wrap_trainer_lookup(v1: ModuleType) -> None:
    from verl_anchor.integration import verl_api

    # main_ppo's TaskRunner reads the package attribute at call time; trainer_base's for other callers.
    verl_api.patch("get_trainer_cls", _with_anchor_trainers)
    verl_api.patch("v1.get_trainer_cls", _with_anchor_trainers)


def _patch_legacy_trainer(ray_trainer: ModuleType) -> None:
    from verl_anchor.integration.legacy import patch_ray_trainer

    patch_ray_trainer()


def _patch_metric_utils(metric_utils: ModuleType) -> None:
    from verl_anchor.integration.legacy import patch_metric_utils

    patch_metric_utils()


def _register_cpu_mode(rollout: ModuleType | None = None) -> None:
    importlib.import_module("verl_anchor.integration.cpu")  # registers the platform and the hf rollout on import


def register() -> None:
    """Register everything with verl (the heavy parts on import of the verl module they patch). Idempotent."""
    from verl_anchor.integration import verl_api

    if os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu":
        _register_cpu_mode()  # first: importing verl's trainer resolves the platform
    else:
        _after_import(verl_api.PINS["rollout"].module, _register_cpu_mode)
    verl_api.patch("validate_config", _with_anchor_checks)
    verl_api.patch("auto_set_device", _with_entry_point_check)
    pins = verl_api.PINS
    _after_import(pins["register_adv_est"].module, _register_estimators)
    _after_import(pins["v1.get_trainer_cls"].module, _wrap_trainer_lookup)
    # metric_utils first: recipes (DAPO) import compute_data_metrics from it before they import ray_trainer.
    _after_import(pins["metric_utils.compute_data_metrics"].module, _patch_metric_utils)
    _after_import(pins["ray_trainer.compute_advantage"].module, _patch_legacy_trainer)


try:
    register()
except Exception:  # noqa: BLE001 - verl would hide it; make it loud instead
    logger.warning("verl_anchor failed to register with verl; anchor estimators are unavailable", exc_info=True)
