"""Launch budget of the statistics: kernel launches, aten ops and host syncs per captured layer.

For the Qwen3-4B head shape (32 query / 8 KV heads, head dim 128) and packed micro-batches of
16 x 1k and 2 x 8k tokens, it counts, on this (CPU) machine:

  cuda  : the CUDA path of `stats_engine` (dispatch forced to the Triton kernels) on the meta device:
          tensors without data, so every aten op is dispatched (and counted) as it would be on CUDA,
          and anything that reads device data on the host (`.item()`, `.tolist()`, `nonzero`, a copy
          to the CPU) raises, so a run that completes has no host sync. Each Triton launch is counted
          at the kernel's `run` and not executed (a kernel needs data: the interpreter tests in
          tests/test_kernels.py run the same launches on CPU tensors);
  cpu   : the CPU path of `stats_engine` (`metrics.token_stats` looped over the sequences);
  today : the per-sequence path the capture and the worker run today (`token_stats` per sequence per
          layer, `metrics.response_signals` per response).

Aten ops are counted with a TorchDispatchMode (views and allocations listed apart: they launch no
kernel on CUDA); host syncs are `.tolist()` calls and the ops that read device data on the host
(`_local_scalar_dense`: `.item()`, `int()`, `float()`; `nonzero` and friends: data-dependent shapes).
The cpu and today rows run the statistics for real, so they use 4 query / 1 KV heads of dim 16: their
op counts depend on the number and length of the sequences (a loop over sequences and over chunks of
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

from verl_anchor import AnchorConfig, metrics, stats_engine

LAYERS = 5
QWEN3_4B_HEADS = (32, 8, 128)  # query heads, KV heads, head dim
SMALL_HEADS = (4, 1, 16)
BATCHES = {"16 x 1k": [1024] * 16, "2 x 8k": [8192] * 2}
RESPONSE_FRACTION = 0.5
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
            "aten.unique_consecutive", "aten.repeat_interleave", "aten.argwhere"}
NO_KERNEL_OPS = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.lift_fresh", "aten.detach"}


class Counts:
    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.triton = 0
        self.tolist = 0

    def kernel_ops(self) -> int:
        """Aten ops that launch a kernel on CUDA (not views, not allocations)."""
        return sum(n for name, n in self.ops.items() if not name.endswith("(view)") and name not in NO_KERNEL_OPS)

    def syncs(self) -> int:
        return self.tolist + sum(n for name, n in self.ops.items() if name in SYNC_OPS)

    def row(self) -> tuple[int, int, int]:
        return self.triton + self.kernel_ops(), sum(self.ops.values()), self.syncs()


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
def counting(counts: Counts) -> Iterator[None]:
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        counts.tolist += 1
        return original_tolist(self)

    torch.Tensor.tolist = tolist
    _ACTIVE.append(counts)
    try:
        with _OpCounter(counts):
            yield
    finally:
        _ACTIVE.pop()
        torch.Tensor.tolist = original_tolist


@contextlib.contextmanager
def kernels_counted_not_run() -> Iterator[None]:
    """Force the Triton path and count its launches without running them."""
    from verl_anchor.kernels import triton_stats

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


def inputs(lengths: list[int], heads: tuple[int, int, int],
           device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_heads, num_kv, head_dim = heads
    total = sum(lengths)
    q, k = torch.randn(num_heads, total, head_dim, device=device), torch.randn(num_kv, total, head_dim, device=device)
    return q, k, torch.tensor([0, *lengths]).cumsum(0).to(device)


def count_engine(lengths: list[int], heads: tuple[int, int, int], cfg: AnchorConfig,
                 device: str = "cpu") -> dict[str, Counts]:
    """One forward's statistics through `stats_engine`: boundaries, LAYERS layers, then the worker's signals."""
    q, k, cu = inputs(lengths, heads, device)
    response_lengths = [int(n * RESPONSE_FRACTION) for n in lengths]
    responses = torch.tensor(response_lengths).to(device)
    counts = {"per forward": Counts(), "per layer": Counts(), "signals": Counts()}
    with counting(counts["per forward"]):
        sequences = stats_engine.PackedSequences(cu, q.shape[1])
        if stats_engine.select_backend(q) == "triton":
            from verl_anchor.kernels import triton_stats

            sequences.tiles(triton_stats.TILE)  # built once per forward, shared by the layers
    per_layer = []
    with counting(counts["per layer"]):
        for _ in range(LAYERS):
            per_layer.append(stats_engine.packed_token_stats(q, k, sequences, cfg))
    with counting(counts["signals"]):
        stats = stats_engine.stack_layers(per_layer)
        stats_engine.packed_response_signals(stats, responses, cfg, num_response_tokens=sum(response_lengths))
    return counts


def count_today(lengths: list[int], heads: tuple[int, int, int], cfg: AnchorConfig,
                device: str = "cpu") -> dict[str, Counts]:
    """Today's capture (token_stats per sequence and layer) and worker (response_signals per response)."""
    q, k, cu = inputs(lengths, heads, device)
    bounds = cu.tolist()
    counts = {"per forward": Counts(), "per layer": Counts(), "signals": Counts()}
    per_layer = []
    with counting(counts["per layer"]):
        for _ in range(LAYERS):
            per_layer.append([metrics.token_stats(q[:, a:b], k[:, a:b], cfg) for a, b in zip(bounds, bounds[1:])])
    with counting(counts["signals"]):
        for i, length in enumerate(lengths):
            parts = [layer[i] for layer in per_layer]
            stats = metrics.TokenStats(row_span=torch.cat([p.row_span for p in parts]),
                                       waad=torch.cat([p.waad for p in parts]), fai=torch.cat([p.fai for p in parts]))
            signals = metrics.response_signals(stats, int(length * RESPONSE_FRACTION), cfg)
            signals.waad.float().cpu(), signals.fai.float().cpu()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    cfg = AnchorConfig()
    paths: dict[str, tuple[Callable, tuple[int, int, int], str]] = {
        "cuda (Triton kernels)": (count_engine, QWEN3_4B_HEADS, "meta"),
        "cpu (stats_engine, torch)": (count_engine, SMALL_HEADS, "cpu"),
        "today (per sequence)": (count_today, SMALL_HEADS, "cpu"),
    }
    print(f"{LAYERS} captured layers, response = last {RESPONSE_FRACTION:.0%} of each sequence; "
          f"cuda row: heads {QWEN3_4B_HEADS}, cpu/today rows: heads {SMALL_HEADS} (counts do not depend on them)")
    print("| path | micro-batch | launches / layer | aten ops / layer | host syncs / layer "
          "| per forward: launches, ops, syncs | signals (all layers): launches, ops, syncs |")
    print("|---|---|---:|---:|---:|---|---|")
    for path, (count, heads, device) in paths.items():
        for batch, lengths in BATCHES.items():
            with kernels_counted_not_run() if path.startswith("cuda") else contextlib.nullcontext():
                result = count(lengths, heads, cfg, device)
            launches, ops, syncs = result["per layer"].row()
            forward, signals = result["per forward"].row(), result["signals"].row()
            print(f"| {path} | {batch} | {launches / LAYERS:g} | {ops / LAYERS:g} | {syncs / LAYERS:g} "
                  f"| {', '.join(map(str, forward))} | {', '.join(map(str, signals))} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
