"""`verl-anchor` command line: one sub-command per job, each implemented in its own module.

Only the chosen sub-command's module is imported, so `verl-anchor --help` stays fast and a
heavy dependency (verl, ray) is loaded only by the command that needs it.

Errors: bad input (a `UsageError`, argparse's complaints included) is printed as one
``error: ...`` line on stderr with exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from verl_anchor.usage import UsageError, one_line

# name -> (module, one-line help). Each module provides `configure_parser(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("verl_anchor.demo", "run a few GRPO steps with anchor_coupled through real verl on CPU (no downloads)"),
    "data": ("verl_anchor.data.cli", "prepare a dataset in verl's parquet schema"),
    "analyze": ("verl_anchor.analysis.report",
                "per-token WAAD / FAI / entropy and attention maps of a model's responses as an HTML report"),
    "coupling": ("verl_anchor.analysis.coupling",
                 "the paper's Table 2: entropy at WAAD peaks, FAI peaks after WAAD peaks, receiver heads"),
    "perturb": ("verl_anchor.analysis.perturb",
                "the paper's Table 1: how much forcing another token at high- vs low-FAI positions changes the rest"),
    "train": ("verl_anchor.launch", "run a recipe of the paper with verl (prepares missing data first)"),
}


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


def _run(argv: list[str]) -> int:
    parser = _Parser(prog="verl-anchor", description="Attention-guided credit assignment for verl.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
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
