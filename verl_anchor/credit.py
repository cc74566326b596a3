"""Token selection and credit weights gamma (spec §4-5). Pure torch, one response at a time.

`token_weights(waad, fai, cfg)` turns a response's group-averaged WAAD and FAI into the
per-token weights gamma; `shape_advantages` applies them to advantages with the sign rule;
`batch_weights` goes from captured per-token statistics to one gamma vector per response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from verl_anchor.config import AnchorConfig
from verl_anchor.metrics import TokenStats, response_signals


def select_tokens(values: torch.Tensor, ratio: float, select: str = "top") -> torch.Tensor:
    """TopQ / BottomQ (spec §4): boolean mask of the `ceil(ratio * n_def)` largest (smallest) defined values.

    NaN marks an undefined value: never selected, not counted in `n_def`. Ties go to the earlier position.
    """
    mask = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    defined = (~torch.isnan(values)).nonzero().flatten()
    # The epsilon keeps e.g. ceil(0.7 * 10) at 7 despite 0.7 * 10 = 7.000000000000001.
    count = math.ceil(ratio * defined.numel() - 1e-9)
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
    n = waad.shape[0]
    # Row t of `windows` holds delta[t-k .. t-1]; -inf pads positions before the response.
    padded = torch.cat([torch.full((k,), -math.inf, dtype=delta.dtype, device=delta.device), delta])
    windows = padded.unfold(0, k, 1)[:n]
    window_max = windows.max(dim=1).values
    dominated = anchors & (waad <= waad.median()) & (window_max >= delta.median())
    # argmax on the reversed window returns the first maximum there, i.e. the last one in position order.
    last_argmax = windows.flip(1).argmax(dim=1)
    intro_pos = torch.arange(n, device=waad.device) - 1 - last_argmax
    intro = torch.zeros_like(dominated)
    intro[intro_pos[dominated]] = True
    return dominated, intro


def token_weights(
    waad: torch.Tensor,
    fai: torch.Tensor,
    cfg: AnchorConfig,
    entropy: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Credit weights gamma `(n,)` of one response (spec §5); the sign rule is applied by `shape_advantages`.

    `waad` is the local-group mean, `fai` the global-group mean (NaN = undefined). Degenerate
    responses (see `is_degenerate`) get gamma = 1. `random` draws from `generator` (default: seeded
    with `cfg.seed`); `entropy` is required by the `entropy` strategy.
    """
    n = waad.shape[0]
    gamma = torch.ones(n, dtype=torch.float32, device=waad.device)
    if cfg.strategy == "none" or n == 0:
        return gamma
    if cfg.strategy == "random":
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed)
        chosen = torch.randperm(n, generator=generator)[: math.ceil(cfg.ratio * n - 1e-9)]
        indicator = torch.zeros(n, dtype=torch.float32)
        indicator[chosen] = 1.0
        return 1.0 + (cfg.gamma_amp - 1.0) * indicator.to(waad.device)
    if cfg.strategy == "entropy":
        if entropy is None or entropy.shape != waad.shape:
            raise ValueError("strategy='entropy' needs the policy's token entropy of the same length as the response")
        indicator = select_tokens(entropy.float(), cfg.ratio, cfg.select).float()
        return 1.0 + (cfg.gamma_amp - 1.0) * indicator
    if is_degenerate(waad, fai):
        return gamma
    waad, fai = waad.float(), fai.float()
    delta = waad_jumps(waad)
    if cfg.strategy == "local_chunk":
        indicator = select_tokens(delta, cfg.ratio, cfg.select).float()
    else:
        anchors = select_tokens(fai, cfg.ratio, cfg.select)
        if cfg.strategy == "global_anchor":
            indicator = anchors.float()
        else:  # coupled (Eq. 19), capped so gamma never exceeds gamma_amp
            dominated, intro = dominated_anchors(waad, delta, anchors, cfg.k)
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


def batch_weights(
    stats: Sequence[TokenStats],
    response_lengths: Sequence[int],
    cfg: AnchorConfig,
    entropies: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """One gamma vector per response from captured statistics (each sequence ends with its response)."""
    if len(stats) != len(response_lengths):
        raise ValueError(f"got statistics of {len(stats)} sequences but {len(response_lengths)} response lengths")
    weights = []
    for i, (seq_stats, length) in enumerate(zip(stats, response_lengths)):
        signals = response_signals(seq_stats, int(length), cfg)
        entropy = entropies[i] if entropies is not None else None
        weights.append(token_weights(signals.waad, signals.fai, cfg, entropy=entropy, generator=generator))
    return weights
