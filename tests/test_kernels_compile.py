"""The Triton kernels compile for the GPU (sm_90, bf16) without one: triton's frontend, LLVM and the ptxas
its wheel ships run on CPU. The interpreter tests (test_kernels.py) check the numbers, not that the code
lowers; this catches what only the compiler rejects. In a subprocess, so that TRITON_INTERPRET is
unset however this process was started."""

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from verl_anchor.kernels import triton_stats

tensors = {"Q": "*bf16", "K": "*bf16", "TILES": "*i32", "ROW_SPAN": "*fp32", "WAAD": "*fp32", "LSE2": "*fp32",
           "FAI": "*fp32", "scale_log2e": "fp32"}
common = dict(GROUP=4, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, DOT_PRECISION=None)
for kernel, constexprs in [(triton_stats._row_pass, dict(common, WINDOW=10)),
                           (triton_stats._fai_pass, dict(common, FAI_LO=10, FAI_HI=100)),
                           (triton_stats._fai_pass, dict(common, FAI_LO=0, FAI_HI=-1))]:
    signature = {name: "constexpr" if name in constexprs else tensors.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=2))
    assert compiled.asm["cubin"], kernel.fn.__name__
print("compiled")
"""


def test_kernels_compile_for_sm90_bf16():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns while the default is unset
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=600, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip() == "compiled", proc.stderr[-3000:]
