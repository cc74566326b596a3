"""`verl-anchor data NAME --out DIR`: prepare one dataset (see `verl_anchor.data`)."""

from __future__ import annotations

import argparse

from verl_anchor.data.countdown import MAX_COUNT, MAX_PROBLEMS, prepare_countdown
from verl_anchor.data.math_sets import DATASETS, HubUnavailable, prepare_math
from verl_anchor.usage import MAX_INT64, UsageError, bounded_int, in_path, out_dir, seed

_SIZE = bounded_int(0, MAX_PROBLEMS, "the problems are held in memory, about 3 GB per million")
_COUNT = bounded_int(2, MAX_COUNT, "larger sets almost never reach a target")
_VALUE = bounded_int(1, MAX_INT64, "parquet stores them as int64")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `verl-anchor data`."""
    parser.add_argument("name", choices=["countdown", *DATASETS], help="dataset to prepare")
    parser.add_argument("--out", type=out_dir, required=True, help="output directory for train.parquet / test.parquet")
    parser.add_argument(
        "--from",
        dest="from_path",
        type=in_path,
        help="read a math set from this parquet/json/jsonl/csv file or directory (default: the Hugging Face hub)",
    )
    parser.add_argument(
        "--split", choices=["train", "test"], help="prepare only this split (needed for gsm8k --from a single file)"
    )
    group = parser.add_argument_group("countdown")
    group.add_argument("--seed", type=seed, default=0, help="generator seed (default 0)")
    group.add_argument(
        "--train-size",
        type=_SIZE,
        default=20_000,
        help=f"train problems (default 20000; train + test at most {MAX_PROBLEMS})",
    )
    group.add_argument("--test-size", type=_SIZE, default=512, help="test problems (default 512)")
    group.add_argument("--min-numbers", type=_COUNT, default=3, help="fewest numbers per problem (default 3)")
    group.add_argument(
        "--max-numbers", type=_COUNT, default=4, help=f"most numbers per problem (default 4, at most {MAX_COUNT})"
    )
    group.add_argument("--max-target", type=_VALUE, default=1000, help="largest target (default 1000)")
    group.add_argument("--max-number", type=_VALUE, default=100, help="largest number (default 100)")
    group.add_argument(
        "--prompt-style",
        choices=["tinyzero", "short"],
        default="tinyzero",
        help="TinyZero's instruction (the recipes') or the short one of the CPU demo policy",
    )


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset; bad input raises a `UsageError` subclass (`DataError`), which the CLI reports."""
    if args.name != "countdown":
        try:
            prepare_math(args.name, args.out, args.from_path, args.split)
        except HubUnavailable as exc:
            raise UsageError(f"{exc}. Offline, download it elsewhere and pass --from PATH") from exc
        return 0
    if args.from_path is not None:
        raise UsageError("countdown is generated locally; --from does not apply")
    if args.split is not None and getattr(args, f"{args.split}_size") == 0:
        raise UsageError(f"countdown: nothing to write: --split {args.split} with --{args.split}-size 0")
    prepare_countdown(
        args.out,
        train_size=0 if args.split == "test" else args.train_size,
        test_size=0 if args.split == "train" else args.test_size,
        seed=args.seed,
        min_numbers=args.min_numbers,
        max_numbers=args.max_numbers,
        max_target=args.max_target,
        max_number=args.max_number,
        prompt_style=args.prompt_style,
    )
    return 0
