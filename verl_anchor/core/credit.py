"""Token selection and credit weights gamma (spec §4-5). Pure torch.

`token_weights(waad, fai, cfg)` turns one response's group-averaged WAAD and FAI into the
per-token weights gamma. `batch_gamma` does it for a padded batch of responses and is the one
path the verl trainer and the tests share; `shape_advantages` applies gamma to advantages with
the sign rule; `batch_weights` goes from captured per-token statistics through `batch_gamma`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import torch

from verl_anchor.core.config import AnchorConfig, ceil_count
from verl_anchor.core.metrics import TokenStats, response_signals


def select_tokens(values: torch.Tensor, ratio: float, select: str = "top") -> torch.Tensor:
    """TopQ / BottomQ (spec §4): boolean mask of the `ceil(ratio * n_def)` largest (smallest) defined values.

    NaN marks an undefined value: never selected, not counted in `n_def`. Ties go to the earlier position.
    """
    mask = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    defined = (~torch.isnan(values)).nonzero().flatten()
    count = ceil_count(ratio, defined.numel())
    if count <= 0:
        return mask
    # A stable sort keeps equal values in position order, in both directions.
    order = torch.sort(values[defined], descending=(select == "top"), stable=True).indices[:count]
    mask[defined[order]] = True
    return mask


def waad_jumps(waad: torch.Tensor) -> torch.Tensor:
    """delta[t] = |WAAD[t] - WAAD[t+1]|, with delta of the last token = 0 (spec §4)."""
    delta = torch.zeros_like(waad)
    delta[:-1] = (waad[:-1] - waad[1:]).abs()
    return delta


def is_degenerate(waad: torch.Tensor, fai: torch.Tensor) -> bool:
    """Spec §5: an empty response, a non-finite WAAD or an infinite FAI (NaN FAI = undefined tail, fine)."""
    return waad.numel() == 0 or not bool(torch.isfinite(waad).all()) or bool(torch.isinf(fai).any())


def dominated_anchors(
    waad: torch.Tensor, delta: torch.Tensor, anchors: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Locally dominated anchors D (Eq. 18) and their introductory tokens I(D), as boolean masks.

    t in D if t is an anchor, WAAD[t] <= median(WAAD) and max(delta[t-k .. t-1]) >= median(delta);
    intro(t) is the argmax of delta over that window, ties to the later position.
    """
    window_max, intro_pos = _look_back_argmax(delta, k)
    dominated = anchors & (waad <= waad.median()) & (window_max >= delta.median())
    intro = torch.zeros_like(dominated)
    intro[intro_pos[dominated]] = True
    return dominated, intro


def _look_back_argmax(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every t: max of delta[t-k .. t-1] (-inf where that window is empty) and where it is, ties to the later.

    O(n) time and memory whatever k is (van Herk / Gil-Werman: prefix and suffix maxima of blocks of
    width k). Each value is keyed with its position, (float bits << 24) | position, so the maximum key
    is the latest position of the maximum: delta >= 0, whose float32 bit patterns order like the values.
    """
    n = delta.shape[0]
    width = max(1, min(k, n))  # a window never reaches before the response: k beyond n changes nothing
    positions = torch.arange(n, device=delta.device)
    keys = (delta.float().view(torch.int32).long() << 24) | positions
    blocks = -(-(n + width) // width)
    padded = torch.full((blocks * width,), -1, dtype=torch.long, device=delta.device)  # -1: before the response
    padded[width : width + n] = keys
    by_block = padded.view(blocks, width)
    prefix = by_block.cummax(dim=1).values.flatten()
    suffix = by_block.flip(1).cummax(dim=1).values.flip(1).flatten()
    # The window of t is padded[t : t + width]: the tail of one block and the head of the next.
    best = torch.maximum(suffix[positions], prefix[positions + width - 1])
    found = best >= 0
    where = torch.where(found, best & ((1 << 24) - 1), 0)
    window_max = torch.where(found, delta[where], torch.full_like(delta, -math.inf))
    return window_max, where


def token_weights(
    waad: torch.Tensor,
    fai: torch.Tensor,
    cfg: AnchorConfig,
    entropy: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    trainable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Credit weights gamma `(n,)` of one response (spec §5); the sign rule is applied by `shape_advantages`.

    `waad` is the local-group mean, `fai` the global-group mean (NaN = undefined). Degenerate
    responses (see `is_degenerate`) get gamma = 1. `random` draws from `generator` (default: seeded
    with `cfg.seed`); `entropy` is required by the `entropy` strategy. `trainable` (bool, default all):
    positions the policy loss trains on (verl's `response_mask`); the others, e.g. tool output inside a
    multi-turn response, are never selected and do not count in the `ratio` budget.
    """
    n = waad.shape[0]
    gamma = torch.ones(n, dtype=torch.float32, device=waad.device)
    if cfg.strategy == "none" or n == 0:
        return gamma
    if trainable is None:
        trainable = torch.ones(n, dtype=torch.bool, device=waad.device)
    trainable = trainable.bool()
    if cfg.strategy == "random":
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed)
        candidates = trainable.cpu().nonzero().flatten()
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)]
        chosen = chosen[: ceil_count(cfg.ratio, candidates.numel())]
        indicator = torch.zeros(n, dtype=torch.float32)
        indicator[chosen] = 1.0
        return 1.0 + (cfg.gamma_amp - 1.0) * indicator.to(waad.device)
    undefined = torch.tensor(math.nan, device=waad.device)
    if cfg.strategy == "entropy":
        if entropy is None or entropy.shape != waad.shape:
            raise ValueError("strategy='entropy' needs the policy's token entropy of the same length as the response")
        indicator = select_tokens(entropy.float().where(trainable, undefined), cfg.ratio, cfg.select).float()
        return 1.0 + (cfg.gamma_amp - 1.0) * indicator
    if is_degenerate(waad, fai):
        return gamma
    waad, fai = waad.float(), fai.float()
    delta = waad_jumps(waad)
    if cfg.strategy == "local_chunk":
        indicator = select_tokens(delta.where(trainable, undefined), cfg.ratio, cfg.select).float()
    else:
        anchors = select_tokens(fai.where(trainable, undefined), cfg.ratio, cfg.select)
        if cfg.strategy == "global_anchor":
            indicator = anchors.float()
        else:  # coupled (Eq. 19), capped so gamma never exceeds gamma_amp
            dominated, intro = dominated_anchors(waad, delta, anchors, cfg.k)
            intro &= trainable  # an introductory token the loss does not train on takes no credit
            indicator = (
                (anchors & ~dominated).float() + (1.0 - cfg.alpha) * dominated.float() + cfg.alpha * intro.float()
            ).clamp(max=1.0)
    return 1.0 + (cfg.gamma_amp - 1.0) * indicator


def effective_gamma(advantages: torch.Tensor, gamma: torch.Tensor, sign: str = "both") -> torch.Tensor:
    """gamma after the sign rule: `positive`/`negative` keep it only where A > 0 / A < 0 (else 1)."""
    gamma = gamma.detach().to(advantages.dtype)
    if sign == "both":
        return gamma
    if sign == "positive":
        return torch.where(advantages > 0, gamma, torch.ones_like(gamma))
    if sign == "negative":
        return torch.where(advantages < 0, gamma, torch.ones_like(gamma))
    raise ValueError(f"sign={sign!r} is invalid: allowed values are both, positive, negative")


def shape_advantages(advantages: torch.Tensor, gamma: torch.Tensor, sign: str = "both") -> torch.Tensor:
    """A~ = gamma * A (Eq. 12-13), gamma detached, with the sign rule of `effective_gamma`."""
    return advantages * effective_gamma(advantages, gamma, sign)


def response_seed(seed: int, *parts: object) -> int:
    """A generator seed for one response, hashed from the run's `seed` and what identifies the draw.

    Hashing (not arithmetic) keeps any `seed` in range and makes the draw independent of batch
    order and rank: the trainer passes (step, local step, response key).
    """
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.Generator takes < 2**63 on every platform


def batch_gamma(
    lengths: Sequence[int],
    cfg: AnchorConfig,
    waad: torch.Tensor | None = None,
    fai: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
    trainable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma of a batch of responses, `(B, max(lengths))`, 1 beyond each response; and which are degenerate.

    `waad`, `fai` (attention strategies), `entropy` (entropy strategy) and `trainable` (verl's
    response mask; see `token_weights`) are `(B, >= max(lengths))`, row i valid for its first
    `lengths[i]` entries. `random` draws response i from a generator seeded
    with `seeds[i]` (default `response_seed(cfg.seed, i)`), so no two responses share their draw by
    construction. `degenerate[i]` marks responses whose statistics are unusable (gamma = 1 there).
    """
    width = max(lengths, default=0)
    gamma = torch.ones(len(lengths), width, dtype=torch.float32)
    degenerate = torch.zeros(len(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        n = int(n)
        row_waad = waad[i, :n].float().cpu() if waad is not None else torch.zeros(n)
        row_fai = fai[i, :n].float().cpu() if fai is not None else torch.zeros(n)
        row_entropy = entropy[i, :n].float().cpu() if entropy is not None else None
        row_trainable = trainable[i, :n].bool().cpu() if trainable is not None else None
        if cfg.needs_attention:
            degenerate[i] = is_degenerate(row_waad, row_fai)
        generator = None
        if cfg.needs_seeds:
            generator = torch.Generator().manual_seed(seeds[i] if seeds is not None else response_seed(cfg.seed, i))
        gamma[i, :n] = token_weights(
            row_waad, row_fai, cfg, entropy=row_entropy, generator=generator, trainable=row_trainable
        )
    return gamma, degenerate


def batch_weights(
    stats: Sequence[TokenStats],
    response_lengths: Sequence[int],
    cfg: AnchorConfig,
    entropies: Sequence[torch.Tensor] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """One gamma vector per response from captured statistics (each sequence ends with its response)."""
    if len(stats) != len(response_lengths):
        raise ValueError(f"got statistics of {len(stats)} sequences but {len(response_lengths)} response lengths")
    lengths = [int(n) for n in response_lengths]
    signals = [response_signals(seq_stats, n, cfg) for seq_stats, n in zip(stats, lengths)]
    waad = _pad([s.waad for s in signals], lengths)
    fai = _pad([s.fai for s in signals], lengths)
    entropy = _pad(list(entropies), lengths) if entropies is not None else None
    gamma, _ = batch_gamma(lengths, cfg, waad=waad, fai=fai, entropy=entropy, seeds=seeds)
    return [gamma[i, :n] for i, n in enumerate(lengths)]


def _pad(rows: Sequence[torch.Tensor], lengths: Sequence[int]) -> torch.Tensor:
    out = torch.full((len(rows), max(lengths, default=0)), math.nan)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        out[i, :n] = row[:n].float().cpu()
    return out


@dataclasses.dataclass(frozen=True)
class ResponseBatch:
    """What gamma needs of a batch of responses, padded to one width `W` (rows past their length are ignored).

    `span_local`, `span_global` are each sequence's local- and global-group spans, `seconds` its share of the
    statistics' time. Rows with `real` False (a trainer's padding samples) keep gamma = 1 and stay out of the
    metrics.
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


def scale_advantages(
    batch: ResponseBatch,
    cfg: AnchorConfig,
    seeds: Sequence[int] | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """gamma-scaled advantages `(B, W)`, gamma itself, and the `anchor/*` metrics.

    `seeds`: one per response for the random strategy (`response_seed`). `world_size`: the
    actor ranks, to report `timing_s/anchor_stats` per rank (each sequence carries its share of its rank's time).
    """
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
