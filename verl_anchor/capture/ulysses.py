"""Ulysses sequence parallelism (verl): exact statistics from the heads each rank holds after the all-to-all.

Under verl's Ulysses SP (`ulysses_sequence_parallel_size > 1`, packed inputs, flash attention) the decoder and the
attention function see a slice of the tokens of every sequence. verl's `_ulysses_flash_attention_forward` (installed
by `apply_monkey_patch`) all-to-alls q, k, v into whole sequences for a contiguous slice of the heads (repeating the
key heads first when there are fewer than ranks), all-gathers position_ids and calls transformers'
`_flash_attention_forward` through the name it imported into its own module (`INNER`). While a capture runs an SP
forward, that name is wrapped: the attention function marks the selected layer whose call is in progress
(`UlyssesForward.pending`) and the wrapper hands the capture q, k `(1, T, H/sp, D)` and the gathered position_ids,
from which it finds the sequences (verl's SP padding is a trailing segment, which the worker drops). Rank r of the
SP group holds query heads `r * H/sp ..` and the key heads they read.

The worker (`integration.worker.anchor_outputs`) combines the ranks: `gather_head_span` gives every rank the spans of
all heads, hence the same head groups, and `sum_over_ranks` adds up each rank's share of the group means, so every SP
rank ends with the same full outputs (verl keeps SP rank 0's). Three collectives per micro-batch, of size
O(heads x sequences + response tokens); no N x N matrix.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from verl_anchor.capture.checks import CaptureError
from verl_anchor.capture.layout import SequenceLayout, find_sequences
from verl_anchor.core.stats_engine import PackedResponseSignals, PackedTokenStats, response_head_span
from verl_anchor.integration import verl_api

INNER = verl_api.PINS[
    "ulysses_flash_attention_forward"
].module  # its `_flash_attention_forward`: what verl's wrapper calls
_FIX = "set actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"


@dataclasses.dataclass
class UlyssesForward:
    """One SP forward in progress on this rank."""

    group: Any
    rank: int
    size: int
    local_length: int  # tokens of this rank's slice
    pending: tuple[int, int, Any, dict] | None = None  # (layer, query heads of all ranks, mask, attention kwargs)


def sequence_parallel_group() -> Any:
    """verl's Ulysses group while one with more than one rank is set (verl's engine sets it around its forwards),
    else None."""
    if verl_api.PINS["get_ulysses_sequence_parallel_group"].module not in sys.modules:
        return None  # not imported: nobody set a group
    group = verl_api.resolve("get_ulysses_sequence_parallel_group")()
    return group if group is not None and dist.get_world_size(group) > 1 else None


def begin(
    group: Any,
    implementation: str,
    call: dict,
    tokens: torch.Tensor,
    maps: bool,
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None],
) -> UlyssesForward:
    """Check the decoder's inputs of an SP forward and wrap verl's inner flash call (`observe` sees each one)."""
    size = dist.get_world_size(group)
    if not implementation.startswith("flash_attention"):  # the rule settings applies at start-up
        raise CaptureError(
            f"Ulysses sequence parallelism over {size} ranks with attn_implementation={implementation!r}: verl "
            "all-to-alls the sequences only inside flash attention, so this attention sees a slice of every sequence; "
            "use actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2 (verl's default), "
            f"or {_FIX}"
        )
    positions = call.get("position_ids")
    if tokens.shape[0] != 1 or call.get("attention_mask") is not None or positions is None or positions.dim() != 2:
        raise CaptureError(
            "under Ulysses sequence parallelism the capture needs verl's packed inputs (one row, 2-D position_ids, no "
            "attention_mask): set actor_rollout_ref.model.use_remove_padding=True, or " + _FIX
        )
    if maps:
        raise CaptureError("attention maps (map_bins) are not computed under Ulysses sequence parallelism: " + _FIX)
    _HOOK.install(observe)
    return UlyssesForward(group, dist.get_rank(group), size, tokens.shape[1])


def gathered_layout(forward: UlyssesForward, query: torch.Tensor, position_ids: torch.Tensor | None) -> SequenceLayout:
    """The sequences of the whole packed row, from the position_ids verl gathered for flash attention."""
    length = forward.local_length * forward.size
    if position_ids is None or query.shape[1] != length or tuple(position_ids.shape) != (1, length):
        raise CaptureError(
            f"verl's Ulysses attention call has {query.shape[1]} tokens and position_ids of shape "
            f"{None if position_ids is None else tuple(position_ids.shape)}, not the {length} tokens of the "
            f"{forward.size} ranks' slices: it did not gather the sequences (no position_ids reached it); " + _FIX
        )
    return find_sequences(1, length, None, position_ids, query.device, flash=True)


def head_offset(forward: UlyssesForward, local_heads: int, num_heads: int) -> int:
    """The first (global) query head this rank holds after the all-to-all."""
    if local_heads * forward.size != num_heads:
        raise CaptureError(
            f"verl's Ulysses all-to-all left {local_heads} of {num_heads} query heads on each of "
            f"{forward.size} ranks; the heads must split evenly: " + _FIX
        )
    return forward.rank * local_heads


def not_reached(layer: int, size: int) -> CaptureError:
    return CaptureError(
        f"layer {layer}: under Ulysses sequence parallelism ({size} ranks) its attention never called {INNER}."
        "_flash_attention_forward, where verl gathers whole sequences; apply verl's apply_monkey_patch(model, "
        "ulysses_sp_size=...) to the model (verl's FSDP engine does), or " + _FIX
    )


class _InnerHook:
    """The wrapper around `INNER._flash_attention_forward`, installed at the first SP forward while captures are
    active and put back when the last capture exits (unless someone replaced it since: theirs stays)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._installed: tuple[Any, Callable, Callable] | None = None  # (module, wrapper, original)

    def install(self, observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]) -> None:
        with self._lock:
            if self._installed is not None:
                return
            module = importlib.import_module(INNER)
            original = verl_api.resolve("ulysses_flash_attention_forward")

            def inner(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                observe(query, key, kwargs.get("position_ids"))
                return original(query, key, *args, **kwargs)

            module._flash_attention_forward = inner
            self._installed = (module, inner, original)

    def remove(self) -> None:
        with self._lock:
            if self._installed is not None:
                module, inner, original = self._installed
                if module._flash_attention_forward is inner:
                    module._flash_attention_forward = original
                self._installed = None


_HOOK = _InnerHook()
remove_hook = _HOOK.remove


def gather_head_span(stats: PackedTokenStats, response_lengths: torch.Tensor, group: Any) -> torch.Tensor:
    """`response_head_span` of all heads, `(num_layers * num_heads_total, S)` in global (layer, head) order, from the
    head slices of the SP group's ranks. Refuses ranks that disagree on the sequences or do not hold each head once
    (all ranks see the same gathered values, so all raise together). Two collectives, two host reads."""
    sequences, device = stats.sequences, stats.row_span.device
    header = torch.tensor(
        [
            sequences.num_sequences,
            sequences.num_tokens,
            stats.num_layers,
            stats.num_heads_total,
            stats.heads_per_layer,
            stats.head_offset,
        ],
        device=device,
    )
    headers = _gather(header, group).tolist()
    if any(h[:5] != headers[0][:5] for h in headers):
        raise RuntimeError(
            "the Ulysses ranks captured different micro-batches: (sequences, tokens, layers, heads, "
            f"heads per rank) per rank {[h[:5] for h in headers]}"
        )
    num_sequences, _, num_layers, num_heads, local = headers[0][:5]
    offsets = [h[5] for h in headers]
    if sorted(offsets) != list(range(0, num_heads, local)):
        raise RuntimeError(
            f"the Ulysses ranks hold query heads from {offsets} ({local} each), not each of the {num_heads} heads once"
        )
    span = response_head_span(stats, response_lengths)
    gathered = _gather(torch.cat([sequences.cu_seqlens.double(), span.double().flatten()]), group)
    bounds = gathered[:, : num_sequences + 1]
    if not bool((bounds == bounds[0]).all()):
        raise RuntimeError(f"the Ulysses ranks found different sequence boundaries: {bounds.long().tolist()}")
    rows = torch.arange(num_layers)[:, None] * num_heads + torch.arange(local)
    ids = (torch.tensor(offsets)[:, None, None] + rows).flatten().to(device)  # (rank, layer, head) -> global row
    full = torch.empty(num_layers * num_heads, num_sequences, dtype=torch.float32, device=device)
    full[ids] = gathered[:, num_sequences + 1 :].reshape(-1, num_sequences).float()
    return full


def sum_over_ranks(
    signals: PackedResponseSignals, seconds: float, group: Any
) -> tuple[PackedResponseSignals, torch.Tensor]:
    """The group means from each rank's share (`stats_engine.group_means`: heads a rank does not hold count 0),
    summed over the SP group, with `seconds` summed too (the group's time). One all-reduce."""
    n = signals.waad.numel()
    total = torch.cat(
        [
            signals.waad.float(),
            signals.fai.float(),
            torch.tensor([seconds], dtype=torch.float32, device=signals.waad.device),
        ]
    )
    dist.all_reduce(total, group=group)
    return dataclasses.replace(signals, waad=total[:n], fai=total[n : 2 * n]), total[-1]


def _gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.stack(parts)
