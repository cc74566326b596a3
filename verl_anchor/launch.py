"""`verl-anchor train RECIPE`: check the composed config, prepare the recipe's missing data, then start verl.

Order: compose the recipe with the overrides, run verl's `validate_config` (as `main_ppo` does)
and the anchor checks (`read_settings`) on it, and only then prepare data and start verl, so a
bad option costs seconds, not a data build or a Ray start. `--dry-run` stops before starting
verl and prints the command. `check_main_ppo` is the same check for a plain `main_ppo` command
line (verl's own config plus overrides): `demo` and `compare` run it before they build anything.

The recipe's data files live under `$VERL_ANCHOR_DATA` (default `~/data/verl_anchor`), one
directory per dataset name (`countdown/`, `dapo-math-17k/`, `aime24/`, ...). Missing ones
are prepared as `verl-anchor data NAME` would (Countdown is generated; math sets come from the
hub, so a machine without network needs `verl-anchor data NAME --from PATH --out DIR` first).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from verl_anchor.data import DATASETS, HubUnavailable, prepare_countdown, prepare_math
from verl_anchor.usage import UsageError, make_dir

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


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name in verl_anchor/recipes (e.g. countdown_qwen3_4b)")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the config, prepare data and print the command; do not run it"
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. algorithm.adv_estimator=anchor_random")


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


def data_files(config: Any) -> list[Path]:
    """The train and validation files a composed recipe reads."""
    files = []
    for key in ("train_files", "val_files"):
        value = config.data[key]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, Sequence) or not all(isinstance(v, str) and v for v in values):
            raise UsageError(f"invalid config: data.{key}={value!r} must be a path or a list of paths")
        files += [Path(v) for v in values]
    return files


def ensure_data(files: list[Path]) -> None:
    """Prepare every missing file's dataset (named by its directory)."""
    for path in files:
        if path.exists():
            continue
        name = path.parent.name
        if name == "countdown" or name in DATASETS:
            try:
                make_dir(path.parent)
            except UsageError as err:
                raise UsageError(
                    f"{err}; set $VERL_ANCHOR_DATA (or data.train_files / data.val_files) to a writable place"
                ) from None
        if name == "countdown":
            prepare_countdown(path.parent, train_size=20_000, test_size=512, seed=0)
        elif name in DATASETS:
            try:
                prepare_math(name, path.parent)
            except HubUnavailable as exc:
                raise UsageError(
                    f"{exc}. Offline, prepare it first: verl-anchor data {name} --from PATH --out {path.parent}"
                ) from exc
        else:
            raise UsageError(
                f"{path} is missing and {name!r} is not a dataset verl-anchor can prepare "
                f"(countdown, {', '.join(DATASETS)})"
            )
        if not path.exists():
            raise UsageError(f"preparing {name} did not produce {path}")


def run(args: argparse.Namespace) -> int:
    if os.environ.get("VERL_ANCHOR_DATA", None) is not None and not os.environ["VERL_ANCHOR_DATA"].strip():
        # The recipes would read `/countdown/train.parquet` (and write it there if missing).
        raise UsageError(
            "$VERL_ANCHOR_DATA is set but empty: unset it (the default is ~/data/verl_anchor) or set it to a directory"
        )
    config = compose_recipe(args.recipe, list(args.overrides))
    validate(config)
    ensure_data(data_files(config))
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-path=pkg://verl_anchor.recipes",
        f"--config-name={args.recipe}",
        *args.overrides,
    ]
    print("running:", shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(command, env=os.environ.copy())
