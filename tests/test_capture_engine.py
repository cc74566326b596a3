"""The capture feeds the batched engine: one `stats_engine.packed_token_stats` call per captured layer per forward,
whatever the number of sequences and in every layout verl uses, and on the CUDA dispatch the Triton kernels."""

import types

import pytest
import torch
from test_capture import build
from torch.utils._python_dispatch import TorchDispatchMode

from verl_anchor import AnchorConfig
from verl_anchor.capture.hooks import AttentionCapture
from verl_anchor.capture.layout import SequenceLayout
from verl_anchor.core import stats_engine

CFG = AnchorConfig(layers=[0, 2, 3], fai_h_lo=2, fai_h_hi=6, window=4)
LAYOUTS = ["packed", "padded", "rows"]


def sequences(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (count,), generator=generator).tolist()
    return [torch.randint(1, 128, (n,), generator=generator).tolist() for n in lengths]


def inputs(seqs, layout):
    """The decoder inputs of verl's layouts: packed position_ids (remove padding), left-padded rows with a 2-D mask,
    or rows without a mask (all sequences cut to the shortest length)."""
    if layout == "packed":
        positions = sum((list(range(len(s))) for s in seqs), [])
        return dict(input_ids=torch.tensor([sum(seqs, [])]), position_ids=torch.tensor([positions]))
    if layout == "padded":
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq) :], mask[row, width - len(seq) :] = torch.tensor(seq), 1
        return dict(input_ids=ids, attention_mask=mask)
    shortest = min(map(len, seqs))
    return dict(input_ids=torch.tensor([seq[:shortest] for seq in seqs]))


@pytest.fixture
def engine_calls(monkeypatch):
    """Every `packed_token_stats` call: (q's shape, number of sequences); the real function still runs."""
    calls, real = [], stats_engine.packed_token_stats

    def spy(q, k, cu_seqlens, *args, **kwargs):
        stats = real(q, k, cu_seqlens, *args, **kwargs)
        calls.append((tuple(q.shape), stats.sequences.num_sequences))
        return stats

    monkeypatch.setattr(stats_engine, "packed_token_stats", spy)
    return calls


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("count", [1, 3, 8])
def test_one_engine_call_per_layer_per_forward(engine_calls, layout, count):
    model = build("qwen3", "sdpa")
    seqs = sequences(count, seed=count)
    batch = inputs(seqs, layout)
    with torch.no_grad(), AttentionCapture(model, CFG) as capture:
        model(**batch, use_cache=False)
        model(**batch, use_cache=False)
    num_tokens = int(batch["attention_mask"].sum()) if layout == "padded" else batch["input_ids"].numel()
    heads = model.config.num_attention_heads
    assert engine_calls == [((heads, num_tokens, model.config.head_dim), count)] * (2 * len(CFG.layers))
    stats = capture.pop()
    assert len(stats) == 2 * count and sum(s.waad.shape[1] for s in stats) == 2 * num_tokens
    assert capture.pop_packed() == []  # pop() took both forwards


def test_pop_packed_gives_each_forward_packed_with_the_layers_stacked():
    model = build("qwen3", "sdpa")
    seqs = sequences(4)
    with torch.no_grad(), AttentionCapture(model, CFG) as capture:
        model(**inputs(seqs, "packed"), use_cache=False)
        model(**inputs(seqs[:2], "padded"), use_cache=False)
    first, second = capture.pop_packed()
    heads = model.config.num_attention_heads
    assert (first.num_layers, first.num_heads_total, first.waad.shape) == (3, heads, (3 * heads, sum(map(len, seqs))))
    assert first.sequences.cu_seqlens.tolist() == torch.tensor([0, *map(len, seqs)]).cumsum(0).tolist()
    assert second.sequences.cu_seqlens.tolist() == [0, len(seqs[0]), len(seqs[0]) + len(seqs[1])]
    with torch.no_grad(), AttentionCapture(model, CFG) as alone:  # the second sequence alone
        model(torch.tensor([seqs[1]]), use_cache=False)
    (expected,) = alone.pop()
    a, b = first.sequences.cu_seqlens[1:3].tolist()
    torch.testing.assert_close(first.waad[:, a:b], expected.waad, atol=1e-6, rtol=0)
    torch.testing.assert_close(first.fai[:, a:b], expected.fai, atol=1e-6, rtol=0, equal_nan=True)
    assert capture.pop() == []


class HostReads(TorchDispatchMode):
    """Counts the ops that read tensor data on the host (`.item()`, `bool()`, data-dependent shapes) and
    `.tolist()` calls."""

    READS = {"_local_scalar_dense", "nonzero", "equal"}

    def __enter__(self):
        self.count, self._tolist = 0, torch.Tensor.tolist

        def tolist(tensor):
            self.count += 1
            return self._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.READS
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_dispatch(monkeypatch):
    """The CUDA dispatch on CPU tensors: `select_backend` answers "triton" (recording what it was asked about)
    and the kernels are replaced by a stand-in that records its calls and returns 1, 2, 3 for span, WAAD, FAI."""
    triton_stats = pytest.importorskip("verl_anchor.core.kernels.triton_stats")
    asked, launches = [], []

    def select_backend(q):
        asked.append((q.device, q.dtype))
        return "triton"

    def kernels(q, k, tiles, window, lo, hi, scale):
        launches.append(tiles)
        return tuple(torch.full(q.shape[:2], value, dtype=torch.float32) for value in (1.0, 2.0, 3.0))

    monkeypatch.setattr(stats_engine, "select_backend", select_backend)
    monkeypatch.setattr(triton_stats, "packed_stats", kernels)
    monkeypatch.setattr(stats_engine, "token_stats", lambda *a, **kw: pytest.fail("the torch path ran"))
    return asked, launches


@pytest.mark.parametrize("layout", LAYOUTS)
def test_capture_runs_the_kernels_once_per_layer_with_host_reads_independent_of_the_sequences(triton_dispatch, layout):
    asked, launches = triton_dispatch
    model = build("qwen3", "sdpa")
    added_reads = []
    for count in (2, 9):
        batch = inputs(sequences(count, seed=count), layout)
        with torch.no_grad(), HostReads() as plain:
            model(**batch, use_cache=False)
        asked.clear(), launches.clear()
        with torch.no_grad(), AttentionCapture(model, CFG) as capture, HostReads() as captured:
            model(**batch, use_cache=False)
        added_reads.append(captured.count - plain.count)
        assert asked == [(torch.device("cpu"), torch.float32)] * len(CFG.layers)  # the model's device and dtype
        assert len(launches) == len(CFG.layers) and all(tiles is launches[0] for tiles in launches)  # one table
        (stats,) = capture.pop_packed()
        assert stats.sequences.num_sequences == count
        assert (stats.row_span == 1).all() and (stats.waad == 2).all() and (stats.fai == 3).all()
    # The pre-hook reads the number of sequences or tokens, the post-hook the mask checks of all layers: per forward.
    assert added_reads[0] == added_reads[1] <= 2


def test_cuda_tensors_of_the_model_dtypes_select_the_kernels(monkeypatch):
    monkeypatch.setattr(stats_engine, "_triton_installed", lambda: True)
    monkeypatch.setattr(stats_engine, "kernel_device_problem", lambda device, head_dim: None)  # a device that fits
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(8, 10, 128))
        assert stats_engine.select_backend(q) == "triton"
        assert stats_engine.select_backend(torch.zeros(1, dtype=dtype)) == "torch"


def test_torch_path_equals_token_stats_per_sequence_in_every_layout():
    """The capture's packing (a view, a gather, a copy) hands each sequence's own q and k to the engine."""
    model = build("qwen3", "sdpa", seed=3)
    seqs = sequences(5, seed=5)
    for layout in LAYOUTS:
        batch = inputs(seqs, layout)
        with torch.no_grad(), AttentionCapture(model, CFG) as capture:
            model(**batch, use_cache=False)
        shortest = min(map(len, seqs))
        for seq, stats in zip(seqs, capture.pop()):
            seq = seq[:shortest] if layout == "rows" else seq
            with torch.no_grad(), AttentionCapture(model, CFG) as alone:
                model(torch.tensor([seq]), use_cache=False)
            (expected,) = alone.pop()
            for name in ("row_span", "waad", "fai"):
                torch.testing.assert_close(
                    getattr(stats, name), getattr(expected, name), atol=1e-5, rtol=0, equal_nan=True
                )


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_a_mask_shared_by_the_layers_is_checked_once_per_forward(monkeypatch, layout):
    """sdpa hands every layer the same 4-D mask: one check per forward, not one per layer."""
    checks, real = [], SequenceLayout.separated_by

    def separated_by(self, mask):
        checks.append(mask)
        return real(self, mask)

    monkeypatch.setattr(SequenceLayout, "separated_by", separated_by)
    model = build("qwen3", "sdpa")
    with torch.no_grad(), AttentionCapture(model, CFG) as capture:
        model(**inputs(sequences(3), layout), use_cache=False)
        model(**inputs(sequences(3), layout), use_cache=False)
    assert len(checks) == 2 and all(mask.dim() == 4 for mask in checks)
    assert len(capture.pop()) == 6
