"""What the attention capture refuses when it is built, and where it finds the model's attention.

`find_decoder` and `attention_modules` locate the decoder and its self-attention modules through
any wrapper (see `verl_anchor.capture.hooks`). `check_model` and `layer_problems` refuse attention the
statistics do not model, never approximating it (`docs/models.md` lists the model families):
attention sinks (GPT-OSS; rows do not sum to 1), logit soft-capping (Gemma 2), 3-D mRoPE position
ids (Qwen2-VL style), attention modules that do not go through transformers' attention functions
(linear/lightning attention, differential attention, ALiBi models, ...), layers that are not
softmax attention (mamba, convolution, linear-attention layers of hybrids), and sliding windows or
attention chunks shorter than the longest sequence the capture will see (`max_length`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from verl_anchor.core import stats_engine
from verl_anchor.integration.verl_api import ALL_ATTENTION_FUNCTIONS

# Layer kinds of `config.layer_types` that are softmax attention over q.k (Jamba says "attention").
_ATTENTION_KINDS = ("full_attention", "attention", "sliding_attention", "chunked_attention")
LAYERS_OPTION = "`layers` (algorithm.anchor.layers in training, --layers in the analysis commands)"


class CaptureError(RuntimeError):
    """The model or its inputs cannot be captured (the message says why and what to do)."""


def find_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers module that runs `model`'s decoder layers, through any wrapper (`verl_anchor.capture.hooks`)."""
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
    check_model(decoder.config, implementation)
    _, limits = layer_problems(decoder.config, modules, num_layers(decoder.config, modules), max_length, implementation)
    return sorted(limits)


def num_layers(config: Any, modules: dict[int, torch.nn.Module]) -> int:
    return getattr(config, "num_hidden_layers", None) or (max(modules) + 1)


@functools.cache
def eager_default(attention_class: type) -> Callable | None:
    """The eager function an attention class's forward falls back to when no "eager" entry is registered."""
    return inspect.unwrap(attention_class.forward).__globals__.get("eager_attention_forward")


def check_model(config: Any, implementation: str) -> None:
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
        raise CaptureError(
            f"attn_implementation={implementation!r} is not registered in transformers' "
            "AttentionInterface; use eager, sdpa or flash_attention_2"
        )


def layer_problems(
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
            problems[layer] = (
                f"{type(module).__name__} does not go through transformers' attention functions "
                "(its own attention code: linear or lightning attention, differential attention, "
                "ALiBi, or an older modeling file)"
            )
        elif kind is not None and kind not in _ATTENTION_KINDS:
            problems[layer] = f"a {kind} layer, not softmax attention"
        elif implementation == "eager" and eager_default(type(module)) is None:
            problems[layer] = (
                f"{type(module).__name__} has no eager_attention_forward to fall back to; load the "
                "model with attn_implementation='sdpa'"
            )
        elif isinstance(getattr(module, "sinks", None), torch.Tensor):
            problems[layer] = (
                f"attention sinks ({type(module).__name__}.sinks): part of each row's attention "
                "goes to a learned sink, so rows do not sum to 1"
            )
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
    if kind == "full_attention":
        # layer_types decides: EXAONE 4 sets `sliding_window` on every attention module but passes it to the
        # attention function only on sliding layers. A window the function does get is still checked per forward.
        return "sliding", None
    windows = [getattr(module, "sliding_window", None)]
    if kind in (None, "sliding_attention"):  # without layer_types a config window applies to every layer
        windows.append(getattr(config, "sliding_window", None))
    windows = [w for w in windows if isinstance(w, int) and not isinstance(w, bool) and w > 0]
    return "sliding", min(windows, default=None)


def statistics_device_problem(decoder: torch.nn.Module, modules: list[torch.nn.Module]) -> str | None:
    """Whether the statistics kernels can run where this model's forwards will (`stats_engine.
    kernel_device_problem`), asked when the capture is built so that a fallback to the torch path is decided and
    warned about at start-up. The device: the decoder's CUDA parameters', else the current CUDA device where
    there is one (parameters offloaded to the CPU between steps); None on a machine without CUDA."""
    device = next((p.device for p in decoder.parameters() if p.device.type == "cuda"), None)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    head_dims = {getattr(module, "head_dim", None) for module in modules} - {None}
    if device is None or not head_dims:
        return None  # nothing to ask (the first forward's select_backend still checks q itself)
    problems = [stats_engine.kernel_device_problem(device, head_dim) for head_dim in sorted(head_dims)]
    return next((problem for problem in problems if problem), None)


def layers_message(selected: list[int], bad: list[int], problems: dict[int, str], num_layers: int, wanted: int) -> str:
    """Why the selected layers `bad` cannot be captured, and which layers could be."""
    available = [layer for layer in range(num_layers) if layer not in problems]
    out_of_range = f"out of range, the model has layers 0..{num_layers - 1}"
    reasons = "; ".join(f"layer {layer}: {problems.get(layer, out_of_range)}" for layer in bad)
    if not available:
        return (
            f"layers={selected} cannot be captured ({reasons}), and no layer of this model can; use a model "
            "from the table in docs/models.md"
        )
    middle = [layer for layer in available if num_layers // 3 <= layer <= (2 * num_layers) // 3] or available
    step = max(1, len(middle) // wanted)
    return (
        f"layers={selected} cannot be captured ({reasons}). The layers the capture can read are {available}; "
        f"set {LAYERS_OPTION} to some of them, e.g. {middle[::step][:wanted]} (middle third)"
    )
