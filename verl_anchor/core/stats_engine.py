"""Attention statistics of a whole packed micro-batch: one call per captured layer, no per-sequence host work.

A micro-batch is packed along the token axis: `q (Hq, T, D)`, `k (Hkv, T, D)` and `cu_seqlens (S+1,)`
(sequence i is tokens `cu_seqlens[i]:cu_seqlens[i+1]`, `cu_seqlens[0] = 0`, `cu_seqlens[-1] = T`).

* `packed_token_stats` gives every sequence's per-token statistics (`metrics.TokenStats` with
  `first = 0`, side by side along the token axis); `verl_anchor.capture.hooks` calls it once per captured
  layer per forward. This module is the one place that dispatches by device (`select_backend`;
  `fused_attention_kernel` within the torch path): CUDA tensors go to the Triton kernels of
  `kernels.triton_stats` (two launches per call, whatever the number or length of the sequences)
  where the device can run them (`kernel_device_problem`, asked at start-up by the capture); everything else to
  `metrics.token_stats`, looped over the sequences on the host. `metrics.reference_stats` is the
  oracle for both, and both get the same checked inputs.
* `response_head_span`, `metrics.group_heads` and `group_means` (composed by `packed_response_signals`)
  take these to the worker's outputs for responses that end their sequences: per-sequence head
  spans, head groups (spec §2) and the group-mean WAAD and FAI of every response token, packed
  with offsets. Pure torch, without host syncs except one for the number of response tokens
  when the caller does not pass it.

Every per-sequence number depends only on that sequence, computed in the same order wherever it
sits in the micro-batch: a sequence alone and packed among others gives bitwise equal statistics.

Sequence parallelism: a rank holding query heads `head_offset .. head_offset + Hq - 1` of
`num_heads_total` (and the key heads they read) passes them with `head_offset`; the statistics
remember each row's global head index (`head_ids`). Head groups need the spans of all heads:
all-gather `response_head_span` rows into global order, call `metrics.group_heads`, then `group_means` on
each rank gives that rank's share of the group means; their sum over the ranks is the mean.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Callable, Sequence

import torch

from verl_anchor.core.config import AnchorConfig
from verl_anchor.core.metrics import DEFAULT_CHUNK, GroupSignals, TokenStats, group_heads, prepare_qk, token_stats

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SPAN_FIXED_POINT = 2.0**24  # resolution of the exact (integer) span sums: ~6e-8 tokens
# Tokens of one micro-batch at most: the kernels index tokens in int32, and a token index plus the largest
# option offset (config.MAX_OFFSET = 2^24) plus a tile must stay below 2^31.
MAX_TOKENS = 2**30


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Sequence boundaries of a packed micro-batch; build once per forward and pass to every layer's call."""

    cu_seqlens: torch.Tensor  # (S+1,) int64 on the tokens' device
    num_tokens: int  # T
    # The same boundaries on the host, where the caller has them; else read on first use of `bounds`.
    host_bounds: tuple[int, ...] | None = dataclasses.field(default=None, compare=False, repr=False)
    _tiles: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _checked: bool = dataclasses.field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cu_seqlens.dim() != 1 or self.cu_seqlens.numel() < 1 or self.cu_seqlens.is_floating_point():
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor (S+1,), got {self.cu_seqlens.dtype} "
                f"of shape {tuple(self.cu_seqlens.shape)}"
            )
        if not 0 <= self.num_tokens <= MAX_TOKENS:
            raise ValueError(
                f"num_tokens={self.num_tokens} is invalid: a micro-batch holds 0..{MAX_TOKENS} tokens "
                "(the kernels index tokens in int32); split it into smaller micro-batches"
            )
        object.__setattr__(self, "cu_seqlens", self.cu_seqlens.long())

    @classmethod
    def built_valid(cls, cu_seqlens: torch.Tensor, num_tokens: int) -> PackedSequences:
        """For boundaries that rise from 0 to T by construction (a cumsum of lengths padded with 0, sorted
        sequence starts from 0 padded with T): `check` then reads nothing (the capture's layouts, no extra sync)."""
        sequences = cls(cu_seqlens, num_tokens)
        object.__setattr__(sequences, "_checked", True)
        return sequences

    def check(self) -> None:
        """Refuse boundaries that do not rise from 0 to T (the kernels would read and write out of bounds, or
        leave tokens unwritten). Reads `bounds`: one host sync per `PackedSequences` where the caller did not pass
        them, shared by the layers of a forward; the torch path reads them anyway. Meta tensors (launch
        counting) hold no values and are not read."""
        if self._checked or self.cu_seqlens.device.type == "meta":
            return
        bounds = self.bounds
        if (
            len(bounds) != self.num_sequences + 1
            or bounds[0] != 0
            or bounds[-1] != self.num_tokens
            or any(b < a for a, b in zip(bounds, bounds[1:]))
        ):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {self.num_tokens}, got {list(bounds)}")
        object.__setattr__(self, "_checked", True)

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def bounds(self) -> tuple[int, ...]:
        """`cu_seqlens` on the host: read from the device once (one sync), then cached. For host-side consumers."""
        if self.host_bounds is None:
            object.__setattr__(self, "host_bounds", tuple(self.cu_seqlens.tolist()))
        return self.host_bounds

    def tiles(self, tile: int) -> torch.Tensor:
        """`(P, 3)` int32 `(sequence start, sequence end, tile start)` of every `tile`-token tile.

        Tiles start at each sequence's first token. `P = ceil(T / tile) + S` bounds their number without
        reading `cu_seqlens` on the host; the spare rows are empty `(0, 0, 0)`.
        """
        if tile not in self._tiles:
            cu = self.cu_seqlens
            per_sequence = (cu.diff() + tile - 1) // tile
            first_tile = torch.nn.functional.pad(per_sequence.cumsum(0), (1, 0))
            index = torch.arange(-(-self.num_tokens // tile) + self.num_sequences, device=cu.device)
            sequence = torch.searchsorted(first_tile, index, right=True) - 1  # S past the last tile
            real = sequence < self.num_sequences
            sequence = sequence.clamp(max=max(self.num_sequences - 1, 0))
            start = cu[sequence]
            table = torch.stack([start, cu[sequence + 1], start + (index - first_tile[sequence]) * tile], dim=1)
            self._tiles[tile] = (table * real[:, None]).to(torch.int32)
        return self._tiles[tile]


@dataclasses.dataclass
class PackedTokenStats:
    """`row_span`, `waad`, `fai`, each `(H, T)`: per head, what `metrics.token_stats` gives each sequence.

    Rows are `num_layers` blocks (layer order) of the same query heads `head_offset ..` of each layer's
    `num_heads_total`; `head_ids` are their global (layer, head) indices.
    """

    row_span: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor
    sequences: PackedSequences
    head_offset: int
    num_heads_total: int  # query heads of one layer, over all ranks
    num_layers: int = 1

    @property
    def heads_per_layer(self) -> int:
        return self.row_span.shape[0] // self.num_layers

    @property
    def head_ids(self) -> tuple[int, ...]:
        return tuple(
            layer * self.num_heads_total + self.head_offset + h
            for layer in range(self.num_layers)
            for h in range(self.heads_per_layer)
        )

    def rows_of(self, heads: torch.Tensor) -> torch.Tensor:
        """The row of each global head index in `heads` (same shape), -1 where these statistics do not hold it."""
        layer, head = heads // self.num_heads_total, heads % self.num_heads_total - self.head_offset
        held = (head >= 0) & (head < self.heads_per_layer)
        return torch.where(held, layer * self.heads_per_layer + head, -1)

    def to_token_stats(self) -> list[TokenStats]:
        """One `TokenStats` per sequence (views). Reads the boundaries on the host: for CPU-side consumers."""
        bounds = self.sequences.bounds
        return [
            TokenStats(row_span=self.row_span[:, a:b], waad=self.waad[:, a:b], fai=self.fai[:, a:b])
            for a, b in zip(bounds[:-1], bounds[1:])
        ]

    def first_sequences(self, num_sequences: int, num_tokens: int) -> PackedTokenStats:
        """The statistics of the first `num_sequences` sequences, which end at token `num_tokens` (the caller
        knows where: nothing is read from the device). Drops e.g. the padding a packed row ends with."""
        bounds = self.sequences.host_bounds
        sequences = PackedSequences(
            self.sequences.cu_seqlens[: num_sequences + 1],
            num_tokens,
            host_bounds=None if bounds is None else bounds[: num_sequences + 1],
        )
        return dataclasses.replace(
            self,
            row_span=self.row_span[:, :num_tokens],
            waad=self.waad[:, :num_tokens],
            fai=self.fai[:, :num_tokens],
            sequences=sequences,
        )


@dataclasses.dataclass
class PackedResponseSignals:
    """Group signals of every response of a micro-batch (each response ends its sequence).

    `waad`, `fai` `(R,)`: response i is `[cu_response[i]:cu_response[i+1]]` (`metrics.GroupSignals` of
    each response, packed); `span_loc`, `span_glob` `(S,)` (NaN for an empty response);
    `local_heads`, `global_heads` `(S, m)` global head indices of each sequence's groups.
    """

    waad: torch.Tensor
    fai: torch.Tensor
    cu_response: torch.Tensor
    span_loc: torch.Tensor
    span_glob: torch.Tensor
    local_heads: torch.Tensor
    global_heads: torch.Tensor

    def to_group_signals(self) -> list[GroupSignals]:
        """One `metrics.GroupSignals` per response. Reads offsets and spans on the host."""
        bounds = self.cu_response.tolist()
        spans = zip(self.span_loc.tolist(), self.span_glob.tolist())
        return [
            GroupSignals(waad=self.waad[a:b], fai=self.fai[a:b], span_loc=loc, span_glob=glob)
            for a, b, (loc, glob) in zip(bounds[:-1], bounds[1:], spans)
        ]


def select_backend(q: torch.Tensor) -> str:
    """The one dispatch by device: "triton" for CUDA tensors of 16/32-bit floats where triton is
    installed and the device can run the kernels for q's head dim (`kernel_device_problem`), "torch"
    (`metrics.token_stats` per sequence) everywhere else."""
    if (
        q.device.type == "cuda"
        and q.dtype in KERNEL_DTYPES
        and _triton_installed()
        and kernel_device_problem(q.device, q.shape[-1]) is None
    ):
        return "triton"
    return "torch"


def kernel_device_problem(device: torch.device, head_dim: int) -> str | None:
    """Why the Triton kernels cannot run on CUDA `device` for `head_dim` (None: they can, or no triton): read once
    per (device, head dim) and warned about once; those statistics take the torch path, the same numbers, slower
    (`triton_stats.cuda_device_problem`). `AttentionCapture` asks when built, so this is decided at start-up."""
    if not _triton_installed():
        return None
    from verl_anchor.core.kernels import triton_stats

    return triton_stats.cuda_device_problem(
        torch.cuda.current_device() if device.index is None else device.index, head_dim
    )


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


FusedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def fused_attention_kernel(device: torch.device) -> FusedAttention | None:
    """The torch path's dispatch by device: torch's fused attention kernel that also returns the row
    log-sum-exp (`metrics._prefix_moments`), or None where the device has none (the dense chunked path)."""
    return {"cpu": _cpu_fused_attention, "cuda": _cuda_fused_attention}.get(device.type)


def _cpu_fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse


def _cuda_fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # the memory-efficient kernel has no GQA: repeat the (prefix) keys
        k, v = k.repeat_interleave(groups, dim=1), v.expand(-1, q.shape[1], -1, -1)
    # float32 is kept on purpose: the flash kernels accept only 16-bit inputs, too coarse for distances.
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, False, scale=scale
    )
    return out, lse


def packed_token_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor | PackedSequences,
    cfg: AnchorConfig,
    scale: float | None = None,
    head_offset: int = 0,
    num_heads_total: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> PackedTokenStats:
    """Per-token statistics of every sequence of a packed micro-batch, from post-RoPE `q (Hq, T, D)`, `k (Hkv, T, D)`.

    `cu_seqlens`: `(S+1,)` integer tensor on `q`'s device, or a `PackedSequences` built once per forward
    and shared by the layers. `q` holds query heads `head_offset ..` of `num_heads_total` (default: all
    of them, `Hq`); query head h reads key head h // (Hq / Hkv). Float32 results (float64 inputs stay
    float64 on the torch path); `fai` is divided by |T(s)| within each sequence, NaN where T(s) is empty.
    `chunk_size`: queries per step of the torch path (`metrics.token_stats`); the kernels have their own tiles.

    Both backends get the same checked inputs: `metrics.prepare_qk` (shapes, one dtype, unit stride along D),
    then the tokens, device and boundaries of `cu_seqlens` (read once per `PackedSequences`: one host sync
    where the caller did not give `host_bounds`) and a head slice that starts at a key-head group.
    """
    q, k = prepare_qk(q, k)
    sequences = cu_seqlens if isinstance(cu_seqlens, PackedSequences) else PackedSequences(cu_seqlens, q.shape[1])
    num_heads, _, head_dim = q.shape
    total = num_heads if num_heads_total is None else num_heads_total
    _check_inputs(q, k, sequences, head_offset, total)
    scale = head_dim**-0.5 if scale is None else scale
    if select_backend(q) == "triton":
        from verl_anchor.core.kernels import triton_stats

        tiles = sequences.tiles(triton_stats.block_sizes(q.dtype)[0])  # the launcher's tile for this dtype
        row_span, waad, fai = triton_stats.packed_stats(q, k, tiles, cfg.window, cfg.fai_h_lo, cfg.fai_h_hi, scale)
    else:
        row_span, waad, fai = _per_sequence_stats(q, k, sequences, cfg, scale, chunk_size)
    return PackedTokenStats(
        row_span=row_span, waad=waad, fai=fai, sequences=sequences, head_offset=head_offset, num_heads_total=total
    )


def stack_layers(per_layer: Sequence[PackedTokenStats]) -> PackedTokenStats:
    """The heads of several layers' statistics of the same micro-batch, in (layer, head) order."""
    if not per_layer:
        raise ValueError("stack_layers needs the statistics of at least one layer")
    first = per_layer[0]
    layout = (
        first.sequences.num_tokens,
        first.sequences.num_sequences,
        first.head_offset,
        first.num_heads_total,
        first.row_span.shape[0],
        1,
    )
    if any(
        (
            s.sequences.num_tokens,
            s.sequences.num_sequences,
            s.head_offset,
            s.num_heads_total,
            s.row_span.shape[0],
            s.num_layers,
        )
        != layout
        for s in per_layer
    ):
        raise ValueError("stack_layers needs one layer's statistics each, of the same micro-batch and heads")
    return PackedTokenStats(
        row_span=torch.cat([s.row_span for s in per_layer]),
        waad=torch.cat([s.waad for s in per_layer]),
        fai=torch.cat([s.fai for s in per_layer]),
        sequences=first.sequences,
        head_offset=first.head_offset,
        num_heads_total=first.num_heads_total,
        num_layers=len(per_layer),
    )


def response_head_span(stats: PackedTokenStats, response_lengths: torch.Tensor) -> torch.Tensor:
    """Head span (Eq. 7) of each sequence's response, its last `response_lengths[i]` tokens: `(H, S)` float32.

    NaN for an empty response or a non-finite row. The sums are exact: row spans are rounded to
    multiples of 2^-24 and summed as integers (valid while T * N < 5e11), so no sequence's span
    depends on what is packed before it.
    """
    lengths = _response_lengths(stats, response_lengths)
    finite = torch.isfinite(stats.row_span)
    fixed = torch.round(torch.where(finite, stats.row_span, 0).double() * _SPAN_FIXED_POINT).long()
    ends = stats.sequences.cu_seqlens[1:]
    starts = ends - lengths

    def segment_sums(values: torch.Tensor) -> torch.Tensor:
        prefix = torch.nn.functional.pad(values.cumsum(1), (1, 0))
        return prefix[:, ends] - prefix[:, starts]

    span = segment_sums(fixed).double() / _SPAN_FIXED_POINT / lengths.clamp(min=1)
    undefined = (lengths == 0) | (segment_sums((~finite).long()) > 0)
    return torch.where(undefined, math.nan, span).float()


def group_means(
    stats: PackedTokenStats,
    response_lengths: torch.Tensor,
    local_heads: torch.Tensor,
    global_heads: torch.Tensor,
    num_response_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(waad, fai, cu_response)`: WAAD averaged over each sequence's local heads and FAI over its global
    heads, for every response token, packed (`(R,)`, response i at `cu_response[i]:cu_response[i+1]`).

    Heads of the groups that `stats` does not hold count as 0 (sequence parallelism: sum the ranks'
    results). `num_response_tokens` (R) saves the one host sync that otherwise reads it.
    """
    lengths = _response_lengths(stats, response_lengths)
    cu_response = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    if num_response_tokens is None:
        num_response_tokens = int(cu_response[-1])
    token = torch.arange(num_response_tokens, device=lengths.device)
    sequence = torch.searchsorted(cu_response, token, right=True) - 1
    position = stats.sequences.cu_seqlens[1:][sequence] - lengths[sequence] + (token - cu_response[sequence])

    def mean_over(heads: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        rows = stats.rows_of(heads)[sequence]  # (R, m), -1 where this rank does not hold the head
        picked = values[rows.clamp(min=0), position[:, None]]
        return torch.where(rows >= 0, picked, 0).sum(dim=1) / heads.shape[1]

    return mean_over(local_heads, stats.waad), mean_over(global_heads, stats.fai), cu_response


def packed_response_signals(
    stats: PackedTokenStats,
    response_lengths: torch.Tensor,
    cfg: AnchorConfig,
    num_response_tokens: int | None = None,
    head_span: torch.Tensor | None = None,
) -> PackedResponseSignals:
    """`metrics.response_signals` of every sequence at once: spans, groups and group means.

    `head_span (num_heads_total, S)`: the spans of all heads, where `stats` holds only some of them
    (sequence parallelism); by default `response_head_span(stats, ...)`.
    """
    if head_span is None:
        if stats.heads_per_layer != stats.num_heads_total:
            raise ValueError(
                f"stats hold {stats.heads_per_layer} of {stats.num_heads_total} heads: pass head_span "
                "of all heads (gathered over the sequence-parallel ranks)"
            )
        head_span = response_head_span(stats, response_lengths)
    local_heads, global_heads = group_heads(head_span, cfg)
    waad, fai, cu_response = group_means(stats, response_lengths, local_heads, global_heads, num_response_tokens)
    spans = head_span.T
    return PackedResponseSignals(
        waad=waad,
        fai=fai,
        cu_response=cu_response,
        span_loc=spans.gather(1, local_heads).mean(dim=1),
        span_glob=spans.gather(1, global_heads).mean(dim=1),
        local_heads=local_heads,
        global_heads=global_heads,
    )


def _per_sequence_stats(
    q: torch.Tensor, k: torch.Tensor, sequences: PackedSequences, cfg: AnchorConfig, scale: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path: `metrics.token_stats` of each sequence, written into packed outputs."""
    bounds = sequences.bounds  # read once per PackedSequences (by `check`), shared by the layers of a forward
    dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(3, q.shape[0], q.shape[1], dtype=dtype, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            stats = token_stats(q[:, a:b], k[:, a:b], cfg, scale=scale, chunk_size=chunk_size)
            out[0, :, a:b], out[1, :, a:b], out[2, :, a:b] = stats.row_span, stats.waad, stats.fai
    return out[0], out[1], out[2]


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, sequences: PackedSequences, head_offset: int, num_heads_total: int
) -> None:
    """What both backends refuse beyond `metrics.prepare_qk`: tokens or device not those of `sequences`, bad
    boundaries (`PackedSequences.check`), and a head slice that does not map onto its key heads."""
    if sequences.num_tokens != q.shape[1] or sequences.cu_seqlens.device != q.device:
        raise ValueError(
            f"cu_seqlens describe {sequences.num_tokens} tokens on {sequences.cu_seqlens.device}, "
            f"q has {q.shape[1]} on {q.device}"
        )
    num_heads, group = q.shape[0], q.shape[0] // k.shape[0]
    if head_offset < 0 or head_offset + num_heads > num_heads_total:
        raise ValueError(
            f"heads {head_offset}..{head_offset + num_heads - 1} are outside 0..{num_heads_total - 1} "
            f"(head_offset={head_offset}, num_heads_total={num_heads_total})"
        )
    # Query head h reads key head h // group of `k`: right only if the slice starts at a group boundary.
    if head_offset % group or num_heads_total % group:
        raise ValueError(
            f"query heads {head_offset}..{head_offset + num_heads - 1} of {num_heads_total} with "
            f"{k.shape[0]} key head(s) ({group} query heads per key head) cross a key-head group: "
            f"start the slice at a multiple of {group} and pass the key heads its groups read"
        )
    sequences.check()


def _response_lengths(stats: PackedTokenStats, response_lengths: torch.Tensor) -> torch.Tensor:
    if response_lengths.shape != (stats.sequences.num_sequences,):
        raise ValueError(
            f"response_lengths must be ({stats.sequences.num_sequences},), one per sequence, "
            f"got shape {tuple(response_lengths.shape)}"
        )
    lengths = response_lengths.to(stats.sequences.cu_seqlens.device, torch.long)
    if lengths.device.type == "cpu" and bool(((lengths < 0) | (lengths > stats.sequences.cu_seqlens.diff())).any()):
        raise ValueError(
            f"response lengths {lengths.tolist()} must lie in 0..sequence length "
            f"{stats.sequences.cu_seqlens.diff().tolist()}"
        )
    return lengths
