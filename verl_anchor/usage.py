"""Command-line input checks shared by the `verl-anchor` sub-commands.

`UsageError` is the one exception type that `verl_anchor.cli.main` reports as a single
``error: ...`` line with exit code 2 (the sub-commands' own input errors subclass it); anything
else is a bug and keeps its traceback. The ``argparse`` types below check paths and seeds while
the command line is parsed, before any model is loaded or data is generated. Numbers are finite and
bounded: an `inf`, a `nan` or a size no machine can hold is refused here, not hours later.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

# Largest accepted seed: a command adds the prompt index to it, and the sum must still fit the
# 64-bit seeds of torch and numpy.
MAX_SEED = 2**63 - 1
# Largest value a parquet int64 column (Countdown's numbers and targets) holds.
MAX_INT64 = 2**63 - 1
# Sampling temperatures (0 = greedy): below the minimum sampling is greedy in all but name and the
# scaled logits can overflow (1e-45 makes transformers' sampler fail); above the maximum every token
# is about equally likely (inf: exactly uniform), i.e. noise, not the model.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


class UsageError(ValueError):
    """Bad input from the command line (the message names it and what to do)."""


def one_line(message: object) -> str:
    """``message`` on one line (library errors, e.g. hydra's, span several)."""
    return " ".join(str(message).split())


def out_dir(value: str) -> Path:
    """An output directory: existing, or creatable (no file in the way); not an empty string."""
    path = Path(_not_empty(value)).expanduser()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is an existing file" if existing == path else f"is inside {existing}, which is a file"
                raise argparse.ArgumentTypeError(f"{value} {where}, not a directory")
            break
    return path


def in_path(value: str) -> Path:
    """An input path (not checked here: each command says what it expects there); not an empty string."""
    return Path(_not_empty(value)).expanduser()


def _not_empty(value: str) -> str:
    # Path("") is the current directory: an empty option (an unset shell variable) must not mean it.
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is empty: give a path")
    return value


def make_dir(path: Path, error: type[UsageError] = UsageError) -> Path:
    """Create the output directory ``path`` (and its parents) if needed; ``error`` naming it when that is
    impossible (a file in the way, no permission, a read-only or virtual file system)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(f"cannot create the output directory {path}: {err.strerror or err}") from None
    return path


def bounded_int(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer from ``minimum`` to ``maximum`` (None: no upper bound); ``why`` says
    what the upper bound protects, in the refusal."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid: use an integer >= {minimum}")
        if maximum is not None and number > maximum:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(
                f"{value} is too large: use an integer from {minimum} to {maximum}{reason}"
            )
        return number

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


positive_int = bounded_int(1)  # a count of steps, prompts, ...


def temperature(value: str) -> float:
    """A sampling temperature: 0 (greedy), or a finite number from `MIN_TEMPERATURE` to `MAX_TEMPERATURE`."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number != 0 and not (math.isfinite(number) and MIN_TEMPERATURE <= number <= MAX_TEMPERATURE):
        raise argparse.ArgumentTypeError(
            f"{value} is invalid: use 0 (greedy) or a number from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}"
        )
    return number


def layer_list(value: str) -> tuple[int, ...]:
    """Layer indices, comma-separated and 0-based (``3,7``): at least one, each an integer >= 0, no repeats."""
    parts = [part.strip() for part in value.split(",")]
    if not value.strip() or any(not part for part in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is invalid: give comma-separated 0-based layer indices, e.g. 3,7")
    layers = []
    for part in parts:
        try:
            layer = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} in {value!r} is not an integer: give comma-separated 0-based layer indices, e.g. 3,7"
            ) from None
        if layer < 0:
            raise argparse.ArgumentTypeError(f"{layer} in {value!r} is invalid: layer indices are 0-based (>= 0)")
        if layer in layers:
            raise argparse.ArgumentTypeError(f"{value!r} lists layer {layer} twice: list each layer once")
        layers.append(layer)
    return tuple(layers)


def seed(value: str) -> int:
    """A seed: an integer from 0 to `MAX_SEED`."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if not 0 <= number <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use an integer from 0 to {MAX_SEED}")
    return number


def model_ref(value: str) -> str:
    """A Hugging Face model: a local directory with a ``config.json``, or a hub id (``namespace/name``)."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{value} is a file, not a model directory")
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{value} is not a Hugging Face model directory (it has no config.json)")
    elif path.is_absolute() or value.startswith((".", "~")) or value.count("/") > 1:  # cannot be a hub id
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return value
