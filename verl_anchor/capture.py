"""Attention capture for Hugging Face decoder models: statistics computed inside the forward pass.

`AttentionCapture(model, cfg)` is a context manager. While it is active, every forward of
`model` computes, for the selected layers only, the per-token statistics of
`verl_anchor.metrics.token_stats` from the post-RoPE `q`, `k` that the model's attention
function receives, and hands the model's own attention function the same arguments, so
the model's outputs do not change. No `N x N` matrix is built (the eager implementation
builds its own, but that is the model's choice, not ours).

How: transformers looks the attention function up by name in `ALL_ATTENTION_FUNCTIONS` on
every call; the capture puts a wrapper under the model's implementation name (`eager`,
`sdpa`, `flash_attention_2`, ...) in that mapping's local layer and restores it on exit.
Using the model's existing name matters: a new name would need its own mask function, and
without one transformers silently drops the padding mask.

Sequences are found from the model's inputs, exactly as transformers' masking does: with a
2-D `attention_mask`, each row's unmasked tokens form one sequence (any padding pattern);
without one and without a KV cache (`use_cache=False`, as verl calls it), `position_ids`
that do not step by 1 start a new sequence (verl's packed "remove padding" layout);
otherwise each row is one sequence.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from verl_anchor.config import AnchorConfig
from verl_anchor.metrics import TokenStats, attention_map, select_layers, token_stats

_MISSING = object()


class CaptureError(RuntimeError):
    """The model or its inputs cannot be captured (the message says why and what to do)."""


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention modules of a decoder, by `layer_idx` (raises `CaptureError` if there are none)."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and name.split(".")[-1] in ("self_attn", "attention", "attn"):
            found.setdefault(layer_idx, module)
    if not found:
        raise CaptureError(
            f"{type(model).__name__} has no Hugging Face attention modules with a `layer_idx` "
            "(e.g. `model.layers[i].self_attn`), so its attention cannot be captured; use a transformers "
            "decoder model (Qwen2/Qwen3/Llama-style) with the eager, sdpa or flash_attention_2 implementation"
        )
    return found


class AttentionCapture:
    """Record per-token attention statistics of the selected layers during `model`'s forward passes."""

    def __init__(self, model: torch.nn.Module, cfg: AnchorConfig, chunk_size: int | None = None,
                 map_bins: int | None = None) -> None:
        """`map_bins`: also pool each sequence's attention from position `map_from` on into at most
        `map_bins` x `map_bins` cells per head (`TokenStats.attention_map`, for figures; analysis only).
        """
        self.model = model
        self.cfg = cfg
        self.chunk_size = chunk_size
        self.map_bins = map_bins
        self.map_from = 0  # where the pooled maps start in each sequence (e.g. the response start)
        modules = attention_modules(model)
        config = getattr(model, "config", None)
        num_layers = getattr(config, "num_hidden_layers", None) or (max(modules) + 1)
        self.layers = list(cfg.layers) if cfg.layers is not None else select_layers(num_layers, cfg.num_layers)
        missing = [layer for layer in self.layers if layer not in modules]
        if missing:
            raise CaptureError(
                f"layers={self.layers} asks for layer(s) {missing}, but the model has attention layers "
                f"0..{max(modules)}; choose layers within that range"
            )
        self._layer_of = {id(modules[layer]): layer for layer in self.layers}
        self.implementation = getattr(config, "_attn_implementation", None) or "eager"
        self._forward_signature = inspect.signature(model.forward)
        self._segments: list[tuple[int, torch.Tensor]] | None = None
        self._current: dict[int, list[TokenStats]] = {}
        self._finished: list[list[TokenStats]] = []
        self._handles: list[Any] = []
        self._previous: Any = _MISSING
        self._original: Callable | None = None
        self.seconds = 0.0  # time spent computing statistics (not in the model's own attention)

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "AttentionCapture":
        impl = self.implementation
        self._previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl, _MISSING)
        self._original = None if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        ALL_ATTENTION_FUNCTIONS[impl] = self._attention
        self._handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._previous is _MISSING:
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop(self.implementation, None)
        else:
            ALL_ATTENTION_FUNCTIONS[self.implementation] = self._previous
        self._segments = None

    # -- results ---------------------------------------------------------------------------
    def pop(self) -> list[TokenStats]:
        """Statistics of every sequence seen since the last `pop`, in input order (row-major).

        Heads are (layer, head) in layer order: `H = len(layers) * num_query_heads`.
        """
        done, self._finished = self._finished, []
        return [stats for forward in done for stats in forward]

    # -- hooks -----------------------------------------------------------------------------
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if tokens is None:
            raise CaptureError("the capture needs `input_ids` or `inputs_embeds` in the model call")
        # transformers treats restarting position_ids as packed sequences only without a KV cache,
        # which the model creates whenever use_cache resolves to True.
        use_cache = bound.get("use_cache")
        if use_cache is None:
            use_cache = getattr(getattr(self.model, "config", None), "use_cache", False)
        packed = bound.get("past_key_values") is None and not use_cache
        self._segments = sequence_segments(tokens.shape[0], tokens.shape[1], bound.get("attention_mask"),
                                           bound.get("position_ids") if packed else None, tokens.device)
        self._current = {}

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._segments is None:
            return
        per_layer = [self._current.get(layer) for layer in self.layers]
        if any(stats is None for stats in per_layer):
            absent = [layer for layer, stats in zip(self.layers, per_layer) if stats is None]
            raise CaptureError(f"layers {absent} were not run through the attention function during the forward")
        self._finished.append([_concat_heads(parts) for parts in zip(*per_layer)])
        self._segments = None
        self._current = {}

    def _attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any):
        original = self._original or sys.modules[type(module).__module__].eager_attention_forward
        layer = self._layer_of.get(id(module))
        if layer is not None and self._segments is not None:
            self._record(layer, module, query, key, kwargs)
        return original(module, query, key, *args, **kwargs)

    def _record(self, layer: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                kwargs: dict) -> None:
        if layer in self._current:
            raise CaptureError(
                f"layer {layer} ran twice in one forward (gradient checkpointing recompute?); "
                "capture only inside a forward-only pass"
            )
        if query.shape[2] != key.shape[2]:
            raise CaptureError("the capture needs a full forward without a KV cache (query and key lengths differ)")
        if kwargs.get("softcap") is not None:
            raise CaptureError("attention logit soft-capping is not supported by the statistics")
        window = kwargs.get("sliding_window")
        longest = max((len(idx) for _, idx in self._segments), default=0)
        if window is not None and longest > window:
            raise CaptureError(f"layer {layer} uses sliding-window attention ({window}) shorter than a sequence "
                               f"({longest}); choose full-attention layers with `layers`")
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        chunk = {} if self.chunk_size is None else {"chunk_size": self.chunk_size}
        start = time.perf_counter()
        with torch.no_grad():
            self._current[layer] = []
            for row, idx in self._segments:
                q, k = _take(query[row], idx), _take(key[row], idx)
                stats = token_stats(q, k, self.cfg, scale=scale, **chunk)
                if self.map_bins is not None:
                    stats.attention_map = attention_map(q, k, min(self.map_from, len(idx)), self.map_bins,
                                                        scale=scale, **chunk)
                self._current[layer].append(stats)
        self.seconds += time.perf_counter() - start


def sequence_segments(
    batch: int,
    length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
) -> list[tuple[int, torch.Tensor]]:
    """(row, token indices) of every sequence in a batch, by transformers' own rules (module doc)."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise CaptureError(
                f"the capture needs a 2-D attention_mask (batch, length), got shape {tuple(attention_mask.shape)}"
            )
        return [(row, attention_mask[row].nonzero().flatten().to(device)) for row in range(batch)]
    if position_ids is not None:
        if position_ids.dim() != 2:
            raise CaptureError(f"the capture needs 2-D position_ids, got shape {tuple(position_ids.shape)}")
        position_ids = position_ids.expand(batch, -1)
        segments = []
        for row in range(batch):
            steps = torch.diff(position_ids[row], prepend=position_ids[row, :1] - 1)
            starts = (steps != 1).nonzero().flatten().tolist()
            bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [length]
            segments += [(row, torch.arange(a, b, device=device)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return segments
    return [(row, torch.arange(length, device=device)) for row in range(batch)]


def _take(states: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`states[:, idx]` of one row `(H, L, D)`, as a view when `idx` is a contiguous range."""
    states = states.detach()
    if idx.numel() and int(idx[-1] - idx[0]) + 1 == idx.numel():
        return states[:, int(idx[0]) : int(idx[-1]) + 1]
    return states[:, idx]


def _concat_heads(parts: Sequence[TokenStats]) -> TokenStats:
    return TokenStats(
        row_span=torch.cat([p.row_span for p in parts]),
        waad=torch.cat([p.waad for p in parts]),
        fai=torch.cat([p.fai for p in parts]),
        first=parts[0].first,
        attention_map=None if parts[0].attention_map is None else torch.cat([p.attention_map for p in parts]),
    )
