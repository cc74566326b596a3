"""Attention capture for Hugging Face decoder models: statistics computed inside the forward pass.

`AttentionCapture(model, cfg, max_length=...)` is a context manager. While it is active, every
forward of `model` computes, for the selected layers only, the per-token statistics of
`verl_anchor.core.metrics.TokenStats` from the post-RoPE `q`, `k` that the model's attention
function receives, and hands the model's own attention function the same arguments, so the
model's outputs do not change. No `N x N` matrix is built (the eager implementation builds its
own, but that is the model's choice, not ours).

Where the inputs are read. `model` may be a transformers model or any wrapper of one: FSDP1
(`FullyShardedDataParallel`, whose forward is `(*args, **kwargs)`), FSDP2 (`fully_shard`),
PEFT/LoRA, or a model whose class `forward` was replaced (verl's `use_fused_kernels`), and the
model's own `forward` may take `use_cache` or `position_ids` only through `**kwargs`
(GraniteMoE). None of this changes the *decoder*: the transformers module that runs the decoder
layers (`Qwen3Model`, `LlamaModel`, a VLM's `language_model`), found as `get_decoder()` of the
outermost transformers model inside `model`. Its forward is always the library's own, with named
parameters, and it receives the inputs its masking reads. The capture hooks the
decoder (a forward pre-hook with kwargs and a forward hook), binds each call to the decoder's
signature and folds `**kwargs` in, whatever the wrappers pass positionally or by keyword.

Sequences are found from the decoder's inputs as transformers' masking finds them
(`verl_anchor.capture.layout`): each row's unmasked tokens with a 2-D `attention_mask`; without one
and without a KV cache (`past_key_values` is None and `use_cache` resolves to False: the argument,
else the decoder config's `use_cache`, and False under gradient checkpointing in training, as
transformers resolves it; verl passes `use_cache=False`), `position_ids` that do not step by 1 start
a new sequence (verl's packed "remove padding" layout); otherwise each row is one sequence.

One call per layer. The pre-hook finds the sequences once per forward and packs them along the
token axis; each captured layer then makes one `stats_engine.packed_token_stats` call for all of
them (on CUDA two Triton launches, elsewhere `metrics.token_stats` looped over the sequences): a
packed or single row is passed as a view, padded rows as one gather of their unmasked tokens.
Host syncs: none per sequence or per layer, at most two per forward: the pre-hook reads how many
sequences (packed rows) or tokens (padded rows) there are, and where the model's attention
function gets a mask, the post-hook reads the checks of all layers against it at once. `pop()`
gives one `TokenStats` per sequence (analysis, tests); `pop_packed()` the packed statistics of each
forward as they are, on the device (the worker).

The attention function is shared by every active capture through one dispatcher per implementation
name (`capture.dispatch`).

The implementation is the one the decoder's config names when the capture is entered: a
`set_attn_implementation` between building and entering is followed (and checked again, as when
built); one while the capture is active is refused at the next forward.

Under verl's Ulysses sequence parallelism (its group set while the decoder runs) the decoder and the attention
function see a slice of every sequence: the statistics are then taken from verl's inner flash call, after its
all-to-all, for whole sequences and this rank's heads (`verl_anchor.capture.ulysses`).

Where the statistics run is decided when the capture is built, too: on a CUDA device the kernels cannot
run on (capability, shared memory, head dim: `stats_engine.kernel_device_problem`) they take the torch
path, with one warning at start-up (`kernel_problem` says why).

Attention the statistics do not model is refused when the capture is built, never approximated
(`verl_anchor.capture.checks`; `docs/models.md` lists the model families). Each forward checks
again what only the inputs show: a sequence longer than a window, a row longer than an attention
chunk, a KV cache, soft-capping or sinks passed to the attention function, and a mask that does
not separate the sequences the capture found (a decoder that builds its mask its own way, as OPT
does for packed rows, is refused, never misread).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from typing import Any

import torch

from verl_anchor.capture import dispatch
from verl_anchor.capture import ulysses as capture_ulysses
from verl_anchor.capture.checks import (
    LAYERS_OPTION,
    CaptureError,
    attention_modules,
    capturable_layers,
    check_model,
    find_decoder,
    layer_problems,
    layers_message,
    num_layers,
    statistics_device_problem,
)
from verl_anchor.capture.layout import SequenceLayout, find_sequences, sequence_segments
from verl_anchor.core import stats_engine
from verl_anchor.core.config import AnchorConfig
from verl_anchor.core.metrics import DEFAULT_CHUNK, TokenStats, attention_map, select_layers
from verl_anchor.core.stats_engine import PackedTokenStats

__all__ = [
    "AttentionCapture",
    "CaptureError",
    "attention_modules",
    "capturable_layers",
    "find_decoder",
    "find_sequences",
    "sequence_segments",
]


@dataclasses.dataclass
class _Forward:
    """What a capture gathers during one forward of the decoder."""

    layout: SequenceLayout | None  # under Ulysses SP: found at the first captured layer
    ulysses: capture_ulysses.UlyssesForward | None = None
    stats: dict[int, PackedTokenStats] = dataclasses.field(default_factory=dict)  # by layer
    maps: dict[int, list[torch.Tensor]] = dataclasses.field(default_factory=dict)  # by layer, per sequence
    # id(mask) -> (first layer, mask, agrees): one check per mask tensor (layers share theirs), read after the
    # forward; holding the mask keeps its id its own
    mask_checks: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


class AttentionCapture:
    """Record per-token attention statistics of the selected layers during `model`'s forward passes."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: AnchorConfig,
        chunk_size: int | None = None,
        map_bins: int | None = None,
        *,
        max_length: int | None = None,
    ) -> None:
        """`chunk_size`: queries per step where the statistics run in torch (CPU) and for the maps.
        `map_bins`: also pool each sequence's attention from position `map_from` on into at most
        `map_bins` x `map_bins` cells per head (`TokenStats.attention_map`, for figures; analysis only).
        `max_length`: the longest sequence the capture will see (prompt plus response); sliding windows and
        attention chunks shorter than it are refused here. None: they are checked against each forward's inputs.
        """
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise CaptureError(
                f"max_length={max_length!r} is invalid: give the longest sequence (prompt plus "
                "response, in tokens) as an integer >= 1, or None"
            )
        self.model = model
        self.cfg = cfg
        self.chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
        self.map_bins = map_bins
        self.max_length = max_length
        self.map_from = 0  # where the pooled maps start in each sequence (e.g. the response start)
        self.decoder = find_decoder(model)
        modules = attention_modules(model, self.decoder)
        self._modules = modules
        self._total_layers = num_layers(self.decoder.config, modules)
        self.layers = list(cfg.layers) if cfg.layers is not None else select_layers(self._total_layers, cfg.num_layers)
        self.implementation = self._model_implementation()
        self._limits = self._check(self.implementation)
        # Where the statistics will run, decided now (start-up), not at the first forward.
        self.kernel_problem = statistics_device_problem(self.decoder, [modules[layer] for layer in self.layers])
        self._layer_of = {id(modules[layer]): layer for layer in self.layers}
        self._signature = inspect.signature(self.decoder.forward)
        self._var_keyword = next(
            (p.name for p in self._signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        self._forward: _Forward | None = None
        self._finished: list[tuple[PackedTokenStats, list[torch.Tensor] | None]] = []  # (stats, maps) per forward
        self._handles: list[Any] = []
        self._thread: int | None = None  # the thread that entered the capture (one model, one thread: _Registry)
        self.seconds = 0.0  # host time spent on statistics (not in the model's own attention)

    def _model_implementation(self) -> str:
        return getattr(self.decoder.config, "_attn_implementation", None) or "eager"

    def _check(self, implementation: str) -> dict[int, tuple[str, int | None]]:
        """Refuse the model or the selected layers under `implementation`; each layer's (kind, extent limit)."""
        config = self.decoder.config
        check_model(config, implementation)
        problems, limits = layer_problems(config, self._modules, self._total_layers, self.max_length, implementation)
        bad = [layer for layer in self.layers if layer not in limits]
        if bad:
            raise CaptureError(layers_message(self.layers, bad, problems, self._total_layers, self.cfg.num_layers))
        return limits

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> AttentionCapture:
        implementation = self._model_implementation()
        if implementation != self.implementation and not any(active is self for active in dispatch.REGISTRY.active):
            # set_attn_implementation since the capture was built: follow it (checked again, as when built)
            self._limits = self._check(implementation)
            self.implementation = implementation
        dispatch.REGISTRY.enter(self)
        self._handles = [
            self.decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.decoder.register_forward_hook(self._after_forward),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._forward = None
        dispatch.REGISTRY.exit(self)

    # -- results ---------------------------------------------------------------------------
    def pop(self) -> list[TokenStats]:
        """Statistics of every sequence seen since the last `pop`, in input order (row-major).

        Heads are (layer, head) in layer order: `H = len(layers) * num_query_heads`. Reads the sequence
        boundaries on the host: for CPU-side consumers.
        """
        found = []
        for stats, maps in self._take_finished():
            sequences = stats.to_token_stats()
            for sequence, pooled in zip(sequences, maps or ()):
                sequence.attention_map = pooled
            found += sequences
        return found

    def pop_packed(self) -> list[PackedTokenStats]:
        """The statistics of each forward since the last pop, as computed: all sequences packed along the token
        axis (`sequences` holds their boundaries, padding segments included), the layers' heads stacked in
        (layer, head) order (under Ulysses SP this rank's heads, from `head_offset`), on the model's device.
        Reads nothing from the device."""
        return [stats for stats, _ in self._take_finished()]

    def _take_finished(self) -> list[tuple[PackedTokenStats, list[torch.Tensor] | None]]:
        done, self._finished = self._finished, []
        return done

    # -- hooks -----------------------------------------------------------------------------
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        implementation = self._model_implementation()
        if implementation != self.implementation:  # the dispatcher sits under the name read at enter
            raise CaptureError(
                f"the model's attention implementation changed from {self.implementation!r} to {implementation!r} "
                "while the capture was active (set_attn_implementation); change it before entering the capture, "
                "or exit the capture and enter it again"
            )
        try:
            call = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError as err:
            raise CaptureError(
                f"{type(module).__name__}.forward was called with arguments its signature does not take ({err})"
            ) from err
        call.update(call.pop(self._var_keyword, None) or {})  # e.g. use_cache passed through **kwargs
        tokens = call.get("input_ids")
        if tokens is None:
            tokens = call.get("inputs_embeds")
        if tokens is None:
            raise CaptureError(
                f"the capture needs `input_ids` or `inputs_embeds` in the call of {type(module).__name__}"
            )
        group = capture_ulysses.sequence_parallel_group()
        if group is not None:
            self._forward = _Forward(
                None,
                capture_ulysses.begin(
                    group, self.implementation, call, tokens, self.map_bins is not None, dispatch.observe_gathered
                ),
            )
            return
        # transformers treats restarting position_ids as packed sequences only without a KV cache,
        # which the decoder creates whenever use_cache resolves to True.
        use_cache = call.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        if getattr(module, "gradient_checkpointing", False) and module.training:
            use_cache = False
        # Flash attention reads position_ids whatever the cache (layout.find_sequences, flash=True).
        flash = "flash" in self.implementation
        packed = flash or (call.get("past_key_values") is None and not use_cache)
        layout = find_sequences(
            tokens.shape[0],
            tokens.shape[1],
            call.get("attention_mask"),
            call.get("position_ids") if packed else None,
            tokens.device,
            flash,
        )
        self._forward = _Forward(layout)

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        forward, self._forward = self._forward, None
        if forward is None:
            return
        absent = [layer for layer in self.layers if layer not in forward.stats]
        if absent:
            raise CaptureError(
                f"layers {absent} were not run through the attention function during the forward; "
                f"{type(module).__name__} does not use transformers' attention functions there"
            )
        if forward.mask_checks:  # one read for the checks of all layers
            checks = list(forward.mask_checks.values())
            for (layer, _, _), ok in zip(checks, torch.stack([agree for _, _, agree in checks]).tolist()):
                if not ok:
                    raise self._mask_error(layer, forward.layout)
        stats = stats_engine.stack_layers([forward.stats[layer] for layer in self.layers])
        maps = None
        if self.map_bins is not None:
            maps = [torch.cat(per_layer) for per_layer in zip(*(forward.maps[layer] for layer in self.layers))]
        self._finished.append((stats, maps))

    def _observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, kwargs: dict
    ) -> None:
        """Called by the dispatcher for every attention call while this capture is active."""
        layer = self._layer_of.get(id(module))
        forward = self._forward
        if layer is not None and forward is not None:
            if forward.ulysses is None:
                self._record(layer, query, key, mask, kwargs, forward)
            else:  # recorded from verl's inner call, after its all-to-all (`dispatch.observe_gathered`)
                forward.ulysses.pending = (layer, query.shape[1], mask, kwargs)

    def _observed(self, module: torch.nn.Module) -> None:
        """After the attention function returned: under SP, refuse a selected layer whose inner call never came."""
        sp = None if self._forward is None else self._forward.ulysses
        if sp is not None and sp.pending is not None and id(module) in self._layer_of:
            layer, sp.pending = sp.pending[0], None
            raise capture_ulysses.not_reached(layer, sp.size)

    def _observe_gathered(self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Under SP: verl's inner flash call for the pending layer, q/k `(1, T, heads of this rank, D)`."""
        forward = self._forward
        sp = None if forward is None else forward.ulysses
        if sp is None or sp.pending is None or self._thread != threading.get_ident():
            return
        (layer, num_heads, mask, kwargs), sp.pending = sp.pending, None
        if forward.layout is None:
            forward.layout = capture_ulysses.gathered_layout(sp, query, position_ids)
        offset = capture_ulysses.head_offset(sp, query.shape[2], num_heads)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, L, D), as the attention function's
        self._record(layer, query, key, mask, kwargs, forward, offset, num_heads)

    def _record(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: Any,
        kwargs: dict,
        forward: _Forward,
        head_offset: int = 0,
        num_heads_total: int | None = None,
    ) -> None:
        if layer in forward.stats:
            raise CaptureError(
                f"layer {layer} ran twice in one forward (gradient checkpointing recompute?); "
                "capture only inside a forward-only pass"
            )
        if query.shape[2] != key.shape[2]:
            raise CaptureError("the capture needs a full forward without a KV cache (query and key lengths differ)")
        if kwargs.get("softcap") is not None:
            raise CaptureError(
                f"layer {layer} soft-caps its attention logits (softcap={kwargs['softcap']}), "
                "which the statistics do not model"
            )
        if kwargs.get("s_aux") is not None:
            raise CaptureError(f"layer {layer} has attention sinks (s_aux), which the statistics do not model")
        self._check_extent(layer, kwargs.get("sliding_window"), forward.layout)
        self._check_mask(layer, mask, forward)
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        start = time.perf_counter()
        with torch.no_grad():
            layout = forward.layout
            q, k = layout.pack(query), layout.pack(key)
            forward.stats[layer] = stats_engine.packed_token_stats(
                q,
                k,
                layout.sequences,
                self.cfg,
                scale=scale,
                head_offset=head_offset,
                num_heads_total=num_heads_total,
                chunk_size=self.chunk_size,
            )
            if self.map_bins is not None:  # analysis only: a loop over the sequences
                bounds = layout.sequences.bounds
                forward.maps[layer] = [
                    attention_map(
                        q[:, a:b],
                        k[:, a:b],
                        min(self.map_from, b - a),
                        self.map_bins,
                        scale=scale,
                        chunk_size=self.chunk_size,
                    )
                    for a, b in zip(bounds[:-1], bounds[1:])
                ]
        self.seconds += time.perf_counter() - start

    def _check_extent(self, layer: int, window: int | None, layout: SequenceLayout) -> None:
        """Refuse a sequence longer than the layer's sliding window, or a row longer than its attention chunk
        (chunks are cut by position in the row, so packed sequences share them)."""
        kind, size = self._limits.get(layer, ("sliding", None))
        if kind == "sliding" and isinstance(window, int) and window > 0:
            size = window if size is None else min(size, window)
        if size is None:
            return
        extent = layout.length if kind == "chunked" else max(layout.lengths, default=0)
        if extent > size:
            what = "a packed or padded row" if kind == "chunked" else "a sequence"
            raise CaptureError(
                f"layer {layer} uses {kind} attention over {size} tokens, shorter than {what} ({extent}); "
                f"choose full-attention layers with {LAYERS_OPTION}, or keep sequences within {size} tokens"
            )

    def _check_mask(self, layer: int, mask: Any, forward: _Forward) -> None:
        """Refuse when the mask the attention function got does not separate the sequences the capture found
        (a decoder that builds its mask its own way: OPT ignores packed position_ids). What the mask's values
        decide is computed on the device and read after the forward, with the other layers' checks."""
        layout = forward.layout
        if layout.sequences.num_tokens == 0:
            return  # nothing to separate
        if mask is None:
            # Flash attention splits packed rows itself, by the position_ids the capture also read;
            # eager and sdpa get no mask only for causal rows without padding.
            if not ("flash" in self.implementation or layout.whole_rows):
                raise self._mask_error(layer, layout)
            return
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
            return  # a mask format the check does not read (e.g. flex attention's BlockMask)
        if id(mask) in forward.mask_checks:  # held there, so the id is this mask's: an earlier layer's, checked
            return
        if mask.dim() == 2:  # flash: a padding mask, never a packing one
            if not layout.one_per_row:
                raise self._mask_error(layer, layout)
            agree = layout.unmasked(mask)
        else:
            agree = layout.separated_by(mask)
        forward.mask_checks[id(mask)] = (layer, mask, agree)

    def _mask_error(self, layer: int, layout: SequenceLayout) -> CaptureError:
        return CaptureError(
            f"layer {layer}: the model's attention mask does not separate the sequences the capture found in its "
            f"inputs ({sum(1 for n in layout.lengths if n)} sequences in {layout.rows} row(s)); this model builds "
            "its mask its own way: give it padded rows with a 2-D attention_mask (in verl: actor_rollout_ref.model."
            "use_remove_padding=False) instead of packed position_ids"
        )
