"""The anchor advantage step both verl trainers share: gamma on the base estimator's advantages, and its metrics.

Independent of the data plane: the v1 trainer reads its responses from TransferQueue (nested, one
row per response), the legacy trainer from a padded `DataProto`; each builds a `ResponseBatch`, the
typed hand-off from the worker's outputs to the credit maths, and calls `scale_advantages`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tensordict import TensorDict

from verl_anchor.core.credit import batch_gamma, effective_gamma, shape_advantages
from verl_anchor.integration.settings import AnchorSettings

# The hand-off between the anchor worker and the trainers (both data planes):
ANCHOR_OPTIONS_KEY = "anchor_cfg"  # the options the trainer sends with the old-log-prob call
OUTPUT_KEYS = ("anchor_waad", "anchor_fai", "anchor_seq")  # what the worker adds to verl's model output
# `anchor_seq`'s columns, one row per sequence.
SEQUENCE_COLUMNS = ("span_local", "span_global", "seconds")


@dataclasses.dataclass(frozen=True)
class ResponseBatch:
    """What gamma needs of a batch of responses, padded to one width `W` (rows past their length are ignored).

    `span_local`, `span_global`, `seconds` are the worker's `anchor_seq` columns (`SEQUENCE_COLUMNS`).
    Rows with `real` False (verl's padding samples) keep gamma = 1 and stay out of the metrics.
    """

    advantages: torch.Tensor  # (B, W) the base estimator's advantages
    trainable: torch.Tensor  # (B, W) bool: verl's response_mask
    lengths: tuple[int, ...]  # tokens of each response
    real: torch.Tensor  # (B,) bool
    waad: torch.Tensor | None = None  # (B, W), attention strategies
    fai: torch.Tensor | None = None  # (B, W), NaN where undefined
    span_local: torch.Tensor | None = None  # (B,), attention strategies
    span_global: torch.Tensor | None = None  # (B,)
    seconds: torch.Tensor | None = None  # (B,): each sequence's share of its rank's statistics time
    entropy: torch.Tensor | None = None  # (B, W), entropy strategy

    @classmethod
    def from_nested(cls, data: TensorDict, real: Sequence[bool] | None = None) -> ResponseBatch:
        """From per-response nested fields: `advantages`, `response_mask`, `entropy`, the worker's `anchor_*`."""
        lengths = tuple(data["response_mask"].offsets().diff().tolist())
        present = data.keys()
        return cls(
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


def scale_advantages(
    batch: ResponseBatch,
    settings: AnchorSettings,
    seeds: Sequence[int] | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """gamma-scaled advantages `(B, W)`, gamma itself, and the `anchor/*` metrics.

    `seeds`: one per response for the random strategy (`credit.response_seed`). `world_size`: the
    actor ranks, to report `timing_s/anchor_stats` per rank (each sequence carries its share of its rank's time).
    """
    cfg = settings.cfg
    advantages, real = batch.advantages.float(), batch.real
    lengths = [n if keep else 0 for n, keep in zip(batch.lengths, real.tolist())]
    gamma, degenerate = batch_gamma(
        lengths, cfg, waad=batch.waad, fai=batch.fai, entropy=batch.entropy, seeds=seeds, trainable=batch.trainable
    )
    gamma = torch.nn.functional.pad(gamma, (0, advantages.shape[1] - gamma.shape[1]), value=1.0)
    shaped = shape_advantages(advantages, gamma, cfg.sign)
    effective = effective_gamma(advantages, gamma, cfg.sign)  # what shape_advantages multiplied by
    mask = batch.trainable.bool() & real[:, None]
    tokens = max(1, int(mask.sum()))
    metrics = {
        "anchor/selected_frac": float(((gamma != 1.0) & mask).sum()) / tokens,  # chosen by the strategy
        "anchor/amplified_frac": float(((effective != 1.0) & mask).sum()) / tokens,  # after the sign rule
        "anchor/gamma_mean": float(effective[mask].sum()) / tokens,
        "anchor/degenerate_frac": float(degenerate[real].sum()) / max(1, int(real.sum())),
    }
    if cfg.needs_attention:
        waad, fai = batch.waad, batch.fai
        defined_fai = fai[mask & ~torch.isnan(fai)]
        metrics.update(
            {
                "anchor/waad_mean": float(waad[mask & torch.isfinite(waad)].mean()) if mask.any() else math.nan,
                "anchor/fai_mean": float(defined_fai.mean()) if defined_fai.numel() else math.nan,
                "anchor/span_local": float(batch.span_local[real].nanmean()),
                "anchor/span_global": float(batch.span_global[real].nanmean()),
                "timing_s/anchor_stats": float(batch.seconds.nansum()) / max(1, world_size),
            }
        )
    return shaped, gamma, metrics


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
