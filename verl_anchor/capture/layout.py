"""Where the sequences of one forward lie, and their attention inputs packed for `stats_engine`.

Sequences are found from the decoder's inputs, exactly as transformers' masking does: with a 2-D
`attention_mask`, each row's unmasked tokens form one sequence (any padding pattern); otherwise,
when the caller passes `position_ids` (packed rows are read only without a KV cache, see
`verl_anchor.capture.hooks`), `position_ids` that do not step by 1 start a new sequence (verl's packed
"remove padding" layout); otherwise each row is one sequence.

Under a flash-attention implementation the rules are the flash path's (`find_sequences(flash=True)`),
and packed inputs it would read differently are refused.

`find_sequences` packs them along the token axis in row order (`stats_engine.PackedSequences`),
computing the boundaries on the device. It reads from the device once, for the number of tokens of
padded rows or the number of packed sequences (a data-dependent size), and once more for a packed
row under flash attention (do its sequences start at position 0); one sequence per row needs no
read. `SequenceLayout.pack` turns a layer's `(B, H, L, D)` attention inputs into the packed
`(H, T, D)` the engine takes: a view for a single row (packed or not), one gather for padded rows.
What the capture checks against the model's mask (`unmasked`, `separated_by`) stays on the device.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from verl_anchor.capture.checks import CaptureError
from verl_anchor.core.stats_engine import PackedSequences


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """The sequences of a `(B, L)` batch, packed along the token axis in row order.

    `tokens`: the (row, column) of each packed token, for padded rows; None when the packed tokens are
    all `B x L` tokens in row-major order (packed rows, or one sequence per row). The host-side
    properties read the boundaries once (`sequences.bounds`).
    """

    rows: int  # B
    length: int  # L
    sequences: PackedSequences
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    def pack(self, states: torch.Tensor) -> torch.Tensor:
        """`(B, H, L, D)` attention inputs as `(H, T, D)`: a view of a single row, else one gather or copy."""
        states = states.detach()
        if self.tokens is not None:
            rows, columns = self.tokens
            return states[rows, :, columns].transpose(0, 1)  # advanced indices first: (T, H, D)
        if self.rows == 1:
            return states[0]
        return states.transpose(0, 1).flatten(1, 2)

    @functools.cached_property
    def lengths(self) -> tuple[int, ...]:
        bounds = self.sequences.bounds
        return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))

    @functools.cached_property
    def sequence_rows(self) -> tuple[int, ...]:
        """The row each sequence lies in."""
        if self.tokens is not None or not self.length:  # padded rows, or rows without tokens: sequence i is row i
            return tuple(range(self.sequences.num_sequences))
        return tuple(a // self.length for a in self.sequences.bounds[:-1])

    @functools.cached_property
    def one_per_row(self) -> bool:
        """No two non-empty sequences share a row."""
        rows = [row for row, n in zip(self.sequence_rows, self.lengths) if n]
        return len(set(rows)) == len(rows)

    @functools.cached_property
    def whole_rows(self) -> bool:
        """Every non-empty sequence is a whole row (no padding, no packing)."""
        return self.one_per_row and all(n == self.length for n in self.lengths if n)

    def segments(self) -> list[tuple[int, torch.Tensor]]:
        """(row, column indices) of every sequence."""
        bounds, device = self.sequences.bounds, self.sequences.cu_seqlens.device
        found = []
        for i, row in enumerate(self.sequence_rows):
            a, b = bounds[i], bounds[i + 1]
            if self.tokens is not None:
                found.append((row, self.tokens[1][a:b]))
            else:
                first = a - row * self.length
                found.append((row, torch.arange(first, first + b - a, device=device)))
        return found

    def unmasked(self, mask: torch.Tensor) -> torch.Tensor:
        """Whether a 2-D padding mask keeps every token of every sequence (a bool on the device)."""
        if self.tokens is None:
            return (mask != 0).all()
        return (mask[self.tokens] != 0).all()

    def separated_by(self, mask: torch.Tensor) -> torch.Tensor:
        """Whether a 4-D mask lets the first and last token of each sequence see themselves and no token of the
        sequence before it in the same row (a bool on the device; one small gather). Needs at least one token."""
        row, first, last = self._ends
        nonempty = self.sequences.cu_seqlens.diff() > 0
        mask = mask.expand(self.rows, -1, -1, -1)

        def allowed(picked: torch.Tensor) -> torch.Tensor:  # additive masks: 0 where allowed, min or -inf where not
            return picked if picked.dtype == torch.bool else picked > torch.finfo(picked.dtype).min / 2

        sees_itself = (allowed(mask[row, 0, first, first]) & allowed(mask[row, 0, last, last])) | ~nonempty
        after_another = (row[1:] == row[:-1]) & nonempty[1:] & nonempty[:-1]
        sees_previous = allowed(mask[row[1:], 0, first[1:], last[:-1]]) & after_another
        return sees_itself.all() & ~sees_previous.any()

    @functools.cached_property
    def _ends(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, first column, last column) of each sequence, on the device; any valid token for empty ones."""
        cu = self.sequences.cu_seqlens
        first = cu[:-1].clamp(max=self.sequences.num_tokens - 1)
        last = (cu[1:] - 1).clamp(min=0)
        if self.tokens is not None:
            rows, columns = self.tokens
            return rows[first], columns[first], columns[last]
        return first // self.length, first % self.length, last % self.length


def find_sequences(
    batch: int,
    length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
    flash: bool = False,
) -> SequenceLayout:
    """The sequences of a `(batch, length)` batch by transformers' own rules (module doc), packed on `device`.

    `flash`: by the rules of transformers' flash-attention path instead (flash_attention_2/3 and other "flash"
    implementations): an attention_mask without padding is dropped, and position_ids mark packed sequences only
    in a batch of one row, split where they are 0. Packed inputs those rules read differently from the other
    implementations (restarts in a batch of several rows, a sequence not starting at position 0) are refused.
    """
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise CaptureError(f"the capture needs a 2-D attention_mask (batch, length), got {shape}")
        present = attention_mask.to(device) != 0
        tokens = present.nonzero(as_tuple=True)  # one device read: the number of unmasked tokens
        # Flash attention drops a mask without padding and reads a single row's position_ids instead.
        if not (flash and batch == 1 and position_ids is not None and tokens[0].numel() == length):
            cu_seqlens = torch.nn.functional.pad(present.sum(1).cumsum(0), (1, 0))
            return SequenceLayout(batch, length, PackedSequences.built_valid(cu_seqlens, tokens[0].numel()), tokens)
    if position_ids is not None:
        if position_ids.dim() != 2:
            raise CaptureError(
                f"the capture needs 2-D position_ids, got shape {tuple(position_ids.shape)} "
                "(3-D mRoPE position ids are not supported)"
            )
        positions = position_ids.to(device).expand(batch, -1)
        starts = torch.ones(batch, length, dtype=torch.bool, device=device)  # each row starts a sequence
        starts[:, 1:] = positions.diff(dim=1) != 1
        first = starts.flatten().nonzero().flatten()  # one device read: the number of sequences
        if flash and first.numel() > batch:
            _check_flash_packing(batch, positions, first)
        cu_seqlens = torch.nn.functional.pad(first, (0, 1), value=batch * length)
        return SequenceLayout(batch, length, PackedSequences.built_valid(cu_seqlens, batch * length))
    bounds = tuple(row * length for row in range(batch + 1))  # known on the host: nothing to read
    cu_seqlens = torch.arange(batch + 1, device=device) * length
    return SequenceLayout(batch, length, PackedSequences(cu_seqlens, batch * length, host_bounds=bounds))


def _check_flash_packing(batch: int, positions: torch.Tensor, first: torch.Tensor) -> None:
    """Refuse packed position_ids that transformers' flash path does not split where the capture does: it treats
    restarting positions as packed sequences only in a batch of one row, and cuts that row only where they are 0."""
    fix = (
        "pack the sequences into one row (batch size 1, as verl's use_remove_padding=True does) with position_ids "
        "restarting at 0 for each, give padded rows with a 2-D attention_mask, or use attn_implementation='sdpa'"
    )
    if batch > 1:
        raise CaptureError(
            f"position_ids restart inside rows of a batch of {batch} rows: flash attention treats each "
            f"row of a batch of several rows as one sequence (it splits packed sequences only in a "
            f"batch of one row), while the positions say the rows hold several; {fix}"
        )
    if (positions.flatten()[first] != 0).any():  # one more device read, only for a packed row
        raise CaptureError(
            "a packed row whose sequences do not all start at position 0: flash attention splits a "
            "packed row only where position_ids are 0, while the capture would split it wherever they "
            f"do not step by 1; {fix}"
        )


def sequence_segments(
    batch: int,
    length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
) -> list[tuple[int, torch.Tensor]]:
    """(row, token indices) of every sequence in a batch, by transformers' own rules (module doc)."""
    return find_sequences(batch, length, attention_mask, position_ids, device).segments()
