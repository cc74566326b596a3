"""What `verl-anchor perturb` computes (`commands.perturb`):
the paper's Table 1, do high-FAI tokens steer the rest of the reasoning?

For each prompt (see `common.Session`; responses sampled at `--temperature`, default 0.7): take
the `--positions` response positions of highest FAI and the `--positions` of lowest FAI among the
positions followed by at least `--min-future` response tokens. At each such position t:

* the reference continuation: the response up to and including its own token at t, continued
  greedily for `--continuation-tokens` tokens;
* for each of the `--candidates` most likely tokens at t (other than the response's own token and
  the end/padding tokens): the response up to t with that token forced at t, continued greedily;
* the content-word Jaccard similarity of each perturbed continuation with the reference one.

All continuations of one position share one batched `generate` call. Reported: the mean Jaccard
at high- and at low-FAI positions (each problem's mean, averaged over problems) and the share of
problems where high < low, i.e. perturbing anchors changes the continuation more. Writes
`perturb.json` (every trial with its texts) and prints a table.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from verl_anchor.analysis.common import (
    ResponseAnalysis,
    Session,
    print_table,
)

# Candidates beyond this would make each position's batched generation vocabulary-sized.
MAX_CANDIDATES = 100

# Function words carry no content; numbers do (they are the reasoning in math problems).
STOP_WORDS = frozenset(
    """
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just let lets me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves s t
""".split()
)

_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")


def content_words(text: str) -> set[str]:
    """Lower-cased words and numbers of `text`, without stop words."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def fai_positions(fai: torch.Tensor, min_future: int, count: int) -> tuple[list[int], list[int]]:
    """The `count` highest- and `count` lowest-FAI positions with at least `min_future` tokens after them.

    Disjoint: with fewer than `2 * count` eligible positions each side gets half. Ties keep position order.
    """
    n = fai.numel()
    eligible = [t for t in range(max(0, n - min_future)) if not torch.isnan(fai[t])]
    count = min(count, len(eligible) // 2)
    if count == 0:
        return [], []
    ranked = sorted(eligible, key=lambda t: -float(fai[t]))  # sorted() is stable
    return ranked[:count], ranked[-count:]


def perturb_response(session: Session, r: ResponseAnalysis, args: argparse.Namespace) -> dict[str, Any]:
    """Every trial of one response (module doc) and its mean Jaccard at high- and low-FAI positions."""
    high, low = fai_positions(r.signals.fai, args.min_future, args.positions)
    skip = {session.tokenizer.eos_token_id, session.tokenizer.pad_token_id}
    trials = []
    for group, positions in (("high", high), ("low", low)):
        for t in positions:
            own = r.token_ids[t]
            forced = [c for c in r.candidates[t].tolist() if c != own and c not in skip][: args.candidates]
            prefix = r.prompt_ids + r.token_ids[:t]
            runs = session.generate([prefix + [c] for c in [own] + forced], args.continuation_tokens, 0.0, args.seed)
            texts = [session.tokenizer.decode(run, skip_special_tokens=True) for run in runs]
            reference = content_words(texts[0])
            for token, text in zip(forced, texts[1:]):
                trials.append(
                    {
                        "group": group,
                        "position": t,
                        "fai": float(r.signals.fai[t]),
                        "token_id": own,
                        "token": session.tokenizer.decode([own]),
                        "forced_id": token,
                        "forced": session.tokenizer.decode([token]),
                        "reference": texts[0],
                        "continuation": text,
                        "jaccard": jaccard(reference, content_words(text)),
                    }
                )
    means = {}
    for group in ("high", "low"):
        values = [trial["jaccard"] for trial in trials if trial["group"] == group]
        means[group] = sum(values) / len(values) if values else None
    return {
        "index": r.index,
        "tokens": len(r.token_ids),
        "high_positions": high,
        "low_positions": low,
        "jaccard_high": means["high"],
        "jaccard_low": means["low"],
        "trials": trials,
    }


def summarise(problems: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over problems of each problem's mean Jaccard, and the share of problems with high < low."""
    both = [p for p in problems if p["jaccard_high"] is not None and p["jaccard_low"] is not None]
    if not both:
        return {
            "problems": len(problems),
            "problems_used": 0,
            "jaccard_high": None,
            "jaccard_low": None,
            "share_high_below_low": None,
        }
    return {
        "problems": len(problems),
        "problems_used": len(both),
        "jaccard_high": sum(p["jaccard_high"] for p in both) / len(both),
        "jaccard_low": sum(p["jaccard_low"] for p in both) / len(both),
        "share_high_below_low": sum(p["jaccard_high"] < p["jaccard_low"] for p in both) / len(both),
    }


def print_summary(summary: dict[str, Any]) -> None:
    print_table(
        f"perturbation over {summary['problems_used']} of {summary['problems']} responses",
        ["statistic", "value"],
        [
            ["mean content-word Jaccard, high-FAI positions", summary["jaccard_high"]],
            ["mean content-word Jaccard, low-FAI positions", summary["jaccard_low"]],
            ["share of problems where high < low", summary["share_high_below_low"]],
        ],
    )
