"""`verl-anchor train RECIPE`: prepare the recipe's data if missing, then start verl on it.

The recipe's data files live under `$VERL_ANCHOR_DATA` (default `~/data/verl_anchor`), one
directory per dataset name (`countdown/`, `dapo-math-17k/`, `aime24/`, ...). Missing ones
are prepared with `verl-anchor data NAME` (Countdown is generated; math sets come from the
hub, so a machine without network needs `verl-anchor data NAME --from PATH` first). The
exact command is printed before it runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from verl_anchor.data import DATASETS, prepare_countdown, prepare_math


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name in verl_anchor/recipes (e.g. countdown_qwen3_4b)")
    parser.add_argument("--dry-run", action="store_true", help="prepare data and print the command, do not run it")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. algorithm.adv_estimator=anchor_random")


def data_files(recipe: str, overrides: list[str]) -> list[Path]:
    """The train and validation files a composed recipe reads."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl_anchor.recipes", version_base=None):
        config = compose(config_name=recipe, overrides=overrides)
    files = []
    for key in ("train_files", "val_files"):
        value = OmegaConf.to_container(config.data, resolve=True)[key]
        files += [Path(v) for v in (value if isinstance(value, list) else [value])]
    return files


def ensure_data(files: list[Path]) -> None:
    """Prepare every missing file's dataset (named by its directory)."""
    for path in files:
        if path.exists():
            continue
        name = path.parent.name
        if name == "countdown":
            prepare_countdown(path.parent, train_size=20_000, test_size=512, seed=0)
        elif name in DATASETS:
            prepare_math(name, path.parent)
        else:
            raise FileNotFoundError(f"{path} is missing and {name!r} is not a dataset verl-anchor can prepare")
        if not path.exists():
            raise FileNotFoundError(f"preparing {name} did not produce {path}")


def run(args: argparse.Namespace) -> int:
    ensure_data(data_files(args.recipe, list(args.overrides)))
    command = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path=pkg://verl_anchor.recipes",
               f"--config-name={args.recipe}", *args.overrides]
    print("running:", shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(command, env=os.environ.copy())
