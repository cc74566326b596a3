"""The Triton kernels (`verl_anchor.core.kernels.triton_stats`) on CPU tensors through Triton's interpreter,
against the dense formulas (`metrics.reference_stats`) in float64.

Triton must see TRITON_INTERPRET=1 before it is first imported (triton 3.9 reads it through
`knobs.runtime.interpret` whenever `@triton.jit` decorates a function, and triton.language's own
helpers such as `tl.sum` are decorated when triton is imported). Other test modules import triton
indirectly (transformers does), so the kernels run in a child process: this file run as a script
computes every case below and saves the results; the tests compare them in this process. The
interpreter's bf16 `tl.dot` is wrong, so 16-bit inputs are tested in fp16 here; bf16 is checked on
a GPU by `benchmarks/bench_gpu.py`.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import dense_attention

from verl_anchor import AnchorConfig
from verl_anchor.core.metrics import reference_stats
from verl_anchor.core.stats_engine import PackedSequences, PackedTokenStats, packed_response_signals, packed_token_stats

BOUNDED = AnchorConfig()  # the paper's training horizon [10, 100]
ANALYSIS = AnchorConfig(fai_h_lo=0, fai_h_hi=None)  # horizon to the end of the sequence

CASES = {
    # id: (sequence lengths, Hq, Hkv, D, cfg, tile, inner, dtype)
    "N=1, GQA 1:1": ([1], 2, 2, 16, BOUNDED, 64, 64, torch.float32),
    "N=2, FAI undefined": ([2], 4, 1, 16, BOUNDED, 64, 64, torch.float32),
    "N=2, unbounded": ([2], 4, 4, 16, ANALYSIS, 64, 64, torch.float32),
    "band-sized N=110": ([110], 4, 1, 16, BOUNDED, 64, 64, torch.float32),
    "mixed lengths, GQA 4:1, D=24": ([1, 0, 2, 150, 37, 300, 64], 8, 2, 24, BOUNDED, 64, 64, torch.float32),
    "mixed lengths, GQA 4:1, D=24, unbounded": ([1, 0, 2, 150, 37, 300, 64], 8, 2, 24, ANALYSIS, 64, 64, torch.float32),
    "GQA 8:1, tile 16: far, near, diagonal": ([70, 129, 33], 8, 1, 16, BOUNDED, 16, 16, torch.float32),
    "GQA 8:1, tile 32 = 2 steps, unbounded": ([70, 129, 33], 8, 1, 16, ANALYSIS, 32, 16, torch.float32),
    "window > tile, band < window": (
        [90],
        2,
        2,
        16,
        AnchorConfig(fai_h_lo=3, fai_h_hi=5, window=20),
        16,
        16,
        torch.float32,
    ),
    "no tokens": ([0, 0], 2, 1, 16, BOUNDED, 64, 64, torch.float32),
    "fp16": ([3, 140, 60], 4, 1, 16, BOUNDED, 64, 64, torch.float16),
    "fp16, unbounded": ([3, 140, 60], 4, 1, 16, ANALYSIS, 64, 64, torch.float16),
}
ALONE = 77  # the sequence of the batch-invariance test, alone and after `before` / before `after` tokens
NEIGHBOURS = [(5, 0), (16, 40), (131, 9)]
DISPATCH_LENGTHS = [40, 1, 130, 75]


def packed_inputs(lengths, num_heads, num_kv, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(num_heads, total, head_dim, generator=generator).to(dtype)
    k = torch.randn(num_kv, total, head_dim, generator=generator).to(dtype)
    return q, k, torch.tensor([0, *lengths]).cumsum(0)


def neighbours_inputs(before, after):
    """The ALONE-token sequence packed between `before` and `after` tokens of other sequences."""
    q, k, _ = packed_inputs([ALONE], 4, 2, 16, seed=3)
    other_q, other_k, _ = packed_inputs([before + after], 4, 2, 16, seed=before)
    big_q = torch.cat([other_q[:, :before], q, other_q[:, before:]], dim=1)
    big_k = torch.cat([other_k[:, :before], k, other_k[:, before:]], dim=1)
    return big_q, big_k, torch.tensor([0, before, before + ALONE, before + ALONE + after])


def compute_in_interpreter(path: str) -> None:
    """Child process: every case's kernel outputs, saved to `path`."""
    from verl_anchor.core import stats_engine
    from verl_anchor.core.kernels import triton_stats

    def kernel_stats(q, k, cu, cfg, tile, inner):
        tiles = PackedSequences(cu, q.shape[1]).tiles(tile)
        return triton_stats.packed_stats(
            q, k, tiles, cfg.window, cfg.fai_h_lo, cfg.fai_h_hi, q.shape[2] ** -0.5, tile=tile, inner=inner
        )

    results = {"interpreted": type(triton_stats._row_pass).__name__}
    for case, (lengths, num_heads, num_kv, head_dim, cfg, tile, inner, dtype) in CASES.items():
        results[case] = kernel_stats(*packed_inputs(lengths, num_heads, num_kv, head_dim, dtype), cfg, tile, inner)
    results["alone"] = kernel_stats(*packed_inputs([ALONE], 4, 2, 16, seed=3), BOUNDED, 16, 16)
    for before, after in NEIGHBOURS:
        results[("packed", before, after)] = kernel_stats(*neighbours_inputs(before, after), BOUNDED, 16, 16)
    stats_engine.select_backend = lambda q: "triton"  # the CUDA dispatch, on CPU tensors
    stats = packed_token_stats(*packed_inputs(DISPATCH_LENGTHS, 8, 2, 16, seed=5), BOUNDED)
    results["dispatch"] = (stats.row_span, stats.waad, stats.fai)
    q, k, cu = packed_inputs(DISPATCH_LENGTHS, 8, 2, 16, seed=5)
    stats = packed_token_stats(q.half(), k.transpose(1, 2).contiguous().transpose(1, 2), cu, BOUNDED)
    results["dispatch, fp16 q, fp32 k strided"] = (stats.row_span, stats.waad, stats.fai)
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]')")
    path = tmp_path_factory.mktemp("kernels") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(path)
    assert results["interpreted"] == "InterpretedFunction"
    return results


@pytest.mark.parametrize("case", CASES)
def test_kernels_equal_dense_reference(interpreted, case):
    """WAAD and FAI within 1e-5, the response span (mean over the sequence) within 1e-6 relative;
    16-bit inputs multiply exactly into float32 accumulators, so fp16 gets the same tolerance."""
    lengths, num_heads, num_kv, head_dim, cfg, _, _, dtype = CASES[case]
    q, k, cu = packed_inputs(lengths, num_heads, num_kv, head_dim, dtype)
    row_span, waad, fai = interpreted[case]
    assert row_span.shape == waad.shape == fai.shape == (num_heads, sum(lengths))
    assert row_span.dtype == waad.dtype == fai.dtype == torch.float32
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        attn = dense_attention(q[:, a:b], k[:, a:b], head_dim**-0.5)
        ref = reference_stats(attn, 0, cfg)
        offset = torch.arange(b - a)[:, None] - torch.arange(b - a)[None, :]
        torch.testing.assert_close(
            row_span[:, a:b].double(), (attn * offset.clamp(min=0)).sum(dim=2), atol=1e-5, rtol=1e-6
        )
        torch.testing.assert_close(row_span[:, a:b].double().mean(dim=1), ref.span, atol=1e-12, rtol=1e-6)
        torch.testing.assert_close(waad[:, a:b].double(), ref.waad, atol=1e-5, rtol=0)
        torch.testing.assert_close(fai[:, a:b].double(), ref.fai, atol=1e-5, rtol=0, equal_nan=True)


def test_sequence_alone_and_packed_give_bitwise_equal_stats(interpreted):
    """Tiles start at each sequence's first token: neighbours and offset change nothing."""
    for before, after in NEIGHBOURS:
        for single, many in zip(interpreted["alone"], interpreted[("packed", before, after)]):
            torch.testing.assert_close(many[:, before : before + ALONE], single, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["dispatch", "dispatch, fp16 q, fp32 k strided"])
def test_dispatch_to_kernels_matches_torch_path(interpreted, case):
    """`packed_token_stats` through the kernels (as on CUDA, float32 at its own block sizes) and through the torch
    path, then the worker's batched signals of both: the same numbers. Mixed dtypes and keys not contiguous
    along D (which `tl.dot` rejected, and the kernels would misread) reach the kernels as one dtype, unit stride."""
    q, k, cu = packed_inputs(DISPATCH_LENGTHS, 8, 2, 16, seed=5)
    if case != "dispatch":
        q = q.half().float()
    torch_stats = packed_token_stats(q, k, cu, BOUNDED)
    kernel = PackedTokenStats(*interpreted[case], sequences=torch_stats.sequences, head_offset=0, num_heads_total=8)
    for name in ("row_span", "waad", "fai"):
        torch.testing.assert_close(
            getattr(kernel, name), getattr(torch_stats, name), atol=1e-5, rtol=1e-6, equal_nan=True
        )
    lengths = torch.tensor([20, 0, 100, 75])
    ours = packed_response_signals(kernel, lengths, BOUNDED)
    theirs = packed_response_signals(torch_stats, lengths, BOUNDED)
    assert torch.equal(ours.local_heads, theirs.local_heads) and torch.equal(ours.global_heads, theirs.global_heads)
    torch.testing.assert_close(ours.waad, theirs.waad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.fai, theirs.fai, atol=1e-5, rtol=0, equal_nan=True)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # masked lanes of empty tiles divide 0 by 0 in numpy
    compute_in_interpreter(sys.argv[1])
