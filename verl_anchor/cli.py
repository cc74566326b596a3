"""`verl-anchor` command line: one sub-command per job, each implemented in its own module.

Only the chosen sub-command's module is imported, so `verl-anchor --help` stays fast and a
heavy dependency (verl, ray) is loaded only by the command that needs it.

Errors: bad input (a `UsageError`, argparse's complaints included) is printed as one
``error: ...`` line on stderr with exit code 2; any other exception is a bug and keeps its traceback.

Noise: the libraries the commands import (verl, ray, transformers, ...) warn at import time about
things that are not the user's business (accelerators and engines this machine lacks, deprecations)
and draw their own progress bars. In this process (not in the verl run `train` starts) their
warnings and their log records below ERROR are dropped, so a refused command prints exactly its
one ``error:`` line; verl-anchor's own log records and progress bars stay.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import warnings
from typing import NoReturn

from verl_anchor.usage import UsageError, one_line

# name -> (module, one-line help). Each module provides `configure_parser(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "verl_anchor.commands.demo",
        "run a few GRPO steps with anchor_coupled through real verl on CPU (no downloads)",
    ),
    "data": ("verl_anchor.commands.data", "prepare a dataset in verl's parquet schema"),
    "analyze": (
        "verl_anchor.commands.analyze",
        "per-token WAAD / FAI / entropy and attention maps of a model's responses as an HTML report",
    ),
    "coupling": (
        "verl_anchor.commands.coupling",
        "the paper's Table 2: entropy at WAAD peaks, FAI peaks after WAAD peaks, receiver heads",
    ),
    "perturb": (
        "verl_anchor.commands.perturb",
        "the paper's Table 1: how much forcing another token at high- vs low-FAI positions changes the rest",
    ),
    "train": ("verl_anchor.commands.train", "run a recipe of the paper with verl (prepares missing data first)"),
    "compare": (
        "verl_anchor.commands.compare",
        "estimators x seeds through verl on CPU from the trained Countdown policy: held-out accuracy table and plot",
    ),
    "policy": (
        "verl_anchor.commands.policy",
        "the shipped Countdown policy: its accuracy, measured again, or trained anew",
    ),
}


# Commands that load a model with transformers (whose progress bars and notices are dropped).
_MODEL_COMMANDS = {"analyze", "coupling", "perturb", "demo", "compare", "policy"}
# Warnings the imported libraries raise that say nothing about the user's input.
_LIBRARIES = r"(verl|ray|torch|transformers|datasets|huggingface_hub|hydra|omegaconf|pyarrow|tensordict|pydantic)(\.|$)"


class _LibraryNoise(logging.Filter):
    """Drop library log records below ERROR; keep verl-anchor's own (and anything at ERROR or above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".", 1)[0] in ("verl_anchor", "__main__")


def _quiet_libraries(command: str | None) -> None:
    """Silence the imported libraries' warnings, log records and progress bars (see the module docstring)."""
    if not sys.warnoptions:  # `python -W ...` / PYTHONWARNINGS choose for themselves
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", module=_LIBRARIES)
        # verl's need_critic warns with stacklevel=2, i.e. as if from its caller (verl_anchor.integration.compose).
        warnings.filterwarnings("ignore", message="Disabled critic as algorithm.adv_estimator")
    if not logging.root.handlers:
        # Installed before verl is imported, so verl's `logging.basicConfig` (a WARNING handler on the
        # root logger that prints e.g. "No supported accelerator detected") finds one and adds none.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
        handler.addFilter(_LibraryNoise())
        logging.root.addHandler(handler)
        logging.root.setLevel(logging.WARNING)
    if command in _MODEL_COMMANDS:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


class _Parser(argparse.ArgumentParser):
    """argparse (sub-commands included) that raises `UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    """Run `verl-anchor` with ``argv``; the exit code (2 and one ``error:`` line on bad input)."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except UsageError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a verl run (a run handles its own signals: cpu.launch)
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(argv: list[str]) -> int:
    parser = _Parser(prog="verl-anchor", description="Attention-guided credit assignment for verl.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    if chosen is not None:
        _quiet_libraries(chosen)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure_parser(sub_parser)
    # Hydra overrides may follow options (`train RECIPE --dry-run key=value`), which argparse's
    # positional matching does not take: hand the leftovers to commands that accept overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
