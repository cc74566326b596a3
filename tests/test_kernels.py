"""The Triton kernels (`verl_anchor.kernels.triton_stats`) on CPU tensors through Triton's interpreter,
against the dense formulas (`metrics.reference_stats`) in float64.

triton decides interpreter vs compiler when `@triton.jit` decorates a kernel, i.e. when the kernel
module is imported (triton 3.9: `knobs.runtime.interpret` reads TRITON_INTERPRET through getenv), so
this module sets the variable before that import (and re-imports the kernels if another test module
loaded them compiled). The interpreter's bf16 `tl.dot` is wrong, so 16-bit inputs are tested in fp16
here; bf16 is checked on a GPU by `benchmarks/bench_gpu.py`.
"""

import importlib
import math
import os

import pytest
import torch

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from verl_anchor.kernels import triton_stats

    if not isinstance(triton_stats._row_pass, InterpretedFunction):
        importlib.reload(triton_stats)
finally:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS

from verl_anchor import AnchorConfig, stats_engine  # noqa: E402
from verl_anchor.metrics import reference_stats  # noqa: E402
from verl_anchor.stats_engine import PackedSequences, packed_response_signals, packed_token_stats  # noqa: E402

# Masked lanes of empty tiles divide 0 by 0 in numpy; their results are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BOUNDED = AnchorConfig()  # the paper's training horizon [10, 100]
ANALYSIS = AnchorConfig(fai_h_lo=0, fai_h_hi=None)  # horizon to the end of the sequence


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """Some triton helpers look at TRITON_INTERPRET while a kernel runs, too."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


def dense_attention(q, k, scale):
    """Causal softmax(q k^T * scale) of one sequence in float64, GQA by repeating keys."""
    num_heads, n, _ = q.shape
    keys = k.repeat_interleave(num_heads // k.shape[0], dim=0).double()
    scores = q.double() @ keys.transpose(1, 2) * scale
    return scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf).softmax(dim=-1)


def packed_inputs(lengths, num_heads, num_kv, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(num_heads, total, head_dim, generator=generator).to(dtype)
    k = torch.randn(num_kv, total, head_dim, generator=generator).to(dtype)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return q, k, cu


def kernel_stats(q, k, cu, cfg, tile=triton_stats.TILE, inner=triton_stats.INNER):
    tiles = PackedSequences(cu, q.shape[1]).tiles(tile)
    return triton_stats.packed_stats(q, k, tiles, cfg.window, cfg.fai_h_lo, cfg.fai_h_hi, q.shape[2] ** -0.5,
                                     tile=tile, inner=inner)


def assert_matches_reference(q, k, cu, cfg, row_span, waad, fai):
    scale = q.shape[2] ** -0.5
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        attn = dense_attention(q[:, a:b], k[:, a:b], scale)
        ref = reference_stats(attn, 0, cfg)
        offset = torch.arange(b - a)[:, None] - torch.arange(b - a)[None, :]
        ref_rows = (attn * offset.clamp(min=0)).sum(dim=2)
        torch.testing.assert_close(row_span[:, a:b].double(), ref_rows, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(row_span[:, a:b].double().mean(dim=1), ref.span, atol=1e-12, rtol=1e-6)
        torch.testing.assert_close(waad[:, a:b].double(), ref.waad, atol=1e-5, rtol=0)
        torch.testing.assert_close(fai[:, a:b].double(), ref.fai, atol=1e-5, rtol=0, equal_nan=True)


CASES = [
    # (sequence lengths, Hq, Hkv, D, cfg, tile, inner)
    ([1], 2, 2, 16, BOUNDED, 64, 64),  # N = 1, GQA 1:1
    ([2], 4, 1, 16, BOUNDED, 64, 64),  # N = 2: FAI undefined everywhere
    ([2], 4, 4, 16, ANALYSIS, 64, 64),  # N = 2, unbounded horizon
    ([110], 4, 1, 16, BOUNDED, 64, 64),  # band-sized: N = fai_h_lo + fai_h_hi
    ([1, 0, 2, 150, 37, 300, 64], 8, 2, 24, BOUNDED, 64, 64),  # mixed lengths, GQA 4:1, D not a power of 2
    ([1, 0, 2, 150, 37, 300, 64], 8, 2, 24, ANALYSIS, 64, 64),
    ([0, 0], 2, 1, 16, BOUNDED, 64, 64),  # no tokens at all
    ([70, 129, 33], 8, 1, 16, BOUNDED, 16, 16),  # GQA 8:1; small tiles: far, near and diagonal key tiles
    ([70, 129, 33], 8, 1, 16, ANALYSIS, 32, 16),  # a query tile of two key steps: two diagonal steps
    ([90], 2, 2, 16, AnchorConfig(fai_h_lo=3, fai_h_hi=5, window=20), 16, 16),  # window > tile, band < window
]


@pytest.mark.parametrize("lengths, num_heads, num_kv, head_dim, cfg, tile, inner", CASES)
def test_kernels_equal_dense_reference(lengths, num_heads, num_kv, head_dim, cfg, tile, inner):
    q, k, cu = packed_inputs(lengths, num_heads, num_kv, head_dim)
    row_span, waad, fai = kernel_stats(q, k, cu, cfg, tile, inner)
    assert row_span.dtype == waad.dtype == fai.dtype == torch.float32
    assert_matches_reference(q, k, cu, cfg, row_span, waad, fai)


@pytest.mark.parametrize("cfg", [BOUNDED, ANALYSIS], ids=["bounded", "analysis"])
def test_fp16_inputs_equal_reference(cfg):
    """16-bit inputs multiply exactly into float32 accumulators: same tolerance as float32."""
    q, k, cu = packed_inputs([3, 140, 60], 4, 1, 16, dtype=torch.float16)
    assert_matches_reference(q, k, cu, cfg, *kernel_stats(q, k, cu, cfg))


def test_sequence_alone_and_packed_give_bitwise_equal_stats():
    """Tiles start at each sequence's first token: neighbours and offset change nothing."""
    q, k, cu = packed_inputs([77], 4, 2, 16, seed=3)
    alone = kernel_stats(q, k, cu, BOUNDED, 16, 16)
    for before, after in [(5, 0), (16, 40), (131, 9)]:
        pq, pk, _ = packed_inputs([before, after], 4, 2, 16, seed=before)
        big_q = torch.cat([pq[:, :before], q, pq[:, before:]], dim=1)
        big_k = torch.cat([pk[:, :before], k, pk[:, before:]], dim=1)
        cu_packed = torch.tensor([0, before, before + 77, before + 77 + after])
        for single, many in zip(alone, kernel_stats(big_q, big_k, cu_packed, BOUNDED, 16, 16)):
            torch.testing.assert_close(many[:, before : before + 77], single, atol=0, rtol=0, equal_nan=True)


def test_dispatch_to_kernels_matches_torch_path(monkeypatch):
    """`packed_token_stats` through the kernels (as on CUDA) and through the torch path, then the worker's
    batched signals of both: the same numbers."""
    q, k, cu = packed_inputs([40, 1, 130, 75], 8, 2, 16, seed=5)
    cfg = BOUNDED
    torch_stats = packed_token_stats(q, k, cu, cfg)
    monkeypatch.setattr(stats_engine, "select_backend", lambda _: "triton")
    kernel = packed_token_stats(q, k, cu, cfg)
    for name in ("row_span", "waad", "fai"):
        torch.testing.assert_close(getattr(kernel, name), getattr(torch_stats, name), atol=1e-5, rtol=1e-6,
                                   equal_nan=True)
    lengths = torch.tensor([20, 0, 100, 75])
    ours, theirs = packed_response_signals(kernel, lengths, cfg), packed_response_signals(torch_stats, lengths, cfg)
    assert torch.equal(ours.local_heads, theirs.local_heads) and torch.equal(ours.global_heads, theirs.global_heads)
    torch.testing.assert_close(ours.waad, theirs.waad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.fai, theirs.fai, atol=1e-5, rtol=0, equal_nan=True)


def test_no_sequences_launches_nothing():
    q, k, cu = packed_inputs([], 2, 1, 16)
    assert [x.shape for x in kernel_stats(q, k, cu, BOUNDED)] == [(2, 0)] * 3
