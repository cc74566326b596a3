"""Attention capture for Hugging Face decoder models: statistics computed inside the forward pass.

`AttentionCapture(model, cfg, max_length=...)` is a context manager. While it is active, every
forward of `model` computes, for the selected layers only, the per-token statistics of
`verl_anchor.metrics.token_stats` from the post-RoPE `q`, `k` that the model's attention
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

Sequences are found from the decoder's inputs, exactly as transformers' masking does: with a
2-D `attention_mask`, each row's unmasked tokens form one sequence (any padding pattern);
without one and without a KV cache (`past_key_values` is None and `use_cache` resolves to False:
the argument, else the decoder config's `use_cache`, and False under gradient checkpointing in
training, as transformers resolves it; verl passes `use_cache=False`), `position_ids` that do
not step by 1 start a new sequence (verl's packed "remove padding" layout); otherwise each row is
one sequence.

The attention function: transformers looks it up by name in `ALL_ATTENTION_FUNCTIONS` on every
call. While at least one capture is active, one dispatcher sits under each implementation name
in use (`eager`, `sdpa`, `flash_attention_2`, ...) in that mapping's local layer; it shows every
call to each active capture (each records only its own model's selected layers) and then calls
the function that was there before. The first capture to enter installs it and the last to
exit puts the entry back exactly as it found it, so captures may nest, exit in any order, and
run at the same time on different models in different threads; the registry holds no capture
once all have exited. Entering a capture that is already active is refused. Using the model's
existing name matters: a new name would need its own mask function, and without one
transformers silently drops the padding mask.

Attention the statistics do not model is refused when the capture is built, never approximated
(`docs/models.md` lists the model families): attention sinks (GPT-OSS; rows do not sum to 1),
logit soft-capping (Gemma 2), 3-D mRoPE position ids (Qwen2-VL style), attention modules that do
not go through transformers' attention functions (linear/lightning attention, differential
attention, ALiBi models, ...), layers that are not softmax attention (mamba, convolution,
linear-attention layers of hybrids), and sliding windows or attention chunks shorter than
`max_length`. Each forward checks again what only the inputs show: a sequence longer than a
window, a row longer than an attention chunk, a KV cache, soft-capping or sinks passed to the
attention function, and a mask that does not separate the sequences the capture found (a decoder
that builds its mask its own way, as OPT does for packed rows, is refused, never misread).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from verl_anchor.config import AnchorConfig
from verl_anchor.metrics import TokenStats, attention_map, select_layers, token_stats

_MISSING = object()
# Layer kinds of `config.layer_types` that are softmax attention over q.k (Jamba says "attention").
_ATTENTION_KINDS = ("full_attention", "attention", "sliding_attention", "chunked_attention")
_LAYERS_OPTION = "`layers` (algorithm.anchor.layers in training)"


class CaptureError(RuntimeError):
    """The model or its inputs cannot be captured (the message says why and what to do)."""


def find_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers module that runs `model`'s decoder layers, through any wrapper (module doc)."""
    root = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if root is None:
        raise CaptureError(
            f"{type(model).__name__} has no Hugging Face attention modules with a `layer_idx` (it holds no "
            "transformers model), so its attention cannot be captured; use a transformers decoder model "
            "(Qwen2/Qwen3/Llama-style) with the eager, sdpa or flash_attention_2 implementation"
        )
    decoder = root.get_decoder()
    return decoder if isinstance(decoder, torch.nn.Module) else root


def attention_modules(model: torch.nn.Module, decoder: torch.nn.Module | None = None) -> dict[int, torch.nn.Module]:
    """The self-attention modules of `model`'s decoder (`find_decoder`, unless given), by `layer_idx`.

    Raises `CaptureError` if there are none.
    """
    found: dict[int, torch.nn.Module] = {}
    for name, module in (find_decoder(model) if decoder is None else decoder).named_modules():
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


def capturable_layers(model: torch.nn.Module, max_length: int | None = None) -> list[int]:
    """The layers of `model` whose attention the capture can read (with sequences up to `max_length` tokens).

    Raises `CaptureError` when the model as a whole cannot be captured (module doc).
    """
    decoder = find_decoder(model)
    modules = attention_modules(model, decoder)
    implementation = getattr(decoder.config, "_attn_implementation", None) or "eager"
    _check_model(decoder.config, implementation)
    _, limits = _layer_problems(decoder.config, modules, _num_layers(decoder.config, modules), max_length,
                                implementation)
    return sorted(limits)


class AttentionCapture:
    """Record per-token attention statistics of the selected layers during `model`'s forward passes."""

    def __init__(self, model: torch.nn.Module, cfg: AnchorConfig, chunk_size: int | None = None,
                 map_bins: int | None = None, *, max_length: int | None = None) -> None:
        """`map_bins`: also pool each sequence's attention from position `map_from` on into at most
        `map_bins` x `map_bins` cells per head (`TokenStats.attention_map`, for figures; analysis only).
        `max_length`: the longest sequence the capture will see (prompt plus response); sliding windows and
        attention chunks shorter than it are refused here. None: they are checked against each forward's inputs.
        """
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise CaptureError(f"max_length={max_length!r} is invalid: give the longest sequence (prompt plus "
                               "response, in tokens) as an integer >= 1, or None")
        self.model = model
        self.cfg = cfg
        self.chunk_size = chunk_size
        self.map_bins = map_bins
        self.max_length = max_length
        self.map_from = 0  # where the pooled maps start in each sequence (e.g. the response start)
        self.decoder = find_decoder(model)
        modules = attention_modules(model, self.decoder)
        config = self.decoder.config
        self.implementation = getattr(config, "_attn_implementation", None) or "eager"
        num_layers = _num_layers(config, modules)
        self.layers = list(cfg.layers) if cfg.layers is not None else select_layers(num_layers, cfg.num_layers)
        _check_model(config, self.implementation)
        problems, self._limits = _layer_problems(config, modules, num_layers, max_length, self.implementation)
        bad = [layer for layer in self.layers if layer not in self._limits]
        if bad:
            raise CaptureError(_layers_message(self.layers, bad, problems, num_layers, cfg.num_layers))
        self._layer_of = {id(modules[layer]): layer for layer in self.layers}
        self._signature = inspect.signature(self.decoder.forward)
        self._var_keyword = next((p.name for p in self._signature.parameters.values()
                                  if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._segments: list[tuple[int, torch.Tensor]] | None = None
        self._rows = self._row_length = 0
        self._bounds: list[tuple[int, int, int]] = []
        self._current: dict[int, list[TokenStats]] = {}
        self._finished: list[list[TokenStats]] = []
        self._handles: list[Any] = []
        self.seconds = 0.0  # time spent computing statistics (not in the model's own attention)

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "AttentionCapture":
        _REGISTRY.enter(self)
        self._handles = [
            self.decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.decoder.register_forward_hook(self._after_forward),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._segments = None
        _REGISTRY.exit(self)

    # -- results ---------------------------------------------------------------------------
    def pop(self) -> list[TokenStats]:
        """Statistics of every sequence seen since the last `pop`, in input order (row-major).

        Heads are (layer, head) in layer order: `H = len(layers) * num_query_heads`.
        """
        done, self._finished = self._finished, []
        return [stats for forward in done for stats in forward]

    # -- hooks -----------------------------------------------------------------------------
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            call = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError as err:
            raise CaptureError(f"{type(module).__name__}.forward was called with arguments its signature "
                               f"does not take ({err})") from err
        call.update(call.pop(self._var_keyword, None) or {})  # e.g. use_cache passed through **kwargs
        tokens = call.get("input_ids")
        if tokens is None:
            tokens = call.get("inputs_embeds")
        if tokens is None:
            raise CaptureError(f"the capture needs `input_ids` or `inputs_embeds` in the call of "
                               f"{type(module).__name__}")
        # transformers treats restarting position_ids as packed sequences only without a KV cache,
        # which the decoder creates whenever use_cache resolves to True.
        use_cache = call.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        if getattr(module, "gradient_checkpointing", False) and module.training:
            use_cache = False
        packed = call.get("past_key_values") is None and not use_cache
        self._segments = sequence_segments(tokens.shape[0], tokens.shape[1], call.get("attention_mask"),
                                           call.get("position_ids") if packed else None, tokens.device)
        self._rows, self._row_length = tokens.shape[0], tokens.shape[1]
        # (row, first, last) token of every non-empty sequence, read once per forward (one device sync).
        nonempty = [(row, idx) for row, idx in self._segments if len(idx)]
        ends = torch.stack([idx[[0, -1]] for _, idx in nonempty]).tolist() if nonempty else []
        self._bounds = [(row, a, b) for (row, _), (a, b) in zip(nonempty, ends)]
        self._current = {}

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._segments is None:
            return
        per_layer = [self._current.get(layer) for layer in self.layers]
        if any(stats is None for stats in per_layer):
            absent = [layer for layer, stats in zip(self.layers, per_layer) if stats is None]
            raise CaptureError(f"layers {absent} were not run through the attention function during the forward; "
                               f"{type(module).__name__} does not use transformers' attention functions there")
        self._finished.append([_concat_heads(parts) for parts in zip(*per_layer)])
        self._segments = None
        self._current = {}

    def _observe(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any,
                 kwargs: dict) -> None:
        """Called by the dispatcher for every attention call while this capture is active."""
        layer = self._layer_of.get(id(module))
        if layer is not None and self._segments is not None:
            self._record(layer, query, key, mask, kwargs)

    def _record(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: Any, kwargs: dict) -> None:
        if layer in self._current:
            raise CaptureError(
                f"layer {layer} ran twice in one forward (gradient checkpointing recompute?); "
                "capture only inside a forward-only pass"
            )
        if query.shape[2] != key.shape[2]:
            raise CaptureError("the capture needs a full forward without a KV cache (query and key lengths differ)")
        if kwargs.get("softcap") is not None:
            raise CaptureError(f"layer {layer} soft-caps its attention logits (softcap={kwargs['softcap']}), "
                               "which the statistics do not model")
        if kwargs.get("s_aux") is not None:
            raise CaptureError(f"layer {layer} has attention sinks (s_aux), which the statistics do not model")
        self._check_extent(layer, kwargs.get("sliding_window"))
        self._check_mask(layer, mask)
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

    def _check_extent(self, layer: int, window: int | None) -> None:
        """Refuse a sequence longer than the layer's sliding window, or a row longer than its attention chunk
        (chunks are cut by position in the row, so packed sequences share them)."""
        kind, size = self._limits.get(layer, ("sliding", None))
        if kind == "sliding" and isinstance(window, int) and window > 0:
            size = window if size is None else min(size, window)
        if size is None:
            return
        extent = self._row_length if kind == "chunked" else max((b - a + 1 for _, a, b in self._bounds), default=0)
        if extent > size:
            what = "a packed or padded row" if kind == "chunked" else "a sequence"
            raise CaptureError(
                f"layer {layer} uses {kind} attention over {size} tokens, shorter than {what} ({extent}); "
                f"choose full-attention layers with {_LAYERS_OPTION}, or keep sequences within {size} tokens"
            )

    def _check_mask(self, layer: int, mask: Any) -> None:
        """Refuse when the mask the attention function got does not separate the sequences the capture found
        (a decoder that builds its mask its own way: OPT ignores packed position_ids). Reads the first and last
        token of each sequence and the step between consecutive ones in a row: one small gather."""
        bounds = self._bounds
        one_per_row = len({row for row, _, _ in bounds}) == len(bounds)
        if mask is None:
            # Flash attention splits packed rows itself, by the position_ids the capture also read;
            # eager and sdpa get no mask only for causal rows without padding.
            agree = "flash" in self.implementation or (
                one_per_row and all(b - a + 1 == self._row_length for _, a, b in bounds))
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:  # flash: a padding mask, never a packing one
            agree = one_per_row and bool(torch.cat([mask[row, idx] for row, idx in self._segments]).bool().all())
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            must = [(row, t, t) for row, a, b in bounds for t in (a, b)]
            never = [(row, a, prev_b) for (row, a, _), (prev_row, _, prev_b) in zip(bounds[1:], bounds)
                     if row == prev_row]
            rows, queries, keys = torch.tensor(must + never, device=mask.device).T
            picked = mask.expand(self._rows, -1, -1, -1)[rows, 0, queries, keys]
            if picked.dtype != torch.bool:  # additive masks: 0 where allowed, the dtype's minimum or -inf where not
                picked = picked > torch.finfo(picked.dtype).min / 2
            agree = bool(picked[: len(must)].all()) and not bool(picked[len(must):].any())
        else:
            return  # a mask format the check does not read (e.g. flex attention's BlockMask)
        if not agree:
            raise CaptureError(
                f"layer {layer}: the model's attention mask does not separate the sequences the capture found in "
                f"its inputs ({len(bounds)} sequences in {self._rows} row(s)); this model builds its mask its own "
                "way: give it padded rows with a 2-D attention_mask (in verl: actor_rollout_ref.model."
                "use_remove_padding=False) instead of packed position_ids"
            )


class _Registry:
    """The dispatchers that active captures share in `ALL_ATTENTION_FUNCTIONS` (module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active: tuple[AttentionCapture, ...] = ()  # replaced, never mutated: dispatchers read it unlocked
        self._installed: dict[str, tuple[Callable, Any]] = {}  # name -> (dispatcher, the entry it replaced)

    def enter(self, capture: AttentionCapture) -> None:
        with self._lock:
            if any(active is capture for active in self.active):
                raise CaptureError("this AttentionCapture is already active: enter it once at a time "
                                   "(build a second capture to capture the same model twice)")
            name = capture.implementation
            if name not in self._installed:
                previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(name, _MISSING)
                original = ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else None
                dispatcher = _dispatcher(original)
                ALL_ATTENTION_FUNCTIONS[name] = dispatcher
                self._installed[name] = (dispatcher, previous)
            self.active = (*self.active, capture)

    def exit(self, capture: AttentionCapture) -> None:
        with self._lock:
            if not any(active is capture for active in self.active):
                return
            self.active = tuple(active for active in self.active if active is not capture)
            name = capture.implementation
            if any(active.implementation == name for active in self.active):
                return
            dispatcher, previous = self._installed.pop(name)
            # Put back what was there, unless someone replaced the dispatcher since (theirs stays).
            if ALL_ATTENTION_FUNCTIONS._local_mapping.get(name) is dispatcher:
                if previous is _MISSING:
                    del ALL_ATTENTION_FUNCTIONS._local_mapping[name]
                else:
                    ALL_ATTENTION_FUNCTIONS._local_mapping[name] = previous


_REGISTRY = _Registry()


def _dispatcher(original: Callable | None) -> Callable:
    """The attention function installed while captures are active: show the call to each, then run `original`
    (None: the eager function of the module's own modeling file, as transformers falls back to)."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any):
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")  # args: (value, attention_mask, ...)
        for capture in _REGISTRY.active:
            capture._observe(module, query, key, mask, kwargs)
        function = original or _eager_default(type(module))
        return function(module, query, key, *args, **kwargs)

    return attention


def _num_layers(config: Any, modules: dict[int, torch.nn.Module]) -> int:
    return getattr(config, "num_hidden_layers", None) or (max(modules) + 1)


@functools.cache
def _eager_default(attention_class: type) -> Callable | None:
    """The eager function an attention class's forward falls back to when no "eager" entry is registered."""
    return inspect.unwrap(attention_class.forward).__globals__.get("eager_attention_forward")


def _check_model(config: Any, implementation: str) -> None:
    """Refuse what no layer choice can fix."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    ropes = list(rope.values()) + [rope] if isinstance(rope, dict) else []  # also per-layer-type dicts
    if any(isinstance(r, dict) and r.get("mrope_section") for r in ropes):
        raise CaptureError(
            f"{type(config).__name__} uses multimodal 3-D RoPE (mrope_section): its 3-D position_ids do not mark "
            "sequence boundaries the way the capture reads them; use a text-only model"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise CaptureError(
            f"{type(config).__name__} soft-caps attention logits (attn_logit_softcapping="
            f"{config.attn_logit_softcapping}): the statistics assume plain softmax(q.k) attention; use a model "
            "without soft-capping"
        )
    if implementation != "eager" and implementation not in ALL_ATTENTION_FUNCTIONS:
        raise CaptureError(f"attn_implementation={implementation!r} is not registered in transformers' "
                           "AttentionInterface; use eager, sdpa or flash_attention_2")


def _layer_problems(
    config: Any, modules: dict[int, torch.nn.Module], num_layers: int, max_length: int | None, implementation: str
) -> tuple[dict[int, str], dict[int, tuple[str, int | None]]]:
    """Why each layer that cannot be captured cannot, and each capturable layer's (kind, extent limit)."""
    layer_types = getattr(config, "layer_types", None)
    problems: dict[int, str] = {}
    limits: dict[int, tuple[str, int | None]] = {}
    for layer in range(max(num_layers, max(modules) + 1)):
        module = modules.get(layer)
        kind = layer_types[layer] if layer_types is not None and layer < len(layer_types) else None
        if module is None:
            problems[layer] = f"a {kind} layer, not attention" if kind else "no attention module in this layer"
            continue
        forward = inspect.unwrap(type(module).forward)
        if "ALL_ATTENTION_FUNCTIONS" not in getattr(getattr(forward, "__code__", None), "co_names", ()):
            problems[layer] = (f"{type(module).__name__} does not go through transformers' attention functions "
                               "(its own attention code: linear or lightning attention, differential attention, "
                               "ALiBi, or an older modeling file)")
        elif kind is not None and kind not in _ATTENTION_KINDS:
            problems[layer] = f"a {kind} layer, not softmax attention"
        elif implementation == "eager" and _eager_default(type(module)) is None:
            problems[layer] = (f"{type(module).__name__} has no eager_attention_forward to fall back to; load the "
                               "model with attn_implementation='sdpa'")
        elif isinstance(getattr(module, "sinks", None), torch.Tensor):
            problems[layer] = (f"attention sinks ({type(module).__name__}.sinks): part of each row's attention "
                               "goes to a learned sink, so rows do not sum to 1")
        else:
            kind_name, size = _extent_limit(config, module, kind)
            if max_length is not None and size is not None and size < max_length:
                problems[layer] = f"{kind_name} attention over {size} tokens, shorter than max_length={max_length}"
            else:
                limits[layer] = (kind_name, size)
    return problems, limits


def _extent_limit(config: Any, module: torch.nn.Module, kind: str | None) -> tuple[str, int | None]:
    """("sliding", window) or ("chunked", chunk size) of one attention layer; size None when unlimited."""
    if kind == "chunked_attention":
        return "chunked", getattr(config, "attention_chunk_size", None)
    windows = [getattr(module, "sliding_window", None)]
    if kind in (None, "sliding_attention"):  # without layer_types a config window applies to every layer
        windows.append(getattr(config, "sliding_window", None))
    windows = [w for w in windows if isinstance(w, int) and not isinstance(w, bool) and w > 0]
    return "sliding", min(windows, default=None)


def _layers_message(selected: list[int], bad: list[int], problems: dict[int, str], num_layers: int,
                    wanted: int) -> str:
    available = [layer for layer in range(num_layers) if layer not in problems]
    out_of_range = f"out of range, the model has layers 0..{num_layers - 1}"
    reasons = "; ".join(f"layer {layer}: {problems.get(layer, out_of_range)}" for layer in bad)
    if not available:
        return (f"layers={selected} cannot be captured ({reasons}), and no layer of this model can; use a model "
                "from the table in docs/models.md")
    middle = [layer for layer in available if num_layers // 3 <= layer <= (2 * num_layers) // 3] or available
    step = max(1, len(middle) // wanted)
    return (f"layers={selected} cannot be captured ({reasons}). The layers the capture can read are {available}; "
            f"set {_LAYERS_OPTION} to some of them, e.g. {middle[::step][:wanted]} (middle third)")


def sequence_segments(
    batch: int,
    length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
) -> list[tuple[int, torch.Tensor]]:
    """(row, token indices) of every sequence in a batch, by transformers' own rules (module doc)."""
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise CaptureError(f"the capture needs a 2-D attention_mask (batch, length), got {shape}")
        return [(row, attention_mask[row].nonzero().flatten().to(device)) for row in range(batch)]
    if position_ids is not None:
        if position_ids.dim() != 2:
            raise CaptureError(f"the capture needs 2-D position_ids, got shape {tuple(position_ids.shape)} "
                               "(3-D mRoPE position ids are not supported)")
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
