"""`verl-anchor perturb`: the paper's Table 1, do high-FAI tokens steer the rest of the reasoning?.

The options and the files written; the computation is `analysis.perturb`."""

from __future__ import annotations

import argparse

from verl_anchor.analysis.common import Session, add_arguments, make_out, user_errors, write_json
from verl_anchor.analysis.perturb import MAX_CANDIDATES, perturb_response, print_summary, summarise
from verl_anchor.usage import bounded_int, positive_int


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, max_new_tokens=128)
    parser.add_argument("--positions", type=positive_int, default=3, help="high- and low-FAI positions per response")
    parser.add_argument(
        "--candidates",
        type=bounded_int(1, MAX_CANDIDATES, "each is one more sequence in every position's batched generation"),
        default=3,
        help=f"alternative tokens forced at each position (at most {MAX_CANDIDATES})",
    )
    parser.add_argument(
        "--continuation-tokens", type=positive_int, default=64, help="greedy tokens after each forced token"
    )
    parser.add_argument(
        "--min-future",
        type=bounded_int(0),
        default=10,
        help="positions need at least this many response tokens after them",
    )


@user_errors
def run(args: argparse.Namespace) -> int:
    out = make_out(args)
    # Keep a few more candidates than asked: the response's own token and end/pad tokens are skipped.
    session = Session(args, candidates=args.candidates + 3)
    problems = [perturb_response(session, analysis, args) for analysis in session.analyses("perturb")]
    summary = summarise(problems)
    write_json(
        {
            **session.meta(),
            "options": {k: getattr(args, k) for k in ("positions", "candidates", "continuation_tokens", "min_future")},
            "summary": summary,
            "problems": problems,
        },
        out / "perturb.json",
    )
    print_summary(summary)
    print(f"wrote {out / 'perturb.json'}")
    return 0
