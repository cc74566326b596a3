"""The batched statistics engine (`verl_anchor.core.stats_engine`) on its torch path, against the per-sequence
`metrics` functions and the dense reference; its dispatch; and bench_gpu's exit without CUDA."""

import ast
import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import dense_attention

from verl_anchor import AnchorConfig
from verl_anchor.core import stats_engine
from verl_anchor.core.metrics import group_heads, reference_stats, response_signals, token_stats
from verl_anchor.core.stats_engine import (
    PackedSequences,
    group_means,
    packed_response_signals,
    packed_token_stats,
    response_head_span,
    select_backend,
    stack_layers,
)

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [1, 37, 0, 150, 2, 120]
RESPONSES = [1, 20, 0, 150, 0, 64]


def packed_inputs(lengths, num_heads=8, num_kv=2, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(num_heads, total, head_dim, generator=generator)
    k = torch.randn(num_kv, total, head_dim, generator=generator)
    return q, k, torch.tensor([0, *lengths]).cumsum(0)


def sequences_of(cu):
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("cfg", [AnchorConfig(), AnchorConfig(fai_h_lo=0, fai_h_hi=None)], ids=["bounded", "analysis"])
def test_packed_stats_equal_per_sequence_token_stats_and_reference(cfg):
    q, k, cu = packed_inputs(LENGTHS)
    stats = packed_token_stats(q, k, cu, cfg)
    assert stats.row_span.shape == stats.waad.shape == stats.fai.shape == (8, sum(LENGTHS))
    per_sequence = stats.to_token_stats()
    assert [s.waad.shape[1] for s in per_sequence] == LENGTHS
    for (a, b), mine in zip(sequences_of(cu), per_sequence):
        if b == a:
            continue
        single = token_stats(q[:, a:b], k[:, a:b], cfg)
        for name in ("row_span", "waad", "fai"):
            torch.testing.assert_close(getattr(mine, name), getattr(single, name), atol=0, rtol=0, equal_nan=True)
        ref = reference_stats(dense_attention(q[:, a:b], k[:, a:b]), 0, cfg)
        torch.testing.assert_close(stats.waad[:, a:b].double(), ref.waad, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.fai[:, a:b].double(), ref.fai, atol=1e-5, rtol=0, equal_nan=True)


def test_response_signals_equal_per_sequence_metrics():
    """Spans, groups and group means of every response at once = `metrics.response_signals` of each."""
    cfg = AnchorConfig()
    q, k, cu = packed_inputs(LENGTHS)
    layers = [packed_token_stats(q * (1 + layer), k, cu, cfg) for layer in range(3)]  # 3 "layers", 24 heads
    stats = stack_layers(layers)
    lengths = torch.tensor(RESPONSES)
    signals = packed_response_signals(stats, lengths, cfg, num_response_tokens=sum(RESPONSES))
    assert signals.local_heads.shape == signals.global_heads.shape == (len(LENGTHS), math.floor(0.3 * 24))
    head_span = response_head_span(stats, lengths)
    for i, ((a, b), n, mine) in enumerate(zip(sequences_of(cu), RESPONSES, signals.to_group_signals())):
        per_layer = [token_stats(q[:, a:b] * (1 + layer), k[:, a:b], cfg) for layer in range(3)]
        single = type(per_layer[0])(
            row_span=torch.cat([s.row_span for s in per_layer]),
            waad=torch.cat([s.waad for s in per_layer]),
            fai=torch.cat([s.fai for s in per_layer]),
        )
        theirs = response_signals(single, n, cfg)
        assert mine.waad.shape == theirs.waad.shape == (n,)
        torch.testing.assert_close(mine.waad, theirs.waad, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.fai, theirs.fai, atol=1e-6, rtol=1e-6, equal_nan=True)
        if n == 0:
            assert math.isnan(mine.span_loc) and math.isnan(mine.span_glob)
            continue
        span = single.response(b - a - n).span
        torch.testing.assert_close(head_span[:, i], span, atol=1e-7, rtol=1e-6)
        loc, glob = group_heads(span, cfg)
        assert torch.equal(signals.local_heads[i], loc) and torch.equal(signals.global_heads[i], glob)
        assert mine.span_loc == pytest.approx(theirs.span_loc, rel=1e-6)
        assert mine.span_glob == pytest.approx(theirs.span_glob, rel=1e-6)


def test_batched_group_heads_follow_per_sequence_ties_and_quantile():
    """Stable ascending sort per sequence (ties in head order), m = max(1, floor(q * H)) with the epsilon."""
    spans = torch.tensor([[1.0, 3.0], [2.0, 3.0], [1.0, 3.0], [0.5, 3.0], [4.0, 3.0], [2.0, 3.0], [1.0, 3.0]])
    for cfg in (AnchorConfig(), AnchorConfig(head_quantile=0.29), AnchorConfig(head_quantile=0.01)):
        loc, glob = group_heads(spans, cfg)
        for i in range(spans.shape[1]):
            ref_loc, ref_glob = group_heads(spans[:, i], cfg)
            assert torch.equal(loc[i], ref_loc) and torch.equal(glob[i], ref_glob)
    spans_100 = torch.arange(100.0)[:, None]
    assert group_heads(spans_100, AnchorConfig(head_quantile=0.29))[0].shape == (1, 29)


def test_sequence_alone_and_packed_give_bitwise_equal_signals():
    cfg = AnchorConfig()
    q, k, _ = packed_inputs([90], seed=7)
    alone = packed_token_stats(q, k, torch.tensor([0, 90]), cfg)
    alone_signals = packed_response_signals(alone, torch.tensor([50]), cfg)
    for before, after in [(3, 0), (64, 200)]:
        pq, pk, _ = packed_inputs([before + after], seed=before)
        big_q = torch.cat([pq[:, :before], q, pq[:, before:]], dim=1)
        big_k = torch.cat([pk[:, :before], k, pk[:, before:]], dim=1)
        cu = torch.tensor([0, before, before + 90, before + 90 + after])
        packed = packed_token_stats(big_q, big_k, cu, cfg)
        for name in ("row_span", "waad", "fai"):
            torch.testing.assert_close(
                getattr(packed, name)[:, before : before + 90], getattr(alone, name), atol=0, rtol=0, equal_nan=True
            )
        signals = packed_response_signals(packed, torch.tensor([before, 50, after // 2]), cfg)
        mine = signals.to_group_signals()[1]
        expected = alone_signals.to_group_signals()[0]
        torch.testing.assert_close(mine.waad, expected.waad, atol=0, rtol=0)
        torch.testing.assert_close(mine.fai, expected.fai, atol=0, rtol=0, equal_nan=True)
        assert (mine.span_loc, mine.span_glob) == (expected.span_loc, expected.span_glob)


def test_sequence_parallel_head_slices_sum_to_the_full_signals():
    """Two ranks with 4 of 8 query heads each (and their key heads): gathered spans, per-rank group means
    summed over the ranks = the single-rank result."""
    cfg = AnchorConfig()
    q, k, cu = packed_inputs(LENGTHS)
    lengths = torch.tensor(RESPONSES)
    full = stack_layers([packed_token_stats(q, k, cu, cfg), packed_token_stats(q.flip(1), k.flip(1), cu, cfg)])
    expected = packed_response_signals(full, lengths, cfg)
    ranks = [
        stack_layers(
            [
                packed_token_stats(q[h : h + 4], k[h // 4 : h // 4 + 1], cu, cfg, head_offset=h, num_heads_total=8),
                packed_token_stats(
                    q.flip(1)[h : h + 4], k.flip(1)[h // 4 : h // 4 + 1], cu, cfg, head_offset=h, num_heads_total=8
                ),
            ]
        )
        for h in (0, 4)
    ]
    assert ranks[1].head_ids == (4, 5, 6, 7, 12, 13, 14, 15)
    gathered = torch.empty(16, len(LENGTHS))
    for rank in ranks:
        gathered[list(rank.head_ids)] = response_head_span(rank, lengths)
    loc, glob = group_heads(gathered, cfg)
    assert torch.equal(loc, expected.local_heads) and torch.equal(glob, expected.global_heads)
    parts = [group_means(rank, lengths, loc, glob) for rank in ranks]
    torch.testing.assert_close(parts[0][0] + parts[1][0], expected.waad, atol=1e-6, rtol=0)
    torch.testing.assert_close(parts[0][1] + parts[1][1], expected.fai, atol=1e-6, rtol=0, equal_nan=True)
    with pytest.raises(ValueError, match="pass head_span"):
        packed_response_signals(ranks[0], lengths, cfg)


def test_tiles_start_at_each_sequence_and_pad_with_empty_rows():
    sequences = PackedSequences(torch.tensor([0, 5, 5, 70, 71]), 71)
    tiles = sequences.tiles(32)
    assert tiles.dtype == torch.int32 and tiles.shape == (math.ceil(71 / 32) + 4, 3)
    assert tiles.tolist() == [[0, 5, 0], [5, 70, 5], [5, 70, 37], [5, 70, 69], [70, 71, 70], [0, 0, 0], [0, 0, 0]]


def test_invalid_inputs_raise_clear_errors():
    cfg = AnchorConfig()
    q, k, cu = packed_inputs([4, 6])
    with pytest.raises(ValueError, match="multiple of key heads"):
        packed_token_stats(q, k[:1].expand(3, -1, -1), cu, cfg)
    with pytest.raises(ValueError, match="outside 0..7"):
        packed_token_stats(q, k, cu, cfg, head_offset=1)
    with pytest.raises(ValueError, match="rise from 0 to T = 10"):
        packed_token_stats(q, k, torch.tensor([0, 4, 9]), cfg)
    with pytest.raises(ValueError, match="describe 9 tokens"):
        packed_token_stats(q, k, PackedSequences(torch.tensor([0, 9]), 9), cfg)
    stats = packed_token_stats(q, k, cu, cfg)
    with pytest.raises(ValueError, match="must lie in 0..sequence length"):
        response_head_span(stats, torch.tensor([5, 0]))


def _forget_devices():
    if importlib.util.find_spec("triton") is not None:
        from verl_anchor.core.kernels import triton_stats

        triton_stats.cuda_device_problem.cache_clear()


@pytest.fixture
def fake_cuda_device(monkeypatch):
    """A CUDA device 0 of the given compute capability and opt-in shared memory per block, as torch reports them
    (there is no GPU here); the once-per-device answers are forgotten before and after."""

    def install(capability, shared_memory_per_block):
        properties = types.SimpleNamespace(shared_memory_per_block_optin=shared_memory_per_block)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        _forget_devices()

    yield install
    _forget_devices()


def cuda_query(head_dim=128, dtype=torch.bfloat16):
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(8, 10, head_dim))


def test_dispatch_by_device(monkeypatch, fake_cuda_device):
    """CUDA tensors of kernel dtypes go to the Triton kernels when triton is installed; the rest to torch."""
    fake_cuda_device((9, 0), 227 * 1024)
    cuda = cuda_query()
    monkeypatch.setattr(stats_engine, "_triton_installed", lambda: True)
    assert select_backend(cuda) == "triton"
    assert select_backend(cuda_query(dtype=torch.float64)) == "torch"
    assert select_backend(torch.zeros(1, dtype=torch.bfloat16)) == "torch"
    monkeypatch.setattr(stats_engine, "_triton_installed", lambda: False)
    assert select_backend(cuda) == "torch"


def test_triton_backend_calls_the_kernels_once_per_layer(monkeypatch):
    triton_stats = pytest.importorskip("verl_anchor.core.kernels.triton_stats")
    calls = []

    def fake_kernels(q, k, tiles, window, lo, hi, scale):
        calls.append((tiles.shape, window, lo, hi, scale))
        return tuple(torch.zeros(q.shape[0], q.shape[1]) for _ in range(3))

    monkeypatch.setattr(stats_engine, "select_backend", lambda q: "triton")
    monkeypatch.setattr(triton_stats, "packed_stats", fake_kernels)
    monkeypatch.setattr(stats_engine, "token_stats", lambda *a, **kw: pytest.fail("torch path used"))
    q, k, cu = packed_inputs([4, 6])
    packed_token_stats(q, k, cu, AnchorConfig(), scale=0.5)
    tile, _ = triton_stats.block_sizes(torch.float32)
    assert calls == [((math.ceil(10 / tile) + 2, 3), 10, 10, 100, 0.5)]


@pytest.fixture
def kernel_calls(monkeypatch):
    """The Triton backend selected (as on CUDA) with its launcher replaced by a recorder: what it would be given."""
    triton_stats = pytest.importorskip("verl_anchor.core.kernels.triton_stats")
    calls = []

    def recorder(q, k, tiles, window, lo, hi, scale):
        calls.append(dict(q=q, k=k, tiles=tiles))
        return tuple(torch.zeros(q.shape[0], q.shape[1]) for _ in range(3))

    monkeypatch.setattr(stats_engine, "select_backend", lambda q: "triton")
    monkeypatch.setattr(triton_stats, "packed_stats", recorder)
    return calls


@pytest.mark.parametrize(
    "bounds",
    [[0, 4, 12], [1, 4, 10], [0, 4, 9], [0, 6, 4, 10], [0, 4, 10, 10, 11]],
    ids=["past T", "not from 0", "short of T", "not monotone", "past T at the end"],
)
def test_bad_boundaries_are_refused_before_any_launch(kernel_calls, bounds):
    """The kernels trust their tiles: boundaries past T read and write out of bounds, others leave tokens
    unwritten (`torch.empty`). Both backends share the one check."""
    q, k, _ = packed_inputs([4, 6])
    for sequences in (torch.tensor(bounds), PackedSequences(torch.tensor(bounds), 10)):
        with pytest.raises(ValueError, match=rf"cu_seqlens must rise from 0 to T = 10, got \[{bounds[0]}, "):
            packed_token_stats(q, k, sequences, AnchorConfig())
    assert kernel_calls == []


def test_head_slice_crossing_a_key_head_group_is_refused(kernel_calls, monkeypatch):
    """Query heads 2..5 of 8 with 2 key heads (4 per group) read key heads 0 and 1: no single key head serves
    them, so the slice was silently wrong (query head h reads key head h // group of `k`)."""
    q, k, cu = packed_inputs([4, 6])
    for backend in ("torch", "triton"):
        monkeypatch.setattr(stats_engine, "select_backend", lambda q, backend=backend: backend)
        with pytest.raises(
            ValueError,
            match=r"query heads 2\.\.5 of 8 .* cross a key-head group: start the slice at a "
            r"multiple of 4",
        ):
            packed_token_stats(q[2:6], k[:1], cu, AnchorConfig(), head_offset=2, num_heads_total=8)
    assert kernel_calls == []
    packed_token_stats(q[4:8], k[1:], cu, AnchorConfig(), head_offset=4, num_heads_total=8)  # a whole group
    assert len(kernel_calls) == 1


def test_kernels_get_one_dtype_unit_stride_along_d_and_their_block_sizes(kernel_calls):
    """fp16 q with fp32 k failed inside `tl.dot`, and the kernels index D contiguously: the launcher gets both
    in their common dtype with unit stride along D, and the tiles of that dtype's block size (its default)."""
    triton_stats = pytest.importorskip("verl_anchor.core.kernels.triton_stats")
    q, k, cu = packed_inputs([4, 6])
    packed_token_stats(q.half(), k.transpose(1, 2).contiguous().transpose(1, 2), cu, AnchorConfig())
    packed_token_stats(q.half(), k.half(), cu, AnchorConfig())
    (mixed, half) = kernel_calls
    assert mixed["q"].dtype == mixed["k"].dtype == torch.float32 and mixed["k"].stride(-1) == 1
    assert torch.equal(mixed["k"], k) and torch.equal(mixed["q"], q.half().float())
    assert triton_stats.block_sizes(torch.float32) == (16, 16) and triton_stats.block_sizes(torch.float16) == (64, 64)
    assert mixed["tiles"].shape[0] == math.ceil(10 / 16) + 2 and half["tiles"].shape[0] == math.ceil(10 / 64) + 2


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_q_k_not_contiguous_along_d_give_the_reference_stats(layout):
    cfg = AnchorConfig(window=3, fai_h_lo=1, fai_h_hi=4)
    q, k, cu = packed_inputs([300, 40])
    if layout == "transposed":
        q_in, k_in = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    else:
        q_in, k_in = (torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2] for x in (q, k))
    assert q_in.stride(-1) != 1 and torch.equal(q_in, q) and torch.equal(k_in, k)
    stats = packed_token_stats(q_in, k_in, cu, cfg)
    for (a, b), mine in zip(sequences_of(cu), stats.to_token_stats()):
        ref = reference_stats(dense_attention(q[:, a:b], k[:, a:b]), 0, cfg)
        torch.testing.assert_close(mine.waad.double(), ref.waad, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.fai.double(), ref.fai, atol=1e-5, rtol=0, equal_nan=True)


def test_micro_batch_past_the_kernels_int32_range_is_refused():
    with pytest.raises(ValueError, match=r"num_tokens=1073741825 is invalid: a micro-batch holds 0\.\.1073741824"):
        PackedSequences(torch.tensor([0, 2**30 + 1]), 2**30 + 1)


def test_bench_gpu_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "CUDA" in lines[0]


def test_bench_gpu_imports_only_torch_transformers_and_triton():
    """bench_gpu.py runs on a GPU machine without verl: what it imports, followed through verl_anchor (lazy imports
    included), needs no package beyond torch, transformers and triton (numpy comes with transformers; flash-attn
    is imported only where installed)."""
    todo, seen, packages = [ROOT / "benchmarks" / "bench_gpu.py"], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] != "verl_anchor":
                    packages.add(name.split(".")[0])
                    continue
                for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
                    if candidate.exists():
                        todo.append(candidate)
    assert ROOT / "verl_anchor" / "capture" / "hooks.py" in seen
    assert ROOT / "verl_anchor" / "core" / "kernels" / "triton_stats.py" in seen
    assert packages - sys.stdlib_module_names == {"torch", "transformers", "triton", "numpy", "flash_attn"}


def test_kernel_device_rules():
    """sm_80/sm_90 (and 8.x with 99 KB) run head dims up to 128; sm_75, wider heads, or too little shared memory
    do not. The shared memory asked is `shared_memory_bytes`, which the compile check bounds by what triton uses."""
    triton_stats = pytest.importorskip("verl_anchor.core.kernels.triton_stats")
    for capability, shared, head_dim in [
        ((8, 0), 163 * 1024, 128),
        ((8, 6), 99 * 1024, 128),
        ((9, 0), 227 * 1024, 64),
        ((9, 0), None, 96),
    ]:
        assert triton_stats.device_problem(capability, shared, head_dim) is None
    assert "compute capability 7.5" in triton_stats.device_problem((7, 5), 64 * 1024, 128)
    assert "head dim 256" in triton_stats.device_problem((9, 0), 227 * 1024, 256)
    need = triton_stats.shared_memory_bytes(torch.bfloat16, 128)
    assert triton_stats.device_problem((8, 0), need, 128) is None
    assert f"needs {need} bytes of shared memory per block, the device allows {need - 1}" in (
        triton_stats.device_problem((8, 0), need - 1, 128)
    )


def test_devices_the_kernels_do_not_fit_fall_back_to_torch_with_one_warning(fake_cuda_device, caplog):
    pytest.importorskip("verl_anchor.core.kernels.triton_stats")
    fake_cuda_device((7, 5), 64 * 1024)
    with caplog.at_level("WARNING", logger="verl_anchor.core.kernels.triton_stats"):
        assert select_backend(cuda_query()) == select_backend(cuda_query()) == "torch"
    [warning] = caplog.records
    assert "take the torch path" in warning.getMessage() and "compute capability 7.5" in warning.getMessage()
    fake_cuda_device((9, 0), 227 * 1024)
    assert select_backend(cuda_query()) == "triton"
    assert select_backend(cuda_query(head_dim=256)) == "torch"


def test_capture_decides_the_backend_when_built_not_at_the_first_forward(fake_cuda_device, caplog):
    """Where the capture is built (start-up, `anchor_prepare`), the device is judged and the fallback warned
    about; the forwards' dispatch then reuses that answer without a second warning."""
    pytest.importorskip("verl_anchor.core.kernels.triton_stats")
    from transformers import AutoModelForCausalLM

    from verl_anchor.capture.hooks import AttentionCapture
    from verl_anchor.models.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", num_hidden_layers=2))
    fake_cuda_device((7, 5), 64 * 1024)
    with caplog.at_level("WARNING", logger="verl_anchor.core.kernels.triton_stats"):
        capture = AttentionCapture(model, AnchorConfig(layers=[0, 1]))
        assert len(caplog.records) == 1  # at build, before any forward
        assert select_backend(cuda_query(head_dim=model.config.head_dim)) == "torch"
    assert capture.kernel_problem.startswith("compute capability 7.5")
    assert len(caplog.records) == 1
    fake_cuda_device((9, 0), 227 * 1024)
    assert AttentionCapture(model, AnchorConfig(layers=[0, 1])).kernel_problem is None
