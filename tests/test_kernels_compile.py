"""The CI compile check: every Triton kernel configuration the launcher can use (row pass, FAI pass bounded
and unbounded; float32, float16 and bfloat16 at their block sizes; head dims 64 and 128) compiles for sm_80
and sm_90 without a GPU (triton's frontend, LLVM and the ptxas its wheel ships run on CPU), without register
spills, and within the target's shared memory. The interpreter tests (test_kernels.py) check the numbers, not
that the code lowers or what it costs. `benchmarks/kernel_resources.py` compiles (in one subprocess, so that
TRITON_INTERPRET is unset however this process was started; two compilations at a time) and prints the table
that docs/performance.md records; it is printed here too (captured output) and in the failure message."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def resources():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--json", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, rows


def test_every_launch_configuration_compiles_without_spills_within_shared_memory(resources):
    import kernel_resources

    proc, rows = resources
    report = kernel_resources.table(rows)
    print(report)
    assert rows, proc.stderr[-3000:]
    assert {(r["kernel"], r["dtype"], r["head_dim"], int(r["arch"][3:])) for r in rows} == set(
        kernel_resources.combinations()
    ), report
    problems = {f"{r['kernel']} {r['dtype']} D={r['head_dim']} {r['arch']}": kernel_resources.problems(r) for r in rows}
    assert not {name: found for name, found in problems.items() if found}, report
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n" + report
