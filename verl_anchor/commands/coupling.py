"""`verl-anchor coupling`: the paper's Table 2 statistics of the preplan-and-anchor rhythm.

The options and the files written; the computation is `analysis.coupling`."""

from __future__ import annotations

import argparse
import dataclasses

from verl_anchor.analysis.common import Session, add_arguments, make_out, user_errors, write_json
from verl_anchor.analysis.coupling import MAX_SHUFFLES, PeakOptions, coupling_statistics, print_summary
from verl_anchor.usage import bounded_int


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, max_new_tokens=128)
    defaults = PeakOptions()
    parser.add_argument(
        "--peak-quantile",
        type=float,
        default=defaults.quantile,
        help="a peak is among this top share of a response's values",
    )
    parser.add_argument(
        "--peak-radius",
        type=int,
        default=defaults.radius,
        help="a peak is the largest value within this many positions on either side",
    )
    parser.add_argument(
        "--peak-window",
        type=int,
        default=defaults.window,
        help="peaks are ranked relative to the signal's mean within this many positions (0: raw)",
    )
    parser.add_argument(
        "--min-future",
        type=int,
        default=defaults.min_future,
        help="FAI is read only at positions followed by at least this many response tokens",
    )
    parser.add_argument(
        "--max-lag",
        type=int,
        default=defaults.max_lag,
        help="an FAI peak follows a WAAD peak when it is 0..max-lag tokens after it",
    )
    parser.add_argument(
        "--match-radius",
        type=int,
        default=defaults.match_radius,
        help="a receiver-head FAI peak co-occurs with a global one within this many tokens",
    )
    parser.add_argument(
        "--receivers", type=int, default=None, help="number of receiver heads (default: the size of the global group)"
    )
    parser.add_argument(
        "--shuffles",
        type=bounded_int(1, MAX_SHUFFLES, "the baselines' error is already tiny; more only takes longer"),
        default=defaults.shuffles,
        help=f"random placements for the baselines (at most {MAX_SHUFFLES})",
    )


@user_errors
def run(args: argparse.Namespace) -> int:
    options = PeakOptions(
        quantile=args.peak_quantile,
        radius=args.peak_radius,
        window=args.peak_window,
        min_future=args.min_future,
        max_lag=args.max_lag,
        match_radius=args.match_radius,
        receivers=args.receivers,
        shuffles=args.shuffles,
        seed=args.seed,
    )
    out = make_out(args)
    session = Session(args)
    responses = list(session.analyses("coupling"))
    result = {**session.meta(), "options": dataclasses.asdict(options), **coupling_statistics(responses, options)}
    write_json(result, out / "coupling.json")
    print_summary(result["summary"])
    print(f"wrote {out / 'coupling.json'}")
    return 0
