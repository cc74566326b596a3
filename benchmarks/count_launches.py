"""Launch budget of the statistics, from the capture to the worker's outputs: launches, aten ops and host syncs.

For the Qwen3-4B head shape (32 query / 8 KV heads, head dim 128) and micro-batches of 16 x 1k and
2 x 8k tokens, it runs a model forward under `AttentionCapture` (5 captured layers), then
`stats_engine.packed_response_signals` on what `pop_packed()` gives (the worker's outputs; each
response the last half of its sequence), and counts:

  cuda   : the CUDA path (dispatch forced to the Triton kernels) on the meta device: tensors without
           data, so every aten op is dispatched (and counted) as it would be on CUDA, and anything
           that reads device data on the host (`.item()`, `.tolist()`, `nonzero`, a copy to the CPU)
           raises, so a run that completes has no host sync beyond those counted. Each Triton launch
           is counted at the kernel's `run` and not executed (tests/test_kernels.py runs the same
           launches in the interpreter). The one step that must read the device, the capture's
           pre-hook finding the sequences (`capture.layout.find_sequences`: how many sequences or
           tokens there are), runs on a CPU copy of the inputs, counted, and hands its result to the
           capture on meta;
  cpu    : the same on CPU tensors (the torch path: `metrics.token_stats` looped over the sequences);
  before : the per-sequence path the capture and the worker ran before issue 11 (`token_stats` per
           sequence and layer, `metrics.response_signals` per response).

The model is a Qwen3 with the head shape above, hidden size 32 and the 5 captured layers, whose
attention function is a stand-in for flash_attention_2 (the capture reads its inputs by flash
attention's rules) that computes nothing and gets no mask (flash_attention_2 on packed rows gets
none either; on padded rows it gets the 2-D padding mask, whose check adds 2-3 launches and one sync
per forward, not counted here). The capture's share is
separated from the model's own ops by counting the forward without the capture, with 1 captured
layer and with 5: per layer = (5 layers - 1 layer) / 4, per forward = 1 layer - no capture - per layer.

Aten ops are counted with a TorchDispatchMode (views and allocations listed apart: they launch no
kernel on CUDA); host syncs are `.tolist()` calls and the ops that read device data on the host
(`_local_scalar_dense`: `.item()`, `int()`, `bool()`; `nonzero` and friends: data-dependent shapes).
The cpu and before rows compute for real, so they use 4 query / 1 KV heads of dim 16: their op
counts depend on the number and length of the sequences (a loop over sequences and over chunks of
256 queries, every op over all heads at once), not on the head shape.

    python benchmarks/count_launches.py
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen3Config
from transformers.modeling_utils import AttentionInterface

from verl_anchor import AnchorConfig
from verl_anchor.capture import hooks as capture
from verl_anchor.capture.layout import SequenceLayout, find_sequences
from verl_anchor.core import metrics, stats_engine
from verl_anchor.core.stats_engine import PackedSequences

LAYERS = 5
QWEN3_4B_HEADS = (32, 8, 128)  # query heads, KV heads, head dim
SMALL_HEADS = (4, 1, 16)
BATCHES = {"16 x 1k": [1024] * 16, "2 x 8k": [8192] * 2}
RESPONSE_FRACTION = 0.5
STAND_IN = "flash_stand_in"  # any name with "flash" reads as flash attention to the capture
SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
    "aten.argwhere",
    "aten.equal",
}
NO_KERNEL_OPS = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.lift_fresh", "aten.detach"}

Row = tuple[float, float, float]  # launches, aten ops, host syncs


class Counts:
    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.triton = 0
        self.tolist = 0

    def row(self) -> Row:
        """(launches: Triton + aten ops that launch a kernel on CUDA, all aten ops, host syncs)."""
        kernel_ops = sum(n for name, n in self.ops.items() if not name.endswith("(view)") and name not in NO_KERNEL_OPS)
        syncs = self.tolist + sum(n for name, n in self.ops.items() if name in SYNC_OPS)
        return self.triton + kernel_ops, sum(self.ops.values()), syncs


def combine(*terms: tuple[float, Row]) -> Row:
    """sum of coefficient * row."""
    return tuple(sum(c * row[i] for c, row in terms) for i in range(3))


class _OpCounter(TorchDispatchMode):
    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten.{func.overloadpacket.__name__}" + (" (view)" if func.is_view else "")
        self.counts.ops[name] += 1
        return func(*args, **(kwargs or {}))


_ACTIVE: list[Counts] = []  # the counts that Triton launches go to


@contextlib.contextmanager
def counting(counts: Counts) -> Iterator[Counts]:
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        counts.tolist += 1
        return original_tolist(self)

    torch.Tensor.tolist = tolist
    _ACTIVE.append(counts)
    try:
        with _OpCounter(counts):
            yield counts
    finally:
        _ACTIVE.pop()
        torch.Tensor.tolist = original_tolist


@contextlib.contextmanager
def kernels_counted_not_run() -> Iterator[None]:
    """Force the Triton path and count its launches without running them."""
    from verl_anchor.core.kernels import triton_stats

    def fake_run(*args, **kwargs):
        _ACTIVE[-1].triton += 1

    saved = stats_engine.select_backend
    stats_engine.select_backend = lambda q: "triton"
    for kernel in triton_stats.KERNELS:
        kernel.run = fake_run
    try:
        yield
    finally:
        stats_engine.select_backend = saved
        for kernel in triton_stats.KERNELS:
            del kernel.run


def stand_in_attention(module, query, key, value, attention_mask, **kwargs):
    return torch.zeros_like(query).transpose(1, 2), None


def build_model(heads: tuple[int, int, int], device: str) -> torch.nn.Module:
    num_heads, num_kv, head_dim = heads
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    # Set after loading: asked for by a name with "flash", transformers would load flash-attn. Registered
    # without a mask function, it gets no mask (transformers' early exit, which reads nothing).
    AttentionInterface.register(STAND_IN, stand_in_attention)
    model.config._attn_implementation_internal = STAND_IN
    return model


def decoder_inputs(lengths: list[int], layout: str) -> dict[str, torch.Tensor]:
    """verl's packed layout (one row, position_ids restarting) or rows with a 2-D mask, on CPU."""
    if layout == "packed":
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        return dict(input_ids=torch.zeros_like(positions), position_ids=positions)
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=torch.zeros_like(mask), attention_mask=mask)


def on_meta(layout: SequenceLayout) -> SequenceLayout:
    """The same layout on the meta device (its boundaries are read from the device, where the capture needs them)."""
    sequences = PackedSequences(layout.sequences.cu_seqlens.to("meta"), layout.sequences.num_tokens)
    tokens = None if layout.tokens is None else tuple(t.to("meta") for t in layout.tokens)
    return SequenceLayout(layout.rows, layout.length, sequences, tokens)


@contextlib.contextmanager
def sequences_found_on_cpu(twins: Iterator[SequenceLayout]) -> Iterator[None]:
    """The capture's pre-hook gets each forward's layout from `twins` (found on CPU beforehand)."""
    saved = capture.find_sequences
    capture.find_sequences = lambda *args: next(twins)
    try:
        yield
    finally:
        capture.find_sequences = saved


def count_capture(lengths: list[int], layout: str, heads: tuple[int, int, int], device: str) -> dict[str, Row]:
    """One forward under the capture: per captured layer and per forward; then the worker's signals."""
    model = build_model(heads, device)
    cpu = decoder_inputs(lengths, layout)
    inputs = {name: tensor.to(device) for name, tensor in cpu.items()}
    found_on_cpu: Row = (0, 0, 0)
    pre_hook = contextlib.nullcontext()
    if device == "meta":
        batch, length = cpu["input_ids"].shape
        with counting(Counts()) as counts:
            found = find_sequences(batch, length, cpu.get("attention_mask"), cpu.get("position_ids"), "cpu", flash=True)
        found_on_cpu = counts.row()
        pre_hook = sequences_found_on_cpu(iter([on_meta(found), on_meta(found)]))

    def forward(layers: int | None) -> tuple[Row, stats_engine.PackedTokenStats | None]:
        cfg = AnchorConfig(layers=list(range(layers))) if layers else None
        recorder = capture.AttentionCapture(model, cfg) if cfg else contextlib.nullcontext()
        with torch.no_grad(), recorder, counting(Counts()) as counts:
            model.model(**inputs, use_cache=False)
        return counts.row(), recorder.pop_packed()[0] if cfg else None

    with pre_hook:
        plain, _ = forward(None)
        one, _ = forward(1)
        five, stats = forward(LAYERS)
    response_lengths = [int(n * RESPONSE_FRACTION) for n in lengths]
    with counting(Counts()) as signals:
        stats_engine.packed_response_signals(
            stats, torch.tensor(response_lengths).to(device), AnchorConfig(), num_response_tokens=sum(response_lengths)
        )
    per_layer = combine((1 / (LAYERS - 1), five), (-1 / (LAYERS - 1), one))
    per_forward = combine((1, one), (-1, plain), (-1, per_layer), (1, found_on_cpu))
    return {"per layer": per_layer, "per forward": per_forward, "signals": signals.row()}


def count_per_sequence(lengths: list[int], layout: str, heads: tuple[int, int, int], device: str) -> dict[str, Row]:
    """The capture and worker before issue 11: token_stats per sequence and layer, response_signals per response."""
    num_heads, num_kv, head_dim = heads
    q, k = torch.randn(num_heads, sum(lengths), head_dim), torch.randn(num_kv, sum(lengths), head_dim)
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    cfg, per_layer = AnchorConfig(), []
    with counting(Counts()) as layers:
        for _ in range(LAYERS):
            per_layer.append([metrics.token_stats(q[:, a:b], k[:, a:b], cfg) for a, b in zip(bounds, bounds[1:])])
    with counting(Counts()) as signals:
        for i, length in enumerate(lengths):
            parts = [layer[i] for layer in per_layer]
            stats = metrics.TokenStats(
                row_span=torch.cat([p.row_span for p in parts]),
                waad=torch.cat([p.waad for p in parts]),
                fai=torch.cat([p.fai for p in parts]),
            )
            result = metrics.response_signals(stats, int(length * RESPONSE_FRACTION), cfg)
            result.waad.float().cpu(), result.fai.float().cpu()
    return {"per layer": combine((1 / LAYERS, layers.row())), "per forward": (0, 0, 0), "signals": signals.row()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    paths: dict[str, tuple[Callable, list[str], tuple[int, int, int], str]] = {
        "cuda (Triton kernels)": (count_capture, ["packed", "padded"], QWEN3_4B_HEADS, "meta"),
        "cpu (torch path)": (count_capture, ["packed"], SMALL_HEADS, "cpu"),
        "before (per sequence)": (count_per_sequence, ["packed"], SMALL_HEADS, "cpu"),
    }
    print(
        f"{LAYERS} captured layers, response = last {RESPONSE_FRACTION:.0%} of each sequence; "
        f"cuda rows: heads {QWEN3_4B_HEADS}, cpu/before rows: heads {SMALL_HEADS} (counts do not depend on them)"
    )
    print(
        "| path | layout | micro-batch | launches / layer | aten ops / layer | host syncs / layer "
        "| per forward: launches, ops, syncs | worker signals (per micro-batch): launches, ops, syncs |"
    )
    print("|---|---|---|---:|---:|---:|---|---|")
    for path, (count, layouts, heads, device) in paths.items():
        for layout in layouts:
            for batch, lengths in BATCHES.items():
                with kernels_counted_not_run() if path.startswith("cuda") else contextlib.nullcontext():
                    result = count(lengths, layout, heads, device)
                launches, ops, syncs = result["per layer"]
                forward, signals = (", ".join(f"{n:g}" for n in result[key]) for key in ("per forward", "signals"))
                print(
                    f"| {path} | {layout} | {batch} | {launches:g} | {ops:g} | {syncs:g} | {forward} | {signals} |",
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
