"""`verl-anchor train RECIPE`: check the composed config, prepare the recipe's missing data, then start verl.

Order: compose the recipe with the overrides, run verl's `validate_config` (as `main_ppo` does)
and the anchor checks (`read_settings`) on it, and only then prepare data and start verl, so a
bad option costs seconds, not a data build or a Ray start. `--dry-run` stops before starting
verl and prints the command (the composing and checking: `integration.compose`).

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
from verl_anchor.integration.compose import compose_recipe, validate
from verl_anchor.usage import UsageError, make_dir


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name in verl_anchor/recipes (e.g. countdown_qwen3_4b)")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the config, prepare data and print the command; do not run it"
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. algorithm.adv_estimator=anchor_random")


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
