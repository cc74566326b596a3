"""Attention metrics of the paper (spec §2-3): head span, WAAD, FAI, head groups.

Two implementations of the same formulas:

* `reference_stats` reads a dense `(H, N, N)` attention matrix, straight from the
  formulas. O(N^2) memory; the oracle for tests and short analyses.
* `attention_stats` / `token_stats` read post-RoPE `q`, `k` and never build an `N x N`
  tensor. Queries are processed in chunks; for each chunk only the keys within
  `band = max(window - 1, fai_h_hi)` of the chunk are scored densely (a
  `chunk x (chunk + band)` block), which is all WAAD and FAI read. The keys further back
  enter only through their log-sum-exp and their mean distance, which a fused attention
  kernel returns without materialising scores (values = distances). Memory is
  O(N * (chunk + band)) per head, i.e. linear in N.

`attention_map` pools the attention of a long sequence to a small grid for figures (O(chunk * N)).

Everything here is pure torch and knows nothing about verl or Hugging Face.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from verl_anchor.core.config import AnchorConfig, floor_count

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 192  # queries per block: fastest of 64-256 at N = 4k and 16k on CPU (benchmarks/bench_stats.py)


@dataclasses.dataclass
class HeadStats:
    """Per-head statistics of one response: `span (H,)`, `waad (H, n)`, `fai (H, n)` (NaN = undefined)."""

    span: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor


@dataclasses.dataclass
class TokenStats:
    """Per-head, per-token statistics of positions `first..N-1`, independent of where the response starts.

    `row_span[h, i]` = sum_s A[t, s] * (t - s) for t = first + i; `waad` likewise; `fai[h, i]` is the
    FAI of key s = first + i (its horizon only ever contains queries t >= s, so it does not depend on
    the response start as long as the response starts at or before s). This is what a capture inside
    the forward pass can compute before it knows where each response begins.
    """

    row_span: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor
    first: int = 0
    attention_map: torch.Tensor | None = None  # `attention_map(...)` output, when a capture asks for it

    def response(self, response_start: int) -> HeadStats:
        """The statistics of the response that starts at `response_start` (>= `first`)."""
        i = response_start - self.first
        if i < 0 or i > self.row_span.shape[1]:
            raise ValueError(
                f"response_start={response_start} is outside the captured positions "
                f"{self.first}..{self.first + self.row_span.shape[1]}"
            )
        rows = self.row_span[:, i:]
        span = rows.mean(dim=1) if rows.shape[1] else torch.full(rows.shape[:1], math.nan, dtype=rows.dtype)
        return HeadStats(span=span, waad=self.waad[:, i:], fai=self.fai[:, i:])


@dataclasses.dataclass
class GroupSignals:
    """One response's token signals: WAAD averaged over the local group, FAI over the global group."""

    waad: torch.Tensor
    fai: torch.Tensor
    span_loc: float
    span_glob: float


def select_layers(num_hidden_layers: int, num_layers: int = 5) -> list[int]:
    """`num_layers` evenly spaced layers of the middle third (spec §2), 0-based, sorted, unique."""
    if num_hidden_layers < 1 or num_layers < 1:
        raise ValueError(f"need num_hidden_layers >= 1 and num_layers >= 1, got {num_hidden_layers}, {num_layers}")
    lo, hi = num_hidden_layers // 3, (2 * num_hidden_layers) // 3
    # Python's round (half to even) on numpy's linspace values, as the spec fixes.
    return sorted({round(float(v)) for v in np.linspace(lo, hi, num_layers)})


def fai_counts(num_tokens: int, cfg: AnchorConfig, device: torch.device | None = None) -> torch.Tensor:
    """|T(s)| for every key position s (spec §3): queries t with s + lo <= t <= min(N - 1, s + hi)."""
    s = torch.arange(num_tokens, device=device)
    last = torch.full_like(s, num_tokens - 1)
    if cfg.fai_h_hi is not None:
        last = torch.minimum(last, s + cfg.fai_h_hi)
    return (last - (s + cfg.fai_h_lo) + 1).clamp(min=0)


def reference_stats(attn: torch.Tensor, response_start: int, cfg: AnchorConfig) -> HeadStats:
    """Dense oracle: statistics straight from the formulas of spec §2-3. `attn` is `(H, N, N)`."""
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"attn must have shape (H, N, N), got {tuple(attn.shape)}")
    _, num_tokens, _ = attn.shape
    _check_start(response_start, num_tokens)
    positions = torch.arange(num_tokens, device=attn.device)
    offset = positions[:, None] - positions[None, :]  # [t, s] = t - s
    causal = offset >= 0
    probs = attn * causal
    rows = probs[:, response_start:, :]  # queries t in R
    dist = offset.clamp(min=0).to(attn.dtype)
    n = num_tokens - response_start
    span = (rows * dist[response_start:]).sum(dim=(1, 2)) / n if n else torch.full(attn.shape[:1], math.nan)
    waad = (rows * dist[response_start:].clamp(max=cfg.window)).sum(dim=2)
    in_horizon = causal & (offset >= cfg.fai_h_lo)
    if cfg.fai_h_hi is not None:
        in_horizon &= offset <= cfg.fai_h_hi
    fai_sum = (probs * in_horizon).sum(dim=1)[:, response_start:]  # column sums over queries
    counts = fai_counts(num_tokens, cfg, attn.device)[response_start:]
    fai = torch.where(counts > 0, fai_sum / counts.clamp(min=1), torch.full_like(fai_sum, math.nan))
    return HeadStats(span=span.to(attn.dtype), waad=waad, fai=fai)


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    response_start: int,
    cfg: AnchorConfig,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> HeadStats:
    """Fast path: the statistics of `reference_stats` from post-RoPE `q (Hq, N, D)`, `k (Hkv, N, D)`.

    GQA: query head h reads kv head h // (Hq // Hkv). Never builds an `N x N` tensor.
    """
    _check_start(response_start, q.shape[1] if q.dim() == 3 else -1)
    stats = token_stats(q, k, cfg, scale=scale, first=response_start, chunk_size=chunk_size)
    return stats.response(response_start)


def token_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: AnchorConfig,
    scale: float | None = None,
    first: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> TokenStats:
    """Per-token statistics of positions `first..N-1` (see `TokenStats`), in chunks of queries.

    Accumulates in float32 (float64 inputs stay float64). Memory: O(H * N * (chunk + band)).
    """
    q, k = _check_qk(q, k, first, chunk_size)
    num_heads, num_tokens, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.to(dtype)
    device = q.device
    width = num_tokens - first
    row_span = torch.empty(num_heads, width, dtype=dtype, device=device)
    waad = torch.empty_like(row_span)
    fai_sum = torch.zeros(num_heads, num_tokens, dtype=dtype, device=device)
    band = cfg.band
    # Distances within N tokens are below N, so min(t - s, W) = min(t - s, min(W, N)); the smaller cap keeps
    # the near-diagonal weights and views O(N) for any window.
    window = min(cfg.window, max(num_tokens, 1))
    blocks = _BlockGeometry(cfg, window, dtype, device)
    for t0 in range(first, num_tokens, chunk_size):
        t1 = min(num_tokens, t0 + chunk_size)
        # Keys before `ks` lie beyond every offset WAAD/FAI read: only their mass and mean distance matter.
        ks = 0 if band is None else max(0, t0 - band)
        q_chunk = q[:, t0:t1].to(dtype)
        prefix = _prefix_moments(q_chunk, k[:, :ks], scale) if ks > 0 else None
        if prefix is None:
            ks = 0  # no fused kernel (or nothing before the band): score the whole prefix densely
        block = blocks.get(t1 - t0, t0 - ks, keep=ks > 0)
        # One exp per score: shift by the row max, normalise once the whole row's log-sum-exp is known.
        probs = _grouped_scores(q_chunk * scale, k[:, ks:t1])
        probs[:, :, t0 - ks :].masked_fill_(block.future, -math.inf)
        row_max = probs.amax(dim=-1)
        band_sum = probs.sub_(row_max[..., None]).exp_().sum(dim=-1)
        lse = row_max + band_sum.log()
        if prefix is not None:
            prefix_lse, prefix_mean_dist = prefix
            lse = torch.logaddexp(lse, prefix_lse)
        norm = torch.exp(row_max - lse)
        probs.mul_(norm[..., None])
        mass = band_sum * norm
        rows = slice(t0 - first, t1 - first)
        row_span[:, rows] = (probs * block.dist).sum(dim=-1)
        if prefix is not None:
            prefix_mass = torch.exp(prefix_lse - lse)
            mass = mass + prefix_mass
            # sum_{s<ks} A[t,s] (t - s) = mass * ((t - ks) + mean(ks - s)); each such t - s >= window.
            row_span[:, rows] += prefix_mass * (
                torch.arange(t0 - ks, t1 - ks, device=device, dtype=dtype) + prefix_mean_dist
            )
        # min(t - s, W) = W - max(W - (t - s), 0): only the W nearest keys of each query differ from W.
        waad[:, rows] = window * mass - block.near_diagonals(probs) @ blocks.near_weights
        fai_sum[:, ks:t1] += (probs * block.horizon).sum(dim=1)
    counts = fai_counts(num_tokens, cfg, device)[first:]
    fai_part = fai_sum[:, first:]
    fai = torch.where(counts > 0, fai_part / counts.clamp(min=1), torch.full_like(fai_part, math.nan))
    return TokenStats(row_span=row_span, waad=waad, fai=fai, first=first)


def attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    first: int = 0,
    bins: int = 128,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Attention among positions `first..N-1`, mean-pooled per head to `(H, B, B)`, `B = min(bins, N - first)`.

    Positions `first..N-1` are cut into `B` contiguous runs of near-equal length (position `first + i`
    is in bin `i * B // (N - first)`); cell `[h, i, j]` is the mean over the queries of run `i` of the
    attention mass head `h` puts on the keys of run `j`. Rows sum to at most 1: the rest is on keys
    before `first`. For figures of long sequences: memory is O(H * chunk * N), never `N x N`.
    """
    q, k = _check_qk(q, k, first, chunk_size)
    if bins < 1:
        raise ValueError(f"bins={bins} is invalid: use an integer >= 1")
    num_heads, num_tokens, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    width = num_tokens - first
    num_bins = min(bins, width)
    pooled = torch.zeros(num_heads, num_bins, num_bins, dtype=dtype, device=q.device)
    if width == 0:
        return pooled
    bin_of = torch.arange(width, device=q.device) * num_bins // width
    k = k.to(dtype)
    for t0 in range(first, num_tokens, chunk_size):
        t1 = min(num_tokens, t0 + chunk_size)
        scores = _grouped_scores(q[:, t0:t1].to(dtype), k[:, :t1]) * scale
        future = torch.arange(t0, t1, device=q.device)[:, None] < torch.arange(t1, device=q.device)[None, :]
        probs = torch.softmax(scores.masked_fill_(future, -math.inf), dim=-1)[..., first:]
        by_key_bin = probs.new_zeros(num_heads, t1 - t0, num_bins).index_add_(2, bin_of[: t1 - first], probs)
        pooled.index_add_(1, bin_of[t0 - first : t1 - first], by_key_bin)
    return pooled / torch.bincount(bin_of, minlength=num_bins).to(dtype)[None, :, None]


def group_heads(span: torch.Tensor, cfg: AnchorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Local and global head groups (spec §2, Eq. 8): the `m` smallest and `m` largest spans,
    `m = max(1, floor(head_quantile * H))`.

    `span (H,)` gives `(m,)` long tensors of head indices; `span (H, S)` (one column per sequence, rows in
    global (layer, head) order: the batched path) gives `(S, m)`. Stable ascending sort: ties keep head order.
    """
    if span.dim() not in (1, 2) or span.shape[0] == 0:
        raise ValueError(f"span must be (H,) or (H, S) with H >= 1, got shape {tuple(span.shape)}")
    num_heads = span.shape[0]
    m = max(1, floor_count(cfg.head_quantile, num_heads))
    order = torch.sort(span.movedim(0, -1), dim=-1, stable=True).indices
    return order[..., :m], order[..., num_heads - m :]


def group_signals(stats: HeadStats, cfg: AnchorConfig) -> GroupSignals:
    """WAAD averaged over the local group and FAI over the global group (spec §2-3)."""
    loc, glob = group_heads(stats.span, cfg)
    return GroupSignals(
        waad=stats.waad[loc].mean(dim=0),
        fai=stats.fai[glob].mean(dim=0),
        span_loc=float(stats.span[loc].mean()),
        span_glob=float(stats.span[glob].mean()),
    )


def response_signals(stats: TokenStats, response_length: int, cfg: AnchorConfig) -> GroupSignals:
    """Group signals of the response that ends a captured sequence and has `response_length` tokens.

    An empty response gives empty vectors and NaN spans (a degenerate response, see `credit`).
    """
    if response_length == 0:
        empty = stats.waad.new_zeros(0)
        return GroupSignals(waad=empty, fai=empty.clone(), span_loc=math.nan, span_glob=math.nan)
    end = stats.first + stats.waad.shape[1]
    return group_signals(stats.response(end - int(response_length)), cfg)


class _BlockGeometry:
    """Constant tensors of a `c x w` block of queries `t0..t0+c-1` and keys `t0-lead..t0+c-1`
    (`lead = t0 - ks`). All full chunks past the first band share one (`lead = band`), kept for the call;
    blocks that start at key 0 (the first band, analysis mode, the dense fallback) differ per chunk and
    are not kept, so memory stays linear in N."""

    def __init__(self, cfg: AnchorConfig, window: int, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg, self.window, self.dtype, self.device = cfg, window, dtype, device
        self._cache: dict[tuple[int, int], _BlockGeometry.Block] = {}
        self.near_weights = torch.arange(1, window + 1, dtype=dtype, device=device)  # W - d for d = W-1..0

    @dataclasses.dataclass
    class Block:
        future: torch.Tensor  # (c, c) bool: key after query, within the chunk's own columns
        dist: torch.Tensor  # (c, w) t - s, 0 for future keys
        horizon: torch.Tensor  # (c, w) 1 where fai_h_lo <= t - s <= fai_h_hi
        lead: int
        window: int

        def near_diagonals(self, probs: torch.Tensor) -> torch.Tensor:
            """`(H, c, W)` view of `probs[h, i, key t - d]` for d = W-1 .. 0 (zeros for keys before the block)."""
            missing = max(0, self.window - 1 - self.lead)
            if missing:
                probs = torch.nn.functional.pad(probs, (missing, 0))
            heads, chunk, width = probs.shape
            return probs.as_strided(
                (heads, chunk, self.window),
                (chunk * width, width + 1, 1),
                probs.storage_offset() + self.lead + missing - (self.window - 1),
            )

    def get(self, chunk: int, lead: int, keep: bool) -> _BlockGeometry.Block:
        """The block of `chunk` queries with `lead` keys before them; `keep` it for later chunks of the call."""
        block = self._cache.get((chunk, lead))
        if block is None:
            cfg = self.cfg
            offset = (
                torch.arange(chunk, device=self.device)[:, None]
                + lead
                - torch.arange(chunk + lead, device=self.device)[None, :]
            )  # [i, j] = t - s
            horizon = offset >= cfg.fai_h_lo
            if cfg.fai_h_hi is not None:
                horizon &= offset <= cfg.fai_h_hi
            block = self.Block(
                future=offset[:, lead:] < 0,
                dist=offset.clamp(min=0).to(self.dtype),
                horizon=horizon.to(self.dtype),
                lead=lead,
                window=self.window,
            )
            if keep:
                self._cache[chunk, lead] = block
        return block


def prepare_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one check and normalisation of post-RoPE `q (Hq, N, D)`, `k (Hkv, N, D)` for every statistics entry point
    (`token_stats`, `attention_stats`, `attention_map`, `stats_engine.packed_token_stats` on either backend).

    Refuses other shapes, `Hq` not a multiple of `Hkv` and non-float tensors; gives both one dtype (their
    promotion) and unit stride along `D`: torch's fused CPU attention misreads other strides (WAAD off by 0.1),
    and the kernels index `D` contiguously. Tensors that already qualify are returned as they are (no copy).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be (Hq, N, D) and k (Hkv, N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[0] == 0 or q.shape[0] % k.shape[0]:
        raise ValueError(f"query heads ({q.shape[0]}) must be a multiple of key heads ({k.shape[0]})")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    if q.dtype != k.dtype:  # (promote_types is itself a dispatched op: not called per layer when they agree)
        dtype = torch.promote_types(q.dtype, k.dtype)
        q, k = q.to(dtype), k.to(dtype)
    return _unit_last_stride(q), _unit_last_stride(k)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_qk(q: torch.Tensor, k: torch.Tensor, first: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = prepare_qk(q, k)
    _check_start(first, q.shape[1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid: use an integer >= 1")
    return q, k


def _check_start(response_start: int, num_tokens: int) -> None:
    if not 0 <= response_start <= num_tokens:
        raise ValueError(f"response_start={response_start} must lie in 0..N (N = {num_tokens})")


def _grouped_scores(q_chunk: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`q_chunk (Hq, c, D) @ keys (Hkv, w, D)^T` -> `(Hq, c, w)` without repeating keys per query head."""
    num_heads, chunk, head_dim = q_chunk.shape
    num_kv, width, _ = keys.shape
    grouped = q_chunk.reshape(num_kv, (num_heads // num_kv) * chunk, head_dim)
    return torch.bmm(grouped, keys.transpose(1, 2)).view(num_heads, chunk, width)


# (device type, dtype) pairs with no fused kernel: only a definite "no kernel" is remembered.
_FUSED_BROKEN: set[tuple[str, torch.dtype]] = set()
# What torch says when no kernel serves a dtype: the dispatcher's "not implemented for 'Half'", the CPU
# kernel's "Expected data type in FP32, ...", the CUDA memory-efficient kernel's "cutlassF: no kernel found".
_NO_KERNEL = ("not implemented for", "expected data type", "no kernel found")


def _prefix_moments(
    q_chunk: torch.Tensor, keys: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row log-sum-exp and mean distance `sum_s p(s) (ks - s)` of `q_chunk` over all keys `s < ks`.

    One fused attention call with values = distances (column 0 of V; kernels want V as wide as Q).
    Distances are measured from the band edge `ks`, not from 0, so float32 keeps them exact enough.
    Returns None where no fused kernel serves this device/dtype, or when this call's kernel failed (an
    out-of-memory error, say); the caller then scores densely. Only the first is remembered.
    """
    key = (q_chunk.device.type, q_chunk.dtype)
    if key in _FUSED_BROKEN:
        return None
    num_kv, prefix_len, head_dim = keys.shape
    values = torch.zeros(1, 1, prefix_len, head_dim, dtype=q_chunk.dtype, device=q_chunk.device)
    values[0, 0, :, 0] = torch.arange(prefix_len, 0, -1, device=q_chunk.device, dtype=q_chunk.dtype)
    try:
        out, lse = _fused_attention(q_chunk[None], keys[None], values.expand(1, num_kv, prefix_len, head_dim), scale)
    except (RuntimeError, NotImplementedError) as err:
        if isinstance(err, NotImplementedError) or any(text in str(err).lower() for text in _NO_KERNEL):
            logger.warning("no fused attention kernel for %s/%s (%s); using the dense chunked path", *key, err)
            _FUSED_BROKEN.add(key)
        else:  # transient (out of memory, ...): this call only
            logger.warning("fused attention kernel failed for %s/%s (%s); dense path for this call", *key, err)
        return None
    return lse[0, :, : q_chunk.shape[1]].to(q_chunk.dtype), out[0, :, :, 0].to(q_chunk.dtype)


def _fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention that also returns the row log-sum-exp, from the fused kernel
    `stats_engine.fused_attention_kernel` picks for the device."""
    from verl_anchor.core import stats_engine  # here, not at the top: stats_engine imports this module

    kernel = stats_engine.fused_attention_kernel(q.device)
    if kernel is None:
        raise NotImplementedError(f"no fused attention kernel for device {q.device.type}")
    return kernel(q, k, v, scale)
