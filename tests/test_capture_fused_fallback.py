"""The fused prefix kernel the statistics use (metrics._prefix_moments): a transient failure (out of memory, say)
falls back to the dense path for that call only; only a definite "no kernel for this device/dtype" is remembered."""

import pytest
import torch
from helpers import assert_stats_close, dense_attention

from verl_anchor import AnchorConfig
from verl_anchor.core import metrics
from verl_anchor.core.metrics import attention_stats, reference_stats

CFG = AnchorConfig(window=4, fai_h_lo=2, fai_h_hi=6)  # band 6: chunks of 8 from position 8 on read a prefix


@pytest.fixture
def kernel(monkeypatch):
    """`_fused_attention` that fails as told on its first call, and counts its calls."""
    monkeypatch.setattr(metrics, "_FUSED_BROKEN", set())
    real, calls = metrics._fused_attention, []

    def install(error):
        def fused(*args):
            calls.append(1)
            if len(calls) == 1:
                raise error
            return real(*args)

        monkeypatch.setattr(metrics, "_fused_attention", fused)
        return calls

    return install


def stats_and_reference():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 40, 16, generator=generator), torch.randn(2, 40, 16, generator=generator)
    return attention_stats(q, k, 0, CFG, chunk_size=8), reference_stats(dense_attention(q, k), 0, CFG)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ],
)
def test_a_transient_kernel_error_falls_back_for_that_call_only(kernel, error):
    calls = kernel(error)
    assert_stats_close(*stats_and_reference())  # the failed chunk was scored densely
    assert metrics._FUSED_BROKEN == set()
    first = len(calls)
    assert_stats_close(*stats_and_reference())
    assert len(calls) == 2 * first, "the fused kernel was not used again after one transient error"


@pytest.mark.parametrize(
    "error",
    [
        NotImplementedError(
            "Could not run 'aten::_scaled_dot_product_efficient_attention' with arguments from the 'XLA' backend"
        ),
        RuntimeError("\"_scaled_dot_product_flash_attention_for_cpu\" not implemented for 'Half'"),
        RuntimeError("cutlassF: no kernel found to launch!"),
    ],
)
def test_a_missing_kernel_is_remembered(kernel, error):
    calls = kernel(error)
    assert_stats_close(*stats_and_reference())
    assert metrics._FUSED_BROKEN == {("cpu", torch.float32)}
    assert_stats_close(*stats_and_reference())
    assert len(calls) == 1
