"""Dense O(N^2) oracles shared by the statistics tests (imported as `helpers`: pytest puts tests/ on the path)."""

import math

import torch

from verl_anchor.core.metrics import HeadStats


def dense_attention(q, k, scale=None, dtype=torch.float64):
    """Causal softmax(q k^T * scale) with GQA, the way eager attention computes it."""
    num_heads, n, head_dim = q.shape
    keys = k.repeat_interleave(num_heads // k.shape[0], dim=0).to(dtype)
    scores = q.to(dtype) @ keys.transpose(1, 2) * (head_dim**-0.5 if scale is None else scale)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return scores.softmax(dim=-1)


def assert_stats_close(fast: HeadStats, ref: HeadStats, atol=1e-5):
    assert fast.span.shape == ref.span.shape and fast.waad.shape == ref.waad.shape == fast.fai.shape
    assert torch.equal(torch.isnan(fast.fai), torch.isnan(ref.fai)), "FAI defined at different tokens"
    assert torch.equal(torch.isnan(fast.span), torch.isnan(ref.span))
    defined = ~torch.isnan(ref.fai)
    torch.testing.assert_close(fast.waad.double(), ref.waad.double(), atol=atol, rtol=0)
    torch.testing.assert_close(fast.fai[defined].double(), ref.fai[defined].double(), atol=atol, rtol=0)
    # A span is a distance of up to N tokens: float32 resolves it to ~1e-7 relative, so 1e-5 absolute
    # is only attainable for spans below ~100 (see docs/method.md); the tolerance scales beyond that.
    torch.testing.assert_close(fast.span.double(), ref.span.double(), atol=atol, rtol=1e-6, equal_nan=True)


def pooled_reference(attn, first, bins):
    """Mean over each query run of the mass on each key run, by explicit loops over the runs."""
    width = attn.shape[-1] - first
    num_bins = min(bins, width)
    runs = [[i for i in range(width) if i * num_bins // width == b] for b in range(num_bins)]
    out = torch.zeros(attn.shape[0], num_bins, num_bins, dtype=attn.dtype)
    for i, rows in enumerate(runs):
        for j, cols in enumerate(runs):
            block = attn[:, [first + r for r in rows]][:, :, [first + c for c in cols]]
            out[:, i, j] = block.sum(dim=2).mean(dim=1)
    return out
