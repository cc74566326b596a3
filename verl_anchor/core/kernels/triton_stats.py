"""Triton kernels: per-token attention statistics of packed variable-length sequences (spec §2-3).

Two passes per captured layer, each one launch for every sequence and head of a micro-batch:

* `_row_pass`, one program per (query tile, query head): runs over the tile's causal keys with
  flash-style online rescaling and keeps, per query t, the log-sum-exp and the moments
  `sum_s p(s) (t - s)` (row span) and `sum_s p(s) min(t - s, W)` (WAAD).
* `_fai_pass`, one program per (key tile, query head): recomputes `p = exp(q.k * scale - lse)` for
  the queries of the FAI band `[s + lo, s + hi]` of its keys (to the end of the sequence when the
  horizon is unbounded) and sums them. One program owns its keys, so there are no atomics and the
  result is deterministic.

Tiles start at each sequence's first token (see `PackedSequences.tiles`), so a sequence's numbers
do not depend on what else is packed around it. GQA: query head h reads key head h // (Hq / Hkv)
in place. Scores and each tile's sums are float32; the running sums across key tiles are float64,
so their rounding does not grow with the number of tiles (a few float64 operations per row and
tile; at 8k tokens the mean span of a sequence came within 3e-9 relative of float64 in the
interpreter, the per-token spans within 2e-6, set by the float32 scores). Distances are exact
integers `t - s` within a sequence, never absolute positions.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import triton
import triton.language as tl

TILE = 64  # tokens per program: query tile of the row pass, key tile of the FAI pass (16-bit inputs)
INNER = 64  # tokens per step inside a program (key step of the row pass, query step of the FAI pass)
# float32 dots run on CUDA cores (input_precision="ieee"), each thread holding its rows and columns of both
# operands over all of D: at 64 x 64 (and 32 x 32) the row pass spills on sm_80/sm_90 (D=128: ~28 KB of spill
# stores); 16 x 16 compiles clean (tests/test_kernels_compile.py, docs/performance.md).
FLOAT32_TILE = FLOAT32_INNER = 16
_LOG2E = math.log2(math.e)  # scores go to exp2
logger = logging.getLogger(__name__)


@triton.jit
def _row_tile(q, k_head, stride_kt, key0, rows, seq_end, dims, m_i, mass, span, waad, scale_log2e,
              HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr, FAR: tl.constexpr, DIAGONAL: tl.constexpr):
    """One key tile of the row pass: online rescaling of the running max, mass and moments."""
    keys = key0 + tl.arange(0, BLOCK_N)
    k_mask = (dims[:, None] < HEAD_DIM) & (keys[None, :] < seq_end)
    kt = tl.load(k_head + keys.to(tl.int64)[None, :] * stride_kt + dims[:, None], mask=k_mask, other=0.0)
    scores = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2e  # log2 units
    dist = (rows[:, None] - keys[None, :]).to(tl.float32)
    if DIAGONAL:
        scores = tl.where((dist >= 0) & (keys[None, :] < seq_end), scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new).to(tl.float64)
    tile_mass = tl.sum(p, 1)
    mass = mass * alpha + tile_mass.to(tl.float64)
    span = span * alpha + tl.sum(p * dist, 1).to(tl.float64)
    if FAR:  # every distance here is >= WINDOW: min(t - s, W) = W
        waad = waad * alpha + (tile_mass * WINDOW).to(tl.float64)
    else:
        waad = waad * alpha + tl.sum(p * tl.minimum(dist, WINDOW), 1).to(tl.float64)
    return m_new, mass, span, waad


@triton.jit(do_not_specialize=["num_tokens"])  # one compilation for every micro-batch size
def _row_pass(Q, K, TILES, ROW_SPAN, WAAD, LSE2, stride_qh, stride_qt, stride_kh, stride_kt, num_tokens,
              scale_log2e, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq_start = tl.load(TILES + 3 * tile)
    seq_end = tl.load(TILES + 3 * tile + 1)
    tile_start = tl.load(TILES + 3 * tile + 2)
    rows = tile_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_end
    q = tl.load(Q + head * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    k_head = K + (head // GROUP) * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float64)
    span = tl.zeros([BLOCK_M], dtype=tl.float64)
    waad = tl.zeros([BLOCK_M], dtype=tl.float64)
    # Key tiles ending at least WINDOW before the query tile need no min(); then the rest below the
    # diagonal; then the diagonal tiles, the only ones with a causal mask.
    far_end = seq_start + (tl.maximum(tile_start - seq_start - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    for key0 in range(seq_start, far_end, BLOCK_N):
        m_i, mass, span, waad = _row_tile(q, k_head, stride_kt, key0, rows, seq_end, dims, m_i, mass, span, waad,
                                          scale_log2e, HEAD_DIM, WINDOW, BLOCK_N, DOT_PRECISION, True, False)
    for key0 in range(far_end, tile_start, BLOCK_N):
        m_i, mass, span, waad = _row_tile(q, k_head, stride_kt, key0, rows, seq_end, dims, m_i, mass, span, waad,
                                          scale_log2e, HEAD_DIM, WINDOW, BLOCK_N, DOT_PRECISION, False, False)
    for key0 in range(tile_start, tl.minimum(tile_start + BLOCK_M, seq_end), BLOCK_N):
        m_i, mass, span, waad = _row_tile(q, k_head, stride_kt, key0, rows, seq_end, dims, m_i, mass, span, waad,
                                          scale_log2e, HEAD_DIM, WINDOW, BLOCK_N, DOT_PRECISION, False, True)
    out = head * num_tokens + rows
    tl.store(ROW_SPAN + out, (span / mass).to(tl.float32), mask=row_ok)
    tl.store(WAAD + out, (waad / mass).to(tl.float32), mask=row_ok)
    tl.store(LSE2 + out, m_i + tl.log2(mass.to(tl.float32)), mask=row_ok)


@triton.jit(do_not_specialize=["num_tokens"])
def _fai_pass(Q, K, TILES, LSE2, FAI, stride_qh, stride_qt, stride_kh, stride_kt, num_tokens, scale_log2e,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, FAI_LO: tl.constexpr, FAI_HI: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """FAI_HI < 0 means an unbounded horizon (to the end of the sequence)."""
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq_end = tl.load(TILES + 3 * tile + 1)
    tile_start = tl.load(TILES + 3 * tile + 2)
    keys = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kt = tl.load(K + (head // GROUP) * stride_kh + keys.to(tl.int64)[None, :] * stride_kt + dims[:, None],
                 mask=(dims[:, None] < HEAD_DIM) & (keys[None, :] < seq_end), other=0.0)
    q_head = Q + head * stride_qh
    lse_head = LSE2 + head * num_tokens
    if FAI_HI >= 0:
        query_stop = tl.minimum(seq_end, tile_start + BLOCK_N + FAI_HI)
    else:
        query_stop = seq_end
    total = tl.zeros([BLOCK_N], dtype=tl.float64)
    for query0 in range(tile_start + FAI_LO, query_stop, BLOCK_M):
        rows = query0 + tl.arange(0, BLOCK_M)
        row_ok = rows < query_stop
        q = tl.load(q_head + rows.to(tl.int64)[:, None] * stride_qt + dims[None, :],
                    mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        lse2 = tl.load(lse_head + rows, mask=row_ok, other=0.0)
        scores = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2e
        dist = rows[:, None] - keys[None, :]
        in_band = row_ok[:, None] & (dist >= FAI_LO)
        if FAI_HI >= 0:
            in_band = in_band & (dist <= FAI_HI)
        p = tl.where(in_band, tl.exp2(scores - lse2[:, None]), 0.0)
        total += tl.sum(p, 0).to(tl.float64)
    last = seq_end - 1
    if FAI_HI >= 0:
        last = tl.minimum(last, keys + FAI_HI)
    count = last - (keys + FAI_LO) + 1  # |T(s)|
    fai = tl.where(count > 0, total / tl.maximum(count, 1).to(tl.float64), float("nan"))
    tl.store(FAI + head * num_tokens + keys, fai.to(tl.float32), mask=keys < seq_end)


LAUNCH_OPTIONS = dict(num_warps=4, num_stages=2)
MAX_BLOCK_D = 128  # the largest head-dim block the compile check (tests/test_kernels_compile.py) covers
CHECKED_MAJORS = (8, 9)  # compute capabilities compiled and checked: sm_80 and sm_90 (and their 8.x/9.x kin)


def block_sizes(dtype: torch.dtype) -> tuple[int, int]:
    """`(tile, inner)` the launcher uses for inputs of `dtype`: the sizes that compile without spills."""
    return (FLOAT32_TILE, FLOAT32_INNER) if dtype == torch.float32 else (TILE, INNER)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def launch_constexprs(dtype: torch.dtype, head_dim: int, group: int, window: int, fai_h_lo: int,
                      fai_h_hi: int | None, tile: int, inner: int) -> tuple[dict, dict]:
    """The compile-time constants of the row pass and of the FAI pass of one call (the compile check
    compiles exactly these). FAI_HI < 0: unbounded horizon."""
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim),
                  DOT_PRECISION="ieee" if dtype == torch.float32 else None)
    return (dict(common, WINDOW=window, BLOCK_M=tile, BLOCK_N=inner),
            dict(common, FAI_LO=fai_h_lo, FAI_HI=-1 if fai_h_hi is None else fai_h_hi, BLOCK_M=inner, BLOCK_N=tile))


def shared_memory_bytes(dtype: torch.dtype, head_dim: int) -> int:
    """Shared memory per program the kernels need for `dtype` inputs: a query and a key block of `BLOCK_D`
    (pipelined operands) plus row scratch. An upper bound of what triton allocates: the compile check asserts
    it for every combination the launcher uses."""
    tile, inner = block_sizes(dtype)
    return (tile + inner) * block_d(head_dim) * dtype.itemsize + 16 * (tile + inner)


def device_problem(capability: tuple[int, int], shared_memory_per_block: int | None, head_dim: int) -> str | None:
    """Why the kernels cannot run on a CUDA device of `capability` with `shared_memory_per_block` bytes (opt-in
    maximum; None: unknown, not checked) for `head_dim`; None where they can."""
    major, minor = capability
    if major not in CHECKED_MAJORS:
        return (f"compute capability {major}.{minor}: the kernels are compiled and checked for sm_80 and sm_90 "
                "(on sm_75 the row pass spills registers and is at the shared-memory limit)")
    if block_d(head_dim) > MAX_BLOCK_D:
        return f"head dim {head_dim}: the kernels are compiled and checked for head dims up to {MAX_BLOCK_D}"
    need = max(shared_memory_bytes(dtype, head_dim) for dtype in (torch.float16, torch.float32))  # bf16 = fp16
    if shared_memory_per_block is not None and need > shared_memory_per_block:
        return (f"head dim {head_dim} needs {need} bytes of shared memory per block, the device allows "
                f"{shared_memory_per_block}")
    return None


@functools.cache
def cuda_device_problem(index: int, head_dim: int) -> str | None:
    """`device_problem` of CUDA device `index`, read from torch's device properties once; a problem is logged
    once, as a warning. Falling back rather than refusing: the torch path computes the same statistics (both
    are tested against one reference), so an older card or a wide head still trains, only slower."""
    shared = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    problem = device_problem(torch.cuda.get_device_capability(index), shared, head_dim)
    if problem is not None:
        logger.warning("attention statistics on cuda:%d take the torch path (the same numbers, slower) instead of "
                       "the Triton kernels: %s", index, problem)
    return problem


def packed_stats(q: torch.Tensor, k: torch.Tensor, tiles: torch.Tensor, window: int, fai_h_lo: int,
                 fai_h_hi: int | None, scale: float, tile: int | None = None,
                 inner: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(row_span, waad, fai)`, each `(Hq, T)` float32, of packed `q (Hq, T, D)`, `k (Hkv, T, D)`.

    `tiles (P, 3)` int32: per program `(sequence start, sequence end, tile start)` for tiles of
    `tile` tokens (`PackedSequences.tiles(tile)`); `tile` must be a multiple of `inner`; both default to
    `block_sizes(q.dtype)`, the sizes the compile check verifies (other sizes: interpreter tests). Two launches.
    The inputs are trusted: `stats_engine.packed_token_stats` checks them (one check for both backends:
    one dtype, unit stride along D, boundaries within T, head slice, option bounds of `AnchorConfig`).
    """
    num_heads, num_tokens, head_dim = q.shape
    default_tile, default_inner = block_sizes(q.dtype)
    tile, inner = tile or default_tile, inner or default_inner
    if tile % inner:
        raise ValueError(f"tile={tile} must be a multiple of inner={inner}")
    row_span, waad, fai, lse2 = (torch.empty(num_heads, num_tokens, dtype=torch.float32, device=q.device)
                                 for _ in range(4))
    if tiles.shape[0] == 0 or num_heads == 0:  # nothing to launch (T = 0 and no sequences)
        return row_span, waad, fai
    row, band = launch_constexprs(q.dtype, head_dim, num_heads // k.shape[0], window, fai_h_lo, fai_h_hi, tile, inner)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), num_tokens, scale * _LOG2E)
    grid = (tiles.shape[0], num_heads)
    _row_pass[grid](q, k, tiles, row_span, waad, lse2, *strides, **row, **LAUNCH_OPTIONS)
    _fai_pass[grid](q, k, tiles, lse2, fai, *strides, **band, **LAUNCH_OPTIONS)
    return row_span, waad, fai


KERNELS = (_row_pass, _fai_pass)  # every launch of this module goes through one of these (launch counting)
