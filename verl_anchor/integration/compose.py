"""Compose verl configs as verl's entry point would, and check them before anything is built.

`compose_recipe(recipe, overrides)`: one of the shipped recipes (`pkg://verl_anchor.recipes`);
`check_main_ppo(overrides)`: verl's own `ppo_trainer` config plus overrides, as `python -m
verl.trainer.main_ppo OVERRIDES` composes it. Both go through `validate`: verl's `validate_config`
as `main_ppo` calls it, then the anchor checks (`settings.read_settings`), so a bad option costs
seconds, not a data build, a model load or a Ray start. Errors are `UsageError`s naming the override.
"""

from __future__ import annotations

from typing import Any

from verl_anchor.usage import UsageError

# The recipes' base config, not a recipe of its own.
_BASE_CONFIG = "anchor_base"
# Where `verl.trainer.main_ppo` (config_path="config" beside it) finds its `ppo_trainer` config.
_MAIN_PPO_CONFIG = "verl.trainer.config"


def recipe_names() -> list[str]:
    """The shipped recipes, as hydra finds them in `pkg://verl_anchor.recipes`."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl_anchor.recipes", version_base=None):
        names = GlobalHydra.instance().config_loader().get_group_options("", results_filter=ObjectType.CONFIG)
    return sorted(name for name in names if name != _BASE_CONFIG and not name.startswith("_"))  # hydra's own


def compose_recipe(recipe: str, overrides: list[str]) -> Any:
    """The recipe composed with ``overrides`` and resolved; `UsageError` for an unknown recipe or a bad override."""
    if recipe not in recipe_names():
        raise UsageError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_names())}")
    return _compose("verl_anchor.recipes", recipe, overrides, f"recipe {recipe} with overrides {overrides}")


def check_main_ppo(overrides: list[str]) -> Any:
    """The config `python -m verl.trainer.main_ppo OVERRIDES` runs with (verl's own `ppo_trainer`), composed
    and checked as `train` checks a recipe (`validate`); `UsageError` naming the bad override or value.

    Cheap: hydra and the checks only (no Ray, no model, no data; 1-2 s, docs/usage.md), so `demo` and
    `compare` run it before they build or train anything.
    """
    config = _compose(_MAIN_PPO_CONFIG, "ppo_trainer", overrides, "verl's main_ppo config")
    validate(config)
    return config


def _compose(config_module: str, config_name: str, overrides: list[str], what: str) -> Any:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=config_module, version_base=None):
            config = compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(config)
    except (HydraException, OmegaConfBaseException) as err:
        # hydra's message names the override ("Could not override 'nonsense.key'", "Error parsing override").
        raise UsageError(f"{what}: {err}") from err
    return config


def validate(config: Any) -> None:
    """verl's `validate_config` as `main_ppo` calls it, then the anchor checks; `UsageError` naming the problem."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from verl_anchor.integration.settings import prepare_config
    from verl_anchor.integration.verl_api import need_critic, need_reference_policy, validate_config

    _check_anchor_types(config)
    try:
        if not getattr(validate_config, "_verl_anchor", False):  # the plugin's wrapper runs prepare_config itself
            prepare_config(config)
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    # verl's checks are assertions and ValueErrors about the config's values; a value of the wrong
    # type (a list where a number belongs) surfaces as a TypeError; a model config verl cannot build
    # (a critic.model.path that is no model) as hydra's InstantiationException.
    except (AssertionError, ValueError, TypeError, OmegaConfBaseException, HydraException) as err:
        raise UsageError(f"invalid config: {err}") from err


def _check_anchor_types(config: Any) -> None:
    """`algorithm.anchor` is a mapping and its ``base_estimator`` a name (the checks below assume both)."""
    from omegaconf import DictConfig

    block = config.algorithm.get("anchor", None)
    if block is None:
        return
    if not isinstance(block, DictConfig):
        raise UsageError(
            f"invalid config: algorithm.anchor={block!r} must be a mapping of anchor options "
            "(set single options, e.g. +algorithm.anchor.ratio=0.2)"
        )
    base = block.get("base_estimator", None)
    if base is not None and not isinstance(base, str):
        raise UsageError(
            f"invalid config: algorithm.anchor.base_estimator={base!r} must be an estimator name "
            "such as grpo, gae, rloo or reinforce_plus_plus"
        )
