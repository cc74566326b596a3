"""`verl-anchor` command line: one sub-command per job, each implemented in its own module.

Only the chosen sub-command's module is imported, so `verl-anchor --help` stays fast and a
heavy dependency (verl, ray) is loaded only by the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module provides `configure_parser(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("verl_anchor.demo", "run a few GRPO steps with anchor_coupled through real verl on CPU (no downloads)"),
    "data": ("verl_anchor.data", "prepare a dataset in verl's parquet schema"),
    "analyze": ("verl_anchor.analysis.report",
                "per-token WAAD / FAI / entropy and attention maps of a model's responses as an HTML report"),
    "coupling": ("verl_anchor.analysis.coupling",
                 "the paper's Table 2: entropy at WAAD peaks, FAI peaks after WAAD peaks, receiver heads"),
    "perturb": ("verl_anchor.analysis.perturb",
                "the paper's Table 1: how much forcing another token at high- vs low-FAI positions changes the rest"),
    "train": ("verl_anchor.launch", "run a recipe of the paper with verl (prepares missing data first)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="verl-anchor", description="Attention-guided credit assignment for verl.")
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
