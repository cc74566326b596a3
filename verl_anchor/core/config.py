"""`AnchorConfig`: every option of the method (spec §6), validated on construction.

A bad value raises `ValueError` naming the option, the value and what is allowed, so a
wrong verl config fails at trainer start-up instead of after the first rollout.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Strategy:
    """What a strategy's weights read; the trainers ask `AnchorConfig.needs_*` instead of comparing names."""

    attention: bool = False  # attention statistics, captured in the old-log-prob forward
    entropy: bool = False  # the policy's token entropy, from that forward
    seeds: bool = False  # a random draw, seeded per response
    old_log_prob_forward: bool = False  # reads anything from that forward (false only for random and none)


_ATTENTION = Strategy(attention=True, old_log_prob_forward=True)
STRATEGY_REGISTRY: dict[str, Strategy] = {
    "none": Strategy(),
    "local_chunk": _ATTENTION,
    "global_anchor": _ATTENTION,
    "coupled": _ATTENTION,
    "random": Strategy(seeds=True),
    "entropy": Strategy(entropy=True, old_log_prob_forward=True),
}
STRATEGIES = tuple(STRATEGY_REGISTRY)
SIGNS = ("both", "positive", "negative")
SELECTS = ("top", "bottom")
MAX_GAMMA_AMP = 100.0
# Largest token offset an option may name (window, FAI horizon, coupled look-back): 16.7M tokens, longer than
# any sequence, and small enough that a token index plus an offset never overflows the kernels' int32.
MAX_OFFSET = 2**24
# No decoder has more layers (the largest open models have ~130): more is a typo, and select_layers'
# linspace would allocate num_layers floats (1e9: 8 GB) before deduplicating them.
MAX_LAYERS = 256
# Counts taken from a float product are off by one ulp at times (0.7 * 10 = 7.000000000000001,
# 0.29 * 100 = 28.999999999999996): every ceil/floor of fraction * n absorbs that slack.
FLOAT_SLACK = 1e-9


def ceil_count(fraction: float, n: int) -> int:
    """`ceil(fraction * n)`, with `FLOAT_SLACK` against float error (a selection budget)."""
    return math.ceil(fraction * n - FLOAT_SLACK)


def floor_count(fraction: float, n: int) -> int:
    """`floor(fraction * n)`, with `FLOAT_SLACK` against float error (a head-group size)."""
    return math.floor(fraction * n + FLOAT_SLACK)


# How close (difflib ratio) a misspelt name must be to be suggested: one letter off an estimator name
# (anchor_copuled: 0.93) is; an unrelated estimator registered after the check must not be flagged.
SUGGEST_CUTOFF = 0.8


def suggest(name: str, choices: Iterable[str]) -> str | None:
    """The one of `choices` a misspelt `name` most likely meant, if any is within `SUGGEST_CUTOFF`."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=SUGGEST_CUTOFF)
    return close[0] if close else None


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """Options of preplan/anchor credit assignment; defaults are the paper's (spec §6)."""

    strategy: str = "coupled"
    window: int = 10
    fai_h_lo: int = 10
    fai_h_hi: int | None = 100
    ratio: float = 0.4
    gamma_amp: float = 1.5
    head_quantile: float = 0.3
    num_layers: int = 5
    layers: tuple[int, ...] | None = None
    k: int = 3
    alpha: float = 0.5
    sign: str = "both"
    select: str = "top"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers) if _is_sequence(self.layers) else self.layers)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_int("window", self.window, minimum=1, maximum=MAX_OFFSET)
        _check_int("fai_h_lo", self.fai_h_lo, minimum=0, maximum=MAX_OFFSET)
        if self.fai_h_hi is not None:
            _check_int(
                "fai_h_hi",
                self.fai_h_hi,
                minimum=self.fai_h_lo,
                maximum=MAX_OFFSET,
                hint="or None (unbounded, analysis mode)",
            )
        _check_real("ratio", self.ratio, low=0.0, high=1.0, low_open=True)
        # Bounded: gamma multiplies float32 advantages, and 1e39 would turn them into inf/NaN.
        _check_real("gamma_amp", self.gamma_amp, low=0.0, high=MAX_GAMMA_AMP, low_open=True)
        # Above 0.5 the local and the global group would share heads.
        _check_real("head_quantile", self.head_quantile, low=0.0, high=0.5, low_open=True)
        _check_int("num_layers", self.num_layers, minimum=1, maximum=MAX_LAYERS)
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not self.layers:
                raise ValueError(f"layers={self.layers!r} is invalid: give a non-empty list of layer indices, or None")
            for layer in self.layers:
                _check_int("layers[...]", layer, minimum=0)
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers={list(self.layers)!r} has duplicates: list each layer once")
        _check_int("k", self.k, minimum=1, maximum=MAX_OFFSET)
        _check_real("alpha", self.alpha, low=0.0, high=1.0)
        _check_choice("sign", self.sign, SIGNS)
        _check_choice("select", self.select, SELECTS)
        _check_int("seed", self.seed, minimum=0, maximum=2**64 - 1)

    @property
    def needs_attention(self) -> bool:
        """Whether the strategy reads attention (and so needs the capture in the forward pass)."""
        return STRATEGY_REGISTRY[self.strategy].attention

    @property
    def needs_entropy(self) -> bool:
        """Whether the strategy reads the policy's token entropy."""
        return STRATEGY_REGISTRY[self.strategy].entropy

    @property
    def needs_seeds(self) -> bool:
        """Whether the strategy draws at random (one seed per response)."""
        return STRATEGY_REGISTRY[self.strategy].seeds

    @property
    def needs_forward(self) -> bool:
        """Whether the strategy reads anything from the old-log-prob forward (attention or entropy)."""
        return STRATEGY_REGISTRY[self.strategy].old_log_prob_forward

    @property
    def band(self) -> int | None:
        """Largest query-key offset the statistics read beyond the row moments; None = unbounded."""
        return None if self.fai_h_hi is None else max(self.window - 1, self.fai_h_hi)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], prefix: str = "") -> AnchorConfig:
        """Build from a plain mapping (e.g. a verl `algorithm.anchor` block), rejecting unknown keys.

        `prefix` is prepended to option names in error messages (e.g. "algorithm.anchor.").
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in options if key not in names]
        if unknown:
            key = unknown[0]
            close = suggest(key, names)
            hint = f"; did you mean {prefix}{close}?" if close else f"; known options: {', '.join(names)}"
            raise ValueError(f"unknown option {prefix}{key}={options[key]!r}{hint}")
        values = dict(options)
        if isinstance(values.get("layers"), str) and values["layers"].lower() in ("none", "null", ""):
            values["layers"] = None
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}" if prefix else str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes)))


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are {', '.join(allowed)}")


def _check_int(name: str, value: Any, minimum: int, hint: str = "", maximum: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        extra = f" {hint}" if hint else ""
        raise ValueError(f"{name}={value!r} is invalid: use an integer {bound}{extra}")


def _check_real(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is invalid: use a finite number in {left}{low:g}, {high:g}{right}")
