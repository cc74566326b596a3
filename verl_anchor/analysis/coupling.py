"""What `verl-anchor coupling` computes (`commands.coupling`):
the paper's Table 2 statistics of the preplan-and-anchor rhythm.

Over a set of prompts (one captured forward per response, see `common.Session`):

1. **Entropy at WAAD peaks**: the mean token entropy at WAAD peaks vs over all response tokens.
2. **FAI peaks follow WAAD peaks**: the share of FAI peaks that lie 0..`max_lag` tokens after a
   WAAD peak, vs the same share with the WAAD peaks moved to random positions (`shuffles` times).
3. **Receiver heads**: the heads whose per-token FAI is most heavy-tailed (highest kurtosis, averaged
   over responses; the "receiver heads" of Thought Anchors, Bogdan et al. 2025) find peaks of their
   own; the share of their FAI peaks within `match_radius` tokens of a global-head FAI peak, vs
   random global peak positions.

Peaks (`find_peaks`): a position is a peak of a signal when its value, taken relative to the
signal's mean within `window` positions, is among the top `quantile` of the response's values and
no value within `radius` positions is larger.
FAI peaks, receiver-head kurtosis and the shuffled FAI positions use only positions with at least
`min_future` later response tokens: in analysis mode the last tokens' FAI averages a handful of
queries and would dominate both. Writes `coupling.json` and prints a table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from verl_anchor.analysis.common import (
    ResponseAnalysis,
    check_options,
    floats,
    print_table,
)
from verl_anchor.core.config import ceil_count

MAX_SHUFFLES = 10_000  # random placements per baseline: its standard error shrinks as 1 / sqrt(shuffles)


@dataclasses.dataclass(frozen=True)
class PeakOptions:
    quantile: float = 0.2  # a peak is among the top 20% of the response's values ...
    radius: int = 1  # ... and the largest within 1 position on either side
    window: int = 20  # values are taken relative to their mean within 20 positions (0: raw values)
    min_future: int = 10  # FAI is read only where at least this many response tokens follow
    max_lag: int = 3  # an FAI peak "follows" a WAAD peak 0..3 tokens before it
    match_radius: int = 1  # a receiver peak "co-occurs" with a global peak within 1 token
    receivers: int | None = None  # receiver heads; None = as many as the global group
    shuffles: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        check_options(
            [
                ("peak-quantile", self.quantile, 0 < self.quantile <= 1, "a number in (0, 1]"),
                ("peak-radius", self.radius, self.radius >= 0, "an integer >= 0"),
                ("peak-window", self.window, self.window >= 0, "an integer >= 0 (0 = raw values)"),
                ("min-future", self.min_future, self.min_future >= 0, "an integer >= 0"),
                ("max-lag", self.max_lag, self.max_lag >= 0, "an integer >= 0"),
                ("match-radius", self.match_radius, self.match_radius >= 0, "an integer >= 0"),
                ("receivers", self.receivers, self.receivers is None or self.receivers >= 1, "an integer >= 1"),
                ("shuffles", self.shuffles, self.shuffles >= 1, "an integer >= 1"),
            ]
        )


# -- statistics (pure) ---------------------------------------------------------------------


def find_peaks(
    values: torch.Tensor, quantile: float, radius: int, eligible: torch.Tensor | None = None, window: int = 0
) -> torch.Tensor:
    """Peak positions of a 1-D signal (module doc), sorted.

    With `window > 0` each value is first taken relative to the mean of the usable values within
    `window` positions (a local baseline), so a slow trend along the response (WAAD grows with the
    context) does not decide where the peaks are. Of the m usable (defined, eligible) values, the
    `ceil(quantile * m)` largest are candidates (ties: the earlier position first, so a flat signal
    cannot make every position a peak); a candidate is a peak when no usable value within `radius`
    positions is larger.
    """
    values = values.double()
    usable = ~torch.isnan(values)
    if eligible is not None:
        usable &= eligible
    positions = usable.nonzero().flatten()
    if positions.numel() == 0:
        return positions
    if window > 0:
        values = values - local_mean(values, usable, window)
    k = max(1, ceil_count(quantile, positions.numel()))
    order = torch.sort(values[positions], descending=True, stable=True).indices[:k]
    radius = min(radius, values.numel())  # a radius past the ends sees the whole signal, as this one does
    masked = torch.where(usable, values, torch.full_like(values, -math.inf))
    padded = torch.nn.functional.pad(masked[None, None], (radius, radius), value=-math.inf)[0, 0]
    window_max = padded.unfold(0, 2 * radius + 1, 1).max(dim=1).values
    candidates = positions[order]
    return candidates[masked[candidates] >= window_max[candidates]].sort().values


def local_mean(values: torch.Tensor, usable: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of the usable `values` within `window` positions of each position (itself included)."""
    zeros = torch.zeros(1, dtype=torch.float64)
    sums = torch.cat([zeros, torch.where(usable, values.double(), 0.0).cumsum(0)])
    counts = torch.cat([zeros, usable.double().cumsum(0)])
    n = values.numel()
    lo = (torch.arange(n) - window).clamp(min=0)
    hi = (torch.arange(n) + window + 1).clamp(max=n)
    return (sums[hi] - sums[lo]) / (counts[hi] - counts[lo]).clamp(min=1)


def count_matched(targets: torch.Tensor, sources: torch.Tensor, lo: int, hi: int) -> int:
    """How many `targets` t have a source s with `lo <= t - s <= hi`."""
    if targets.numel() == 0 or sources.numel() == 0:
        return 0
    offset = targets[:, None] - sources[None, :]
    return int(((offset >= lo) & (offset <= hi)).any(dim=1).sum())


def shuffled_matched(
    targets: torch.Tensor,
    num_sources: int,
    positions: torch.Tensor,
    lo: int,
    hi: int,
    shuffles: int,
    generator: torch.Generator,
) -> float:
    """Mean `count_matched` when the `num_sources` sources sit at random distinct `positions`."""
    if targets.numel() == 0 or num_sources == 0:
        return 0.0
    total = 0
    for _ in range(shuffles):
        picked = positions[torch.randperm(positions.numel(), generator=generator)[:num_sources]]
        total += count_matched(targets, picked, lo, hi)
    return total / shuffles


def kurtosis(values: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis `E[(x - mean)^4] / var^2` of each row over its defined entries (NaN if < 2 or constant)."""
    values = values.double()
    defined = ~torch.isnan(values)
    count = defined.sum(dim=1)
    zeroed = torch.where(defined, values, torch.zeros_like(values))
    mean = zeroed.sum(dim=1) / count.clamp(min=1)
    dev = torch.where(defined, values - mean[:, None], torch.zeros_like(values))
    var = (dev**2).sum(dim=1) / count.clamp(min=1)
    result = (dev**4).sum(dim=1) / count.clamp(min=1) / var**2
    return torch.where((count >= 2) & (var > 0), result, torch.full_like(result, math.nan))


def receiver_heads(mean_kurtosis: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` heads of highest (mean) kurtosis, highest first; NaN ranks last, ties keep head order."""
    ranked = torch.where(torch.isnan(mean_kurtosis), torch.full_like(mean_kurtosis, -math.inf), mean_kurtosis)
    return torch.sort(ranked, descending=True, stable=True).indices[: min(count, ranked.numel())]


def coupling_statistics(responses: list[ResponseAnalysis], options: PeakOptions) -> dict[str, Any]:
    """Table 2's numbers from the analysed responses: `summary`, `receiver_heads` and `per_prompt` rows.

    Responses with no FAI-eligible position (at most `min_future` tokens) are left out and counted.
    """
    usable = [r for r in responses if len(r.token_ids) > options.min_future]
    summary: dict[str, Any] = {"prompts": len(responses), "prompts_used": len(usable)}
    if not usable:
        return {"summary": summary, "receiver_heads": [], "receiver_kurtosis": [], "per_prompt": []}
    horizon = [len(r.token_ids) - options.min_future for r in usable]  # FAI-eligible positions 0..horizon-1
    # Kurtosis per response, averaged over the responses where it is defined.
    mean_kurtosis = torch.stack([kurtosis(r.head.fai[:, :h]) for r, h in zip(usable, horizon)]).nanmean(dim=0)
    receivers = receiver_heads(mean_kurtosis, options.receivers or usable[0].global_heads.numel())
    generator = torch.Generator().manual_seed(options.seed)
    rows = [_response_row(r, h, receivers, options, generator) for r, h in zip(usable, horizon)]

    def share(hits: str, peaks: str) -> float | None:
        total = sum(len(row[peaks]) for row in rows)
        return sum(row[hits] for row in rows) / total if total else None

    waad_peaks = sum(len(row["waad_peaks"]) for row in rows)
    summary.update(
        {
            "mean_entropy": sum(row["entropy_sum"] for row in rows) / sum(row["tokens"] for row in rows),
            "mean_entropy_at_waad_peaks": sum(row["entropy_at_waad_peaks_sum"] for row in rows) / waad_peaks
            if waad_peaks
            else None,
            "fai_peaks_after_waad_peaks": share("fai_after_waad", "fai_peaks"),
            "fai_peaks_after_waad_peaks_shuffled": share("fai_after_waad_shuffled", "fai_peaks"),
            "receiver_peaks_at_global_peaks": share("receiver_at_global", "receiver_peaks"),
            "receiver_peaks_at_global_peaks_shuffled": share("receiver_at_global_shuffled", "receiver_peaks"),
            "receiver_heads_in_global_group": sum(row["receivers_in_global_group"] for row in rows) / len(rows),
            "global_group_share_of_heads": usable[0].global_heads.numel() / usable[0].head.span.numel(),
            "waad_peaks": waad_peaks,
            "fai_peaks": sum(len(row["fai_peaks"]) for row in rows),
            "receiver_peaks": sum(len(row["receiver_peaks"]) for row in rows),
        }
    )
    return {
        "summary": summary,
        "receiver_heads": receivers.tolist(),
        "receiver_kurtosis": floats(mean_kurtosis),
        "per_prompt": rows,
    }


def _response_row(
    r: ResponseAnalysis, horizon: int, receivers: torch.Tensor, options: PeakOptions, generator: torch.Generator
) -> dict[str, Any]:
    """One response's peaks and matched counts (observed and expected under shuffling)."""
    n = len(r.token_ids)
    eligible = torch.arange(n) < horizon
    peak_options = (options.quantile, options.radius)
    waad_peaks = find_peaks(r.signals.waad, *peak_options, window=options.window)
    fai_peaks = find_peaks(r.signals.fai, *peak_options, eligible, window=options.window)
    receiver_peaks = find_peaks(r.head.fai[receivers].mean(dim=0), *peak_options, eligible, window=options.window)
    lag, radius, shuffles = options.max_lag, options.match_radius, options.shuffles
    return {
        "index": r.index,
        "tokens": n,
        "entropy_sum": float(r.entropy.double().sum()),
        "entropy_at_waad_peaks_sum": float(r.entropy.double()[waad_peaks].sum()),
        "waad_peaks": waad_peaks.tolist(),
        "fai_peaks": fai_peaks.tolist(),
        "receiver_peaks": receiver_peaks.tolist(),
        "fai_after_waad": count_matched(fai_peaks, waad_peaks, 0, lag),
        "fai_after_waad_shuffled": shuffled_matched(
            fai_peaks, waad_peaks.numel(), torch.arange(n), 0, lag, shuffles, generator
        ),
        "receiver_at_global": count_matched(receiver_peaks, fai_peaks, -radius, radius),
        "receiver_at_global_shuffled": shuffled_matched(
            receiver_peaks, fai_peaks.numel(), torch.arange(horizon), -radius, radius, shuffles, generator
        ),
        "receivers_in_global_group": len(set(receivers.tolist()) & set(r.global_heads.tolist())) / receivers.numel(),
    }


def print_summary(summary: dict[str, Any]) -> None:
    print_table(
        f"coupling over {summary['prompts_used']} of {summary['prompts']} responses",
        ["statistic", "observed", "baseline"],
        [
            [
                "mean entropy at WAAD peaks (baseline: all tokens)",
                summary.get("mean_entropy_at_waad_peaks"),
                summary.get("mean_entropy"),
            ],
            [
                "FAI peaks at/after a WAAD peak (baseline: shuffled WAAD peaks)",
                summary.get("fai_peaks_after_waad_peaks"),
                summary.get("fai_peaks_after_waad_peaks_shuffled"),
            ],
            [
                "receiver-head FAI peaks at a global-head FAI peak (baseline: shuffled)",
                summary.get("receiver_peaks_at_global_peaks"),
                summary.get("receiver_peaks_at_global_peaks_shuffled"),
            ],
            [
                "receiver heads in the global group (baseline: its share of heads)",
                summary.get("receiver_heads_in_global_group"),
                summary.get("global_group_share_of_heads"),
            ],
        ],
    )
