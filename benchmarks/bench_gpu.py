"""The statistics on a GPU: the Triton kernels' exactness, then their cost inside a Qwen3-4B-shaped forward.

    PYTHONPATH=. python benchmarks/bench_gpu.py          # one H100/H200: a few minutes

Needs torch, transformers and triton only (flash-attn is used for the baseline where installed).
Prints, in one run:

1. exactness: packed micro-batches of mixed-length sequences (GQA 4:1 and 8:1, head dim 128, both FAI
   horizons) in bf16, fp16 and float32, against the dense float64 formulas (`metrics.reference_stats`):
   WAAD and FAI within 1e-5, mean span within 1e-6 relative; one 8k sequence's spans; two runs bitwise
   equal; a sequence alone and packed among others bitwise equal;
2. a random Qwen3-4B-shaped model (36 layers, bf16): the decoder's forward alone vs forward under
   `AttentionCapture` (5 layers, one batched call per layer) and the worker's per-response signals,
   on 16 x 1k and 2 x 8k tokens, as a ratio, and the peak GPU memory the statistics add;
3. the kernels alone vs one layer's attention forward, as a ratio.

The baseline forward uses the fastest layout available: flash_attention_2 on the packed (varlen)
micro-batch where flash-attn is installed, else equal-length sequences batched on sdpa's flash
backend (packed sdpa would build a T x T mask and flatter the ratio). It says which. Exit code 1 if
an exactness check fails, 2 (with one `error:` line) without CUDA or triton.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import time
from contextlib import nullcontext

import torch


def unusable(reason: str) -> None:
    print(f"error: {reason}", file=sys.stderr)
    sys.exit(2)


if not torch.cuda.is_available():
    unusable(
        "no CUDA device: bench_gpu.py measures the Triton kernels on a GPU (on CPU, tests/test_kernels.py "
        "runs them in Triton's interpreter)"
    )
if importlib.util.find_spec("triton") is None:
    unusable("triton is not installed: the statistics' GPU path needs it (pip install triton)")

from verl_anchor import AnchorConfig  # noqa: E402
from verl_anchor.capture.hooks import AttentionCapture  # noqa: E402
from verl_anchor.core.metrics import reference_stats  # noqa: E402
from verl_anchor.core.stats_engine import (  # noqa: E402
    PackedSequences,
    packed_response_signals,
    packed_token_stats,
    select_backend,
)

QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
BATCHES = {"16 x 1k": (16, 1024), "2 x 8k": (2, 8192)}
CONFIGS = {"[10, 100]": AnchorConfig(), "unbounded": AnchorConfig(fai_h_lo=0, fai_h_hi=None)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPEATS = 5


def timed(fn, repeats: int = REPEATS) -> float:
    """Median seconds of `fn()` after one warm-up call (which also compiles the kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], device="cuda").cumsum(0)


def dense_reference(q: torch.Tensor, k: torch.Tensor, cfg: AnchorConfig):
    """Float64 dense statistics of one sequence, and its per-token row spans."""
    num_heads, n, head_dim = q.shape
    keys = k.repeat_interleave(num_heads // k.shape[0], dim=0).double()
    scores = q.double() @ keys.transpose(1, 2) * head_dim**-0.5
    attn = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf).softmax(-1)
    offset = torch.arange(n, device=q.device)
    rows = (attn * (offset[:, None] - offset[None, :]).clamp(min=0)).sum(-1)
    return reference_stats(attn, 0, cfg), rows


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def exactness() -> bool:
    print("1. exactness on the GPU vs float64 dense formulas (tolerance: WAAD, FAI 1e-5 abs; span 1e-6 rel)")
    print(
        f"{'dtype':>5} {'GQA':>4} {'horizon':>10} {'max|dWAAD|':>11} {'max|dFAI|':>11} {'span rel':>9} "
        f"{'row rel':>9} {'bitwise rerun':>13}  result"
    )
    ok = True
    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1, 2, 110, 700, 1537, 64]
    for (num_heads, num_kv), (dtype_name, dtype), (horizon, cfg) in (
        (h, d, c) for h in ((8, 2), (8, 1)) for d in DTYPES.items() for c in CONFIGS.items()
    ):
        q = torch.randn(num_heads, sum(lengths), 128, device="cuda", generator=generator).to(dtype)
        k = torch.randn(num_kv, sum(lengths), 128, device="cuda", generator=generator).to(dtype)
        cu = cu_seqlens(lengths)
        stats = packed_token_stats(q, k, cu, cfg)
        again = packed_token_stats(q, k, cu, cfg)
        bitwise = all(same_bits(getattr(stats, n), getattr(again, n)) for n in ("row_span", "waad", "fai"))
        errors = [0.0, 0.0, 0.0, 0.0]
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            ref, rows = dense_reference(q[:, a:b], k[:, a:b], cfg)
            defined = ~torch.isnan(ref.fai)
            nan_match = torch.equal(torch.isnan(stats.fai[:, a:b]), ~defined)
            errors[0] = max(errors[0], (stats.waad[:, a:b].double() - ref.waad).abs().max().item())
            fai_err = (stats.fai[:, a:b].double() - ref.fai)[defined].abs().max().item() if defined.any() else 0.0
            errors[1] = max(errors[1], fai_err if nan_match else math.inf)
            row_span = stats.row_span[:, a:b].double()
            errors[2] = max(errors[2], ((row_span.mean(1) - ref.span).abs() / ref.span.clamp(min=1e-12)).max().item())
            errors[3] = max(errors[3], ((row_span - rows).abs() / rows.clamp(min=1e-3)).max().item())
        passed = errors[0] <= 1e-5 and errors[1] <= 1e-5 and errors[2] <= 1e-6 and bitwise
        ok &= passed
        print(
            f"{dtype_name:>5} {num_heads // num_kv}:1 {horizon:>10} {errors[0]:11.2e} {errors[1]:11.2e} "
            f"{errors[2]:9.2e} {errors[3]:9.2e} {str(bitwise):>13}  {'PASS' if passed else 'FAIL'}"
        )
    ok &= long_sequence_and_invariance(generator)
    return ok


def long_sequence_and_invariance(generator: torch.Generator) -> bool:
    n, cfg = 8192, AnchorConfig()
    q = torch.randn(4, n, 128, device="cuda", generator=generator)
    k = torch.randn(1, n, 128, device="cuda", generator=generator)
    ok = True
    for dtype_name, dtype in DTYPES.items():
        qd, kd = q.to(dtype), k.to(dtype)
        stats = packed_token_stats(qd, kd, cu_seqlens([n]), cfg)
        ref, _ = dense_reference(qd, kd, cfg)
        span_rel = ((stats.row_span.double().mean(1) - ref.span).abs() / ref.span).max().item()
        waad_err = (stats.waad.double() - ref.waad).abs().max().item()
        # The same sequence after a 300-token neighbour: its statistics must not change by a bit.
        other = torch.randn(4, 300, 128, device="cuda", generator=generator).to(dtype)
        packed = packed_token_stats(torch.cat([other, qd], 1), torch.cat([other[:1], kd], 1), cu_seqlens([300, n]), cfg)
        invariant = all(
            same_bits(getattr(packed, name)[:, 300:], getattr(stats, name)) for name in ("row_span", "waad", "fai")
        )
        passed = span_rel <= 1e-6 and waad_err <= 1e-5 and invariant
        ok &= passed
        print(
            f"{dtype_name:>5} one 8k sequence: span rel {span_rel:.2e}, max|dWAAD| {waad_err:.2e}; "
            f"alone == packed after 300 tokens (bitwise): {invariant}  {'PASS' if passed else 'FAIL'}"
        )
    return ok


def build_model():
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.utils import is_flash_attn_2_available

    implementation = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_4B), attn_implementation=implementation)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval(), implementation


def model_overhead() -> None:
    model, implementation = build_model()
    cfg = AnchorConfig()
    capture = AttentionCapture(model, cfg, max_length=max(length for _, length in BATCHES.values()))
    force_flash, layout = implementation == "sdpa", "flash_attention_2 on the packed micro-batch (varlen)"
    if force_flash:
        layout = "sdpa, equal-length sequences batched, flash backend forced (flash-attn not installed)"
        try:
            with torch.no_grad(), sdpa_flash(True):
                model.model(input_ids=torch.zeros(2, 64, dtype=torch.long, device="cuda"), use_cache=False)
        except RuntimeError as err:  # e.g. a torch whose flash backend refuses GQA inputs
            force_flash = False
            layout = f"sdpa, equal-length sequences batched, backend left to torch (flash refused: {err})"[:200]
    print(
        f"\n2. random Qwen3-4B-shaped model (36 layers, bf16), decoder forward (no lm_head), "
        f"statistics on layers {capture.layers} (AttentionCapture); baseline: {layout}"
    )
    print(f"{'micro-batch':>11} {'forward s':>10} {'+ stats s':>10} {'ratio':>7} {'added peak MiB':>15}")
    for name, (batch, length) in BATCHES.items():
        ids = torch.randint(0, QWEN3_4B["vocab_size"], (batch, length), device="cuda")
        if implementation == "flash_attention_2":  # one packed row, position_ids restart per sequence
            inputs = dict(
                input_ids=ids.reshape(1, -1), position_ids=torch.arange(length, device="cuda").repeat(batch)[None]
            )
        else:
            inputs = dict(input_ids=ids)
        responses = torch.full((batch,), length // 2, device="cuda")

        def forward():
            with torch.no_grad(), sdpa_flash(force_flash):
                model.model(**inputs, use_cache=False)

        def forward_with_statistics():  # what the worker runs: the capture, then every response's signals
            with capture:
                forward()
            (stats,) = capture.pop_packed()
            packed_response_signals(stats, responses, cfg, num_response_tokens=batch * (length // 2))

        plain, with_stats = timed(forward), timed(forward_with_statistics)
        memory = [peak_bytes(fn) for fn in (forward, forward_with_statistics)]
        print(
            f"{name:>11} {plain:10.3f} {with_stats:10.3f} {with_stats / plain:7.3f} "
            f"{(memory[1] - memory[0]) / 2**20:15.0f}"
        )
    model = capture = None  # free the GPU memory (the closures above are done with them)
    torch.cuda.empty_cache()


def sdpa_flash(force: bool):
    if not force:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def kernels_vs_attention() -> None:
    from transformers.utils import is_flash_attn_2_available

    print("\n3. kernels alone (one layer: row pass + FAI pass) vs that layer's attention forward, bf16, 32/8 heads")
    print(f"{'micro-batch':>11} {'attention ms':>13} {'kernels ms':>11} {'ratio':>7}  attention kernel")
    cfg = AnchorConfig()
    for name, (batch, length) in BATCHES.items():
        total = batch * length
        q = torch.randn(32, total, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(8, total, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu = cu_seqlens([length] * batch)
        if is_flash_attn_2_available():
            from flash_attn import flash_attn_varlen_func

            cu32 = cu.to(torch.int32)
            args = tuple(x.transpose(0, 1).contiguous() for x in (q, k, v))  # (T, H, D)

            def attention():
                flash_attn_varlen_func(*args, cu32, cu32, length, length, causal=True)

            kind = "flash_attn_varlen_func"
        else:

            def batched(x):  # (H, B * L, D) -> (B, 32, L, D), KV heads repeated as transformers' sdpa path does
                return x.reshape(x.shape[0], batch, length, 128).transpose(0, 1).repeat_interleave(32 // x.shape[0], 1)

            qb, kb, vb = batched(q), batched(k), batched(v)

            def attention():
                with sdpa_flash(True):
                    torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True)

            kind = "sdpa flash, batched, KV heads repeated"
        sequences = PackedSequences(cu, total)
        attention_s = timed(attention)
        kernels_s = timed(lambda: packed_token_stats(q, k, sequences, cfg))
        print(f"{name:>11} {attention_s * 1e3:13.2f} {kernels_s * 1e3:11.2f} {kernels_s / attention_s:7.3f}  {kind}")


def main() -> int:
    import transformers
    import triton

    start = time.perf_counter()
    print(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}; statistics backend for bf16 CUDA tensors: "
        f"{select_backend(torch.empty(1, device='cuda', dtype=torch.bfloat16))}"
    )
    exact = exactness()
    model_overhead()
    kernels_vs_attention()
    print(f"\nexactness: {'PASS' if exact else 'FAIL'}; {time.perf_counter() - start:.0f} s in all")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
