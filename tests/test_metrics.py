"""Fast statistics (`attention_stats`, `token_stats`) against the dense formulas (`reference_stats`)."""

import math

import pytest
import torch
from helpers import assert_stats_close, dense_attention, pooled_reference
from torch.utils._python_dispatch import TorchDispatchMode

from verl_anchor import AnchorConfig
from verl_anchor.core import metrics
from verl_anchor.core.metrics import (
    HeadStats,
    attention_map,
    attention_stats,
    fai_counts,
    group_heads,
    group_signals,
    reference_stats,
    token_stats,
)

CASES = [
    # (Hq, Hkv, N, P, fai_h_lo, fai_h_hi, window, chunk)
    (4, 2, 1, 0, 10, 100, 10, 64),  # N = 1
    (4, 4, 2, 0, 10, 100, 10, 64),  # N = 2, FAI undefined everywhere
    (4, 4, 2, 1, 0, None, 10, 64),  # N = 2, analysis horizon
    (4, 2, 130, 0, 10, 100, 10, 32),  # response from position 0
    (4, 2, 130, 129, 10, 100, 10, 32),  # response = last token only
    (4, 1, 300, 100, 10, 100, 10, 64),  # GQA 4:1, prefix handled by the fused kernel
    (6, 3, 257, 40, 0, None, 10, 50),  # analysis mode: horizon to the end of the response
    (2, 2, 200, 60, 3, 5, 12, 16),  # band set by the window, not by the FAI horizon
    (2, 1, 150, 10, 10, 100, 10, 1),  # one query per chunk
    (2, 1, 150, 10, 10, 100, 10, 1000),  # one chunk for everything
    (8, 2, 400, 150, 10, 50, 10, 37),  # the paper's v1 horizon, odd chunk
    (2, 1, 120, 5, 3, 20, 40, 8),  # window wider than a chunk: WAAD's near keys reach before the block
    (4, 2, 90, 0, 0, None, 25, 7),  # the same in analysis mode
]


@pytest.mark.parametrize("num_heads, num_kv, n, start, lo, hi, window, chunk", CASES)
def test_fast_equals_dense_reference(num_heads, num_kv, n, start, lo, hi, window, chunk):
    torch.manual_seed(n * 7 + start)
    cfg = AnchorConfig(fai_h_lo=lo, fai_h_hi=hi, window=window)
    q, k = torch.randn(num_heads, n, 16), torch.randn(num_kv, n, 16)
    fast = attention_stats(q, k, start, cfg, chunk_size=chunk)
    # Oracle in float64; the float32 reference must agree too. WAAD is up to `window`: float32 rounds it
    # to ~window * 6e-8 per term, so a wide window gets a proportionally wider tolerance.
    atol = 1e-5 * max(1.0, window / 10)
    assert_stats_close(fast, reference_stats(dense_attention(q, k), start, cfg), atol=atol)
    assert_stats_close(fast, reference_stats(dense_attention(q, k, dtype=torch.float32), start, cfg), atol=atol)
    assert fast.waad.dtype == torch.float32


def test_dense_chunked_fallback_equals_reference(monkeypatch):
    """Where no fused kernel serves the device, the statistics come from dense chunks: same numbers."""
    monkeypatch.setattr(metrics, "_FUSED_BROKEN", {("cpu", torch.float32)})
    torch.manual_seed(1)
    cfg = AnchorConfig()
    q, k = torch.randn(4, 260, 8), torch.randn(2, 260, 8)
    assert_stats_close(attention_stats(q, k, 30, cfg, chunk_size=64), reference_stats(dense_attention(q, k), 30, cfg))


def test_custom_scale_and_bfloat16_inputs_accumulate_in_float32():
    torch.manual_seed(2)
    cfg = AnchorConfig()
    q, k = torch.randn(4, 200, 16).bfloat16(), torch.randn(2, 200, 16).bfloat16()
    fast = attention_stats(q, k, 50, cfg, scale=0.1)
    assert fast.waad.dtype == torch.float32
    assert_stats_close(fast, reference_stats(dense_attention(q.float(), k.float(), scale=0.1), 50, cfg))


def test_empty_response_gives_nan_span_and_empty_vectors():
    q, k = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    for stats in (attention_stats(q, k, 5, AnchorConfig()), reference_stats(dense_attention(q, k), 5, AnchorConfig())):
        assert stats.waad.shape == (2, 0) and stats.fai.shape == (2, 0) and torch.isnan(stats.span).all()


def test_hand_computed_example():
    """Uniform causal attention over N = 4, W = 2, horizon [1, 2], response from position 1."""
    n = 4
    attn = torch.tril(torch.ones(n, n))
    attn = (attn / attn.sum(dim=1, keepdim=True))[None]
    stats = reference_stats(attn, 1, AnchorConfig(window=2, fai_h_lo=1, fai_h_hi=2))
    # Row t attends 1/(t+1) to each s <= t. span = mean_t sum_s (t-s)/(t+1) = mean(1/2, 1, 3/2) = 1.
    assert stats.span.item() == pytest.approx(1.0)
    # WAAD[t] = sum_s min(t-s, 2)/(t+1): t=1 -> 1/2, t=2 -> (2+1)/3 = 1, t=3 -> (2+2+1)/4 = 5/4.
    assert stats.waad[0].tolist() == pytest.approx([0.5, 1.0, 1.25])
    # FAI[s] = mean over t in [s+1, min(3, s+2)] of 1/(t+1): s=1 -> (1/3+1/4)/2, s=2 -> 1/4, s=3 -> undefined.
    assert stats.fai[0, :2].tolist() == pytest.approx([7 / 24, 0.25])
    assert math.isnan(stats.fai[0, 2].item())
    assert fai_counts(4, AnchorConfig(fai_h_lo=1, fai_h_hi=2)).tolist() == [2, 2, 1, 0]


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_fast_path_never_builds_an_n_by_n_tensor():
    n, chunk = 4096, 128
    q, k = torch.randn(1, n, 8), torch.randn(1, n, 8)
    cfg = AnchorConfig()
    with _LargestTensor() as probe:
        token_stats(q, k, cfg, chunk_size=chunk)
    # The largest intermediates: one score block, chunk x (chunk + band) per head, and the fused
    # kernel's distance values, N x head_dim (as large as k itself).
    assert probe.largest <= max(chunk * (chunk + cfg.band), n * 8)
    assert probe.largest < n * n / 100


def test_analysis_mode_memory_is_n_times_chunk():
    n, chunk = 2048, 64
    q, k = torch.randn(1, n, 8), torch.randn(1, n, 8)
    with _LargestTensor() as probe:
        token_stats(q, k, AnchorConfig(fai_h_lo=0, fai_h_hi=None), chunk_size=chunk)
    assert probe.largest <= chunk * n


@pytest.mark.parametrize(
    "num_heads, num_kv, n, first, bins, chunk",
    [
        (4, 2, 50, 0, 50, 16),  # one token per bin: the map is the attention matrix itself
        (4, 2, 50, 0, 7, 16),  # uneven runs
        (6, 3, 97, 30, 10, 8),  # map of the response only
        (2, 1, 20, 19, 5, 4),  # one position
        (2, 2, 40, 10, 64, 100),  # more bins than positions
    ],
)
def test_attention_map_equals_pooled_dense_attention(num_heads, num_kv, n, first, bins, chunk):
    torch.manual_seed(n + first)
    q, k = torch.randn(num_heads, n, 8), torch.randn(num_kv, n, 8)
    pooled = attention_map(q, k, first, bins, chunk_size=chunk)
    ref = pooled_reference(dense_attention(q, k), first, bins)
    assert pooled.shape == ref.shape == (num_heads, min(bins, n - first), min(bins, n - first))
    torch.testing.assert_close(pooled.double(), ref, atol=1e-6, rtol=0)
    if first == 0:
        torch.testing.assert_close(pooled.sum(dim=-1), torch.ones(num_heads, pooled.shape[1]), atol=1e-5, rtol=0)
    assert attention_map(q, k, n, bins).shape == (num_heads, 0, 0)


def test_attention_map_memory_is_chunk_times_n():
    n, chunk, bins = 4096, 64, 128
    q, k = torch.randn(1, n, 8), torch.randn(1, n, 8)
    with _LargestTensor() as probe:
        attention_map(q, k, 100, bins, chunk_size=chunk)
    assert probe.largest <= chunk * n


def test_group_heads_stable_ties_and_quantile():
    span = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0, 3.0, 9.0, 2.0, 7.0, 0.5])
    loc, glob = group_heads(span, AnchorConfig(head_quantile=0.3))
    assert loc.tolist() == [9, 1, 3]  # 0.5, then the tie 1.0 in head order
    assert glob.tolist() == [8, 4, 6]  # the last three of the stable ascending order
    assert group_heads(torch.tensor([2.0]), AnchorConfig())[0].tolist() == [0]  # m = max(1, floor(0.3))
    loc, glob = group_heads(torch.arange(100.0), AnchorConfig(head_quantile=0.29))
    assert len(loc) == len(glob) == 29  # floor(0.29 * 100), not 28 from float rounding


def test_group_signals_average_the_right_heads():
    stats = HeadStats(
        span=torch.tensor([1.0, 10.0, 5.0, 20.0]),
        waad=torch.arange(8.0).view(4, 2),
        fai=torch.tensor([[0.1, math.nan], [0.2, math.nan], [0.3, math.nan], [0.4, math.nan]]),
    )
    signals = group_signals(stats, AnchorConfig(head_quantile=0.5))
    assert signals.waad.tolist() == [2.0, 3.0]  # heads 0 and 2 (spans 1, 5)
    assert signals.fai[0].item() == pytest.approx(0.3) and math.isnan(signals.fai[1].item())  # heads 1 and 3
    assert signals.span_loc == 3.0 and signals.span_glob == 15.0


def test_token_stats_are_independent_of_the_response_start():
    torch.manual_seed(3)
    q, k = torch.randn(2, 120, 8), torch.randn(2, 120, 8)
    cfg = AnchorConfig()
    whole = token_stats(q, k, cfg)
    for start in (0, 7, 119, 120):
        part = attention_stats(q, k, start, cfg)
        from_whole = whole.response(start)
        torch.testing.assert_close(from_whole.waad, part.waad, atol=1e-5, rtol=0)
        torch.testing.assert_close(from_whole.fai, part.fai, atol=1e-6, rtol=0, equal_nan=True)
        torch.testing.assert_close(from_whole.span, part.span, atol=1e-4, rtol=1e-6, equal_nan=True)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of key heads"):
        token_stats(torch.randn(3, 4, 2), torch.randn(2, 4, 2), AnchorConfig())
    with pytest.raises(ValueError, match="response_start=5 must lie in 0..N"):
        attention_stats(torch.randn(2, 4, 2), torch.randn(2, 4, 2), 5, AnchorConfig())
    with pytest.raises(ValueError, match="bins=0 is invalid"):
        attention_map(torch.randn(2, 4, 2), torch.randn(2, 4, 2), 0, bins=0)
    with pytest.raises(ValueError, match=r"shape \(H, N, N\)"):
        reference_stats(torch.rand(2, 3, 4), 0, AnchorConfig())


@pytest.mark.parametrize("hi", [100, None])
def test_block_geometry_kept_per_call_stays_bounded(monkeypatch, hi):
    """Only the block every full chunk past the first band shares is kept: blocks that start at key 0 (the
    first band, analysis mode) differ per chunk, and keeping them all would make memory grow with N^2."""
    made = []

    class Spy(metrics._BlockGeometry):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(metrics, "_BlockGeometry", Spy)
    q, k = torch.randn(2, 900, 8), torch.randn(1, 900, 8)
    token_stats(q, k, AnchorConfig(fai_h_lo=0 if hi is None else 10, fai_h_hi=hi), chunk_size=32)
    [geometry] = made
    assert len(geometry._cache) == (0 if hi is None else 2)  # analysis: none; banded: full chunks + the last


def not_unit_stride_along_d(x, layout):
    """`x`'s values with stride != 1 along D: "transposed" (D-major storage) or "strided" (every other element)."""
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(*x.shape[:2], 2 * x.shape[2], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_q_k_not_contiguous_along_d_give_the_reference_stats(layout):
    """torch's fused CPU attention misreads q/k whose last dimension is not contiguous (WAAD was off by 0.1):
    every entry point normalises them first (`metrics.prepare_qk`)."""
    torch.manual_seed(5)
    cfg = AnchorConfig(window=3, fai_h_lo=1, fai_h_hi=4)  # band 4: the prefix goes through the fused kernel
    q, k = torch.randn(4, 300, 16), torch.randn(2, 300, 16)
    q_strided, k_strided = not_unit_stride_along_d(q, layout), not_unit_stride_along_d(k, layout)
    assert q_strided.stride(-1) != 1 and torch.equal(q_strided, q)
    ref = reference_stats(dense_attention(q, k), 100, cfg)
    assert_stats_close(attention_stats(q_strided, k_strided, 100, cfg, chunk_size=64), ref)
    tokens = token_stats(q_strided, k_strided, cfg, chunk_size=64).response(100)
    assert_stats_close(tokens, ref)


def test_mixed_dtypes_are_promoted_and_non_float_refused():
    torch.manual_seed(6)
    cfg = AnchorConfig()
    q, k = torch.randn(4, 150, 16), torch.randn(2, 150, 16)
    mixed = attention_stats(q.half(), k.half().float(), 20, cfg)
    assert mixed.waad.dtype == torch.float32
    assert_stats_close(mixed, reference_stats(dense_attention(q.half().float(), k.half().float()), 20, cfg))
    with pytest.raises(ValueError, match="must be floating point, got torch.int64"):
        token_stats(torch.ones(2, 4, 2, dtype=torch.long), torch.ones(2, 4, 2), cfg)


def test_window_longer_than_the_sequence_costs_no_memory():
    """min(t - s, W) = min(t - s, N) for W >= N: a window of 2^24 (the largest AnchorConfig allows) gives the
    statistics of W = N, and no tensor grows with W (it tried to allocate H x chunk x W)."""
    torch.manual_seed(7)
    q, k = torch.randn(1, 50, 8), torch.randn(1, 50, 8)
    huge, exact = (
        AnchorConfig(window=2**24, fai_h_hi=None, fai_h_lo=0),
        AnchorConfig(window=50, fai_h_hi=None, fai_h_lo=0),
    )
    with _LargestTensor() as probe:
        stats = token_stats(q, k, huge, chunk_size=4)
    assert probe.largest <= 50 * 50
    expected = token_stats(q, k, exact, chunk_size=4)
    torch.testing.assert_close(stats.waad, expected.waad, atol=0, rtol=0)
    assert_stats_close(stats.response(0), reference_stats(dense_attention(q, k), 0, huge), atol=5e-5)  # WAAD up to 50
