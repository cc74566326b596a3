"""`verl-anchor analyze`: per-token WAAD / FAI / entropy of a model's own responses, as a report.

The options and the files written; the computation is `analysis.report`."""

from __future__ import annotations

import argparse

from verl_anchor.analysis.common import Session, add_arguments, check_options, make_out, user_errors, write_json
from verl_anchor.analysis.report import plot_attention_maps, plot_curves, render_html, write_csv


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument(
        "--map-bins",
        type=int,
        default=256,
        help="attention maps pool the response into at most this many rows and columns",
    )


@user_errors
def run(args: argparse.Namespace) -> int:
    check_options([("map-bins", args.map_bins, args.map_bins >= 1, "an integer >= 1")])
    out = make_out(args)
    session = Session(args, map_bins=args.map_bins)
    results = []
    for analysis in session.analyses("analyze"):
        result = analysis.summary()
        result["response"] = session.tokenizer.decode(analysis.token_ids)
        results.append(result)
        plot_curves(result, out / f"curves_{analysis.index}.png")
        plot_attention_maps(analysis, out / f"attention_{analysis.index}.png")
    payload = {**session.meta(), "demo": bool(args.demo), "prompts": results}
    write_json(payload, out / "metrics.json")
    write_csv(results, out / "tokens.csv")
    (out / "report.html").write_text(render_html(payload, out), encoding="utf-8")
    print(
        f"wrote {out / 'report.html'}, metrics.json, tokens.csv, curves_*.png and attention_*.png "
        f"for {len(results)} prompt(s)"
    )
    return 0
