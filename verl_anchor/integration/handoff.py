"""The hand-off between the anchor worker and verl's trainers: what rides with the old-log-prob call, what the
worker adds to verl's model output, and how either data plane's fields become a `core.credit.ResponseBatch`.

The v1 trainer reads the fields from TransferQueue (nested, one row per response: `response_batch`), the
legacy trainer from its padded `DataProto`; both then call `core.credit.scale_advantages`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tensordict import TensorDict

from verl_anchor.core.credit import ResponseBatch

# The hand-off between the anchor worker and the trainers (both data planes):
ANCHOR_OPTIONS_KEY = "anchor_cfg"  # the options the trainer sends with the old-log-prob call
OUTPUT_KEYS = ("anchor_waad", "anchor_fai", "anchor_seq")  # what the worker adds to verl's model output
# `anchor_seq`'s columns, one row per sequence.
SEQUENCE_COLUMNS = ("span_local", "span_global", "seconds")


def response_batch(data: TensorDict, real: Sequence[bool] | None = None) -> ResponseBatch:
    """From per-response nested fields: `advantages`, `response_mask`, `entropy`, the worker's `anchor_*`."""
    lengths = tuple(data["response_mask"].offsets().diff().tolist())
    present = data.keys()
    return ResponseBatch(
        advantages=padded(data["advantages"]).float(),
        trainable=padded(data["response_mask"]).bool(),
        lengths=lengths,
        real=real_rows(len(lengths), real),
        waad=padded(data["anchor_waad"], math.nan).float() if "anchor_waad" in present else None,
        fai=padded(data["anchor_fai"], math.nan).float() if "anchor_fai" in present else None,
        **sequence_columns(padded(data["anchor_seq"], math.nan) if "anchor_seq" in present else None),
        entropy=padded(data["entropy"]).float() if "entropy" in present else None,
    )


def sequence_columns(anchor_seq: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The named columns of the worker's `anchor_seq` rows `(B, 3)`, or Nones without it."""
    if anchor_seq is None:
        return dict.fromkeys(SEQUENCE_COLUMNS)
    return {name: anchor_seq[:, i].float() for i, name in enumerate(SEQUENCE_COLUMNS)}


def padded(nested: torch.Tensor, fill: float = 0.0, width: int | None = None) -> torch.Tensor:
    """A nested (jagged) tensor as a padded one, `width` columns if given; a dense one as it is."""
    dense = torch.nested.to_padded_tensor(nested, fill) if nested.is_nested else nested
    if width is not None and dense.shape[1] < width:
        dense = torch.nn.functional.pad(dense, (0, width - dense.shape[1]), value=fill)
    return dense


def real_rows(num_rows: int, real: Sequence[bool] | None) -> torch.Tensor:
    return torch.ones(num_rows, dtype=torch.bool) if real is None else torch.tensor(list(real), dtype=torch.bool)


def token_digest(tokens: torch.Tensor) -> str:
    """What identifies a prompt (or a whole sequence) across runs and ranks, for the random draw's seed:
    verl's uids are random."""
    return hashlib.blake2b(tokens.cpu().long().numpy().tobytes(), digest_size=8).hexdigest()


def write_dump(
    path: Path, keys: Sequence[str], input_ids: Sequence[torch.Tensor], batch: ResponseBatch, gamma: torch.Tensor
) -> None:
    """`algorithm.anchor.dump_dir`: each response's tokens, statistics and gamma (for checks and analysis)."""
    record = {
        "keys": list(keys),
        "real": batch.real.tolist(),
        "input_ids": [t.clone() for t in input_ids],
        "gamma": [gamma[i, :n].clone() for i, n in enumerate(batch.lengths)],
    }
    for name, values in (("anchor_waad", batch.waad), ("anchor_fai", batch.fai)):
        if values is not None:
            record[name] = [values[i, :n].clone() for i, n in enumerate(batch.lengths)]
    if batch.span_local is not None:
        columns = torch.stack([getattr(batch, name) for name in SEQUENCE_COLUMNS], 1)
        record["anchor_seq"] = [row.clone() for row in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)
