"""`verl-anchor coupling` (Table 2): peaks, matching, baselines and kurtosis on hand-made signals,
the statistics on a hand-made response, and the command on the demo model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from verl_anchor.analysis.common import AnalysisError, ResponseAnalysis, demo_prompts
from verl_anchor.analysis.coupling import (
    PeakOptions,
    count_matched,
    coupling_statistics,
    find_peaks,
    kurtosis,
    local_mean,
    receiver_heads,
    shuffled_matched,
)
from verl_anchor.cli import main
from verl_anchor.core.metrics import GroupSignals, HeadStats

NAN = math.nan


def test_find_peaks_quantile_radius_eligibility_and_ties():
    v = torch.tensor([0.0, 3, 1, 5, 4.5, 2, NAN, 9, 1])
    # 8 defined values, top half = 9, 5, 4.5, 3; 4.5 is beaten by its neighbour 5.
    assert find_peaks(v, 0.5, 1).tolist() == [1, 3, 7]
    assert find_peaks(v, 0.5, 0).tolist() == [1, 3, 4, 7]  # radius 0: every top value is a peak
    assert find_peaks(v, 0.25, 1).tolist() == [3, 7]
    assert find_peaks(v, 0.2, 1, eligible=torch.arange(9) < 6).tolist() == [3]  # 9 is not eligible
    assert find_peaks(torch.ones(10), 0.3, 1).tolist() == [0, 1, 2]  # flat: at most ceil(q*m), earliest first
    assert find_peaks(torch.full((4,), NAN), 0.5, 1).tolist() == []


def test_find_peaks_wide_radius():
    v = torch.tensor([0.0, 3, 1, 5, 4.5, 2, NAN, 9, 1])
    # Radius 3: 5 at position 3 sees nothing larger in 0..6 (9 is 4 away); 3 at position 1 sees the 5.
    assert find_peaks(v, 0.5, 3).tolist() == [3, 7]


def test_local_mean_skips_unusable_positions():
    v = torch.tensor([1.0, 2, NAN, 4, 100])
    usable = torch.tensor([True, True, False, True, False])
    assert local_mean(v, usable, 1).tolist() == pytest.approx([1.5, 1.5, 3.0, 4.0, 4.0])


def test_window_removes_a_trend_before_ranking():
    ramp = torch.arange(40, dtype=torch.float64) * 0.1
    ramp[8] += 0.5
    ramp[20] += 0.6
    # Raw values: the top 5% are the end of the ramp, where only the last position is a local maximum.
    assert find_peaks(ramp, 0.05, 1).tolist() == [39]
    # Relative to the mean within 5 positions the two bumps rank first (the last position, whose
    # baseline is one-sided, still sits 0.25 above it and comes third).
    assert find_peaks(ramp, 0.05, 1, window=5).tolist() == [8, 20]
    assert find_peaks(ramp, 0.1, 1, window=5).tolist() == [8, 20, 39]


def test_count_matched_lags():
    targets, sources = torch.tensor([4, 13, 20]), torch.tensor([3, 10])
    assert count_matched(targets, sources, 0, 3) == 2  # 4 - 3 = 1, 13 - 10 = 3
    assert count_matched(targets, sources, 0, 2) == 1
    assert count_matched(targets, sources, -1, 1) == 1
    assert count_matched(torch.tensor([3]), sources, 0, 0) == 1  # coincide
    assert count_matched(torch.tensor([2]), sources, 0, 5) == 0  # before the source
    assert count_matched(torch.zeros(0, dtype=torch.long), sources, 0, 3) == 0


def test_shuffled_matched_is_the_chance_rate():
    generator = torch.Generator().manual_seed(0)
    # One source at a uniform position in 0..9 lands exactly on target 5 with probability 1/10.
    rate = shuffled_matched(torch.tensor([5]), 1, torch.arange(10), 0, 0, 4000, generator)
    assert rate == pytest.approx(0.1, abs=0.02)
    # Lag window 0..3 after a uniform source: P = 4/10.
    rate = shuffled_matched(torch.tensor([5]), 1, torch.arange(10), 0, 3, 4000, generator)
    assert rate == pytest.approx(0.4, abs=0.03)
    assert shuffled_matched(torch.tensor([5]), 1, torch.tensor([5]), 0, 0, 10, generator) == 1.0
    assert shuffled_matched(torch.tensor([5]), 0, torch.arange(10), 0, 0, 10, generator) == 0.0


def test_kurtosis_and_receiver_heads():
    k = kurtosis(torch.tensor([[1.0, 2, 3, 4], [1, 1, 1, 1], [0, 0, 0, 10], [NAN, 2, NAN, NAN]]))
    assert k[0].item() == pytest.approx(1.64)  # m4 = 2.5625, var = 1.25
    assert k[2].item() == pytest.approx(820.3125 / 18.75**2)
    assert math.isnan(k[1].item()) and math.isnan(k[3].item())  # constant / a single value
    assert receiver_heads(k.float(), 2).tolist() == [2, 0]
    assert receiver_heads(torch.tensor([1.0, 5.0, 5.0]), 5).tolist() == [1, 2, 0]


def _response(index=0):
    """20 tokens; WAAD peaks at 3 and 10, global FAI peaks at 4 and 13, receiver head 0 spikes at 7 and 12."""
    n = 20
    base = torch.arange(n, dtype=torch.float32) * 1e-3
    waad = base.clone()
    waad[3], waad[10] = 5.0, 6.0
    head_fai = torch.stack([base.clone() for _ in range(4)])
    head_fai[0, 7], head_fai[0, 12] = 0.8, 0.9
    head_fai[2:, 4], head_fai[2:, 13] = 0.5, 0.6
    head_fai[2:, 1], head_fai[2:, 8] = 0.3, 0.35  # lower bumps: less heavy-tailed than head 0
    head_fai[:, 15:] = 0.95  # the last 5 tokens: excluded by min_future = 5
    entropy = torch.zeros(n)
    entropy[3] = entropy[10] = 1.0
    glob = torch.tensor([2, 3])
    return ResponseAnalysis(
        index=index,
        prompt="p",
        prompt_ids=[1],
        token_ids=list(range(n)),
        tokens=["t"] * n,
        generated=True,
        head=HeadStats(span=torch.tensor([1.0, 2, 3, 4]), waad=torch.stack([waad] * 4), fai=head_fai),
        entropy=entropy,
        signals=GroupSignals(waad=waad, fai=head_fai[glob].mean(0), span_loc=1.5, span_glob=3.5),
        local_heads=torch.tensor([0, 1]),
        global_heads=glob,
        preplan=[],
        anchor=[],
    )


def test_statistics_on_a_hand_made_response():
    short = _response(1)
    short.token_ids = short.token_ids[:5]  # no position with 5 tokens after it: left out, counted
    options = PeakOptions(quantile=0.1, radius=1, min_future=5, max_lag=3, match_radius=1, receivers=1, shuffles=50)
    result = coupling_statistics([_response(), short], options)
    s, (row,) = result["summary"], result["per_prompt"]
    assert (s["prompts"], s["prompts_used"]) == (2, 1)
    assert row["waad_peaks"] == [3, 10] and row["fai_peaks"] == [4, 13] and row["receiver_peaks"] == [7, 12]
    assert result["receiver_heads"] == [0]
    assert s["mean_entropy_at_waad_peaks"] == pytest.approx(1.0) and s["mean_entropy"] == pytest.approx(0.1)
    assert s["fai_peaks_after_waad_peaks"] == 1.0  # 4 follows 3 (lag 1), 13 follows 10 (lag 3)
    assert 0 <= s["fai_peaks_after_waad_peaks_shuffled"] < 1.0
    assert s["receiver_peaks_at_global_peaks"] == 0.5  # 12 is next to 13, 7 is not near 4
    assert s["receiver_heads_in_global_group"] == 0.0 and s["global_group_share_of_heads"] == 0.5
    lag2 = coupling_statistics([_response()], PeakOptions(quantile=0.1, min_future=5, max_lag=2, receivers=1))
    assert lag2["summary"]["fai_peaks_after_waad_peaks"] == 0.5
    again = coupling_statistics([_response(), short], options)
    assert again == result  # seeded baselines


def test_no_usable_response():
    result = coupling_statistics([], PeakOptions())
    assert result["summary"] == {"prompts": 0, "prompts_used": 0} and result["per_prompt"] == []


@pytest.mark.parametrize("field, value", [("quantile", 1.5), ("radius", -1), ("receivers", 0), ("shuffles", 0)])
def test_bad_options(field, value):
    with pytest.raises(AnalysisError, match="is invalid"):
        PeakOptions(**{field: value})


def test_demo_command(tmp_path, capsys):
    assert main(["coupling", "--demo", "--out", str(tmp_path), "--max-new-tokens", "40", "--shuffles", "20"]) == 0
    out = capsys.readouterr().out
    assert "entropy at WAAD peaks" in out and "coupling.json" in out
    data = json.loads((tmp_path / "coupling.json").read_text())
    s = data["summary"]
    assert s["prompts"] == len(demo_prompts()) and s["prompts_used"] >= 1
    assert data["options"]["shuffles"] == 20 and len(data["receiver_heads"]) == 3  # 30% of 3 layers x 4 heads
    for key in (
        "fai_peaks_after_waad_peaks",
        "fai_peaks_after_waad_peaks_shuffled",
        "receiver_peaks_at_global_peaks",
        "receiver_peaks_at_global_peaks_shuffled",
    ):
        assert s[key] is None or 0 <= s[key] <= 1
    for row in data["per_prompt"]:
        assert all(0 <= t < row["tokens"] - 10 for t in row["fai_peaks"] + row["receiver_peaks"])
