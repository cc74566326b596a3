"""Registers, spills and shared memory of every Triton kernel configuration the launcher can use, compiled for
sm_80 and sm_90 without a GPU (triton's frontend, LLVM and the ptxas its wheel ships run on CPU).

    PYTHONPATH=. python benchmarks/kernel_resources.py           # the table (Markdown), ~1-2 min on 2 cores
    PYTHONPATH=. python benchmarks/kernel_resources.py --json    # one JSON object per line (the CI check reads it)

Combinations: the row pass, the FAI pass with a bounded and with an unbounded horizon; float32, float16 and
bfloat16 inputs at the launcher's block sizes for that dtype (`triton_stats.block_sizes`); head dims 64 and 128;
sm_80 and sm_90. Registers and spills come from ptxas's own report (`-v`, which triton passes), shared memory
from the compiled kernel's metadata; each run compiles into a fresh cache, since a cached kernel skips ptxas.
Exit code 1 if any configuration spills or needs more shared memory than its target allows.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Before triton is imported: compile for real (not the interpreter) into a cache of this run only,
# removed at exit (~22 MB a run; the pool's forked workers leave by os._exit and do not remove it).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel-resources-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns while the default is unset

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from verl_anchor.core.kernels import triton_stats  # noqa: E402

# Opt-in shared memory per block (CUDA programming guide, compute capabilities table): 163 KB, 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = (64, 128)
VARIANTS = {
    "row pass": (triton_stats._row_pass, 100),
    "FAI pass, bounded": (triton_stats._fai_pass, 100),
    "FAI pass, unbounded": (triton_stats._fai_pass, None),
}
_POINTER_ARGS = {"TILES": "*i32", "ROW_SPAN": "*fp32", "WAAD": "*fp32", "LSE2": "*fp32", "FAI": "*fp32"}


def combinations() -> list[tuple[str, str, int, int]]:
    return [
        (variant, dtype, head_dim, arch)
        for arch in SHARED_MEMORY_LIMIT
        for dtype in DTYPES
        for head_dim in HEAD_DIMS
        for variant in VARIANTS
    ]


def compile_one(combination: tuple[str, str, int, int]) -> dict:
    """Compile one configuration as `packed_stats` launches it; its resources as ptxas reports them."""
    variant, dtype_name, head_dim, arch = combination
    kernel, fai_h_hi = VARIANTS[variant]
    dtype = DTYPES[dtype_name]
    tile, inner = triton_stats.block_sizes(dtype)
    row, band = triton_stats.launch_constexprs(dtype, head_dim, 4, 10, 10, fai_h_hi, tile, inner)
    constexprs = row if kernel is triton_stats._row_pass else band
    pointers = dict(_POINTER_ARGS, Q=f"*{dtype_name}", K=f"*{dtype_name}", scale_log2e="fp32")
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names}
    knobs.nvidia.dump_ptxas_log = True  # ptxas's -v report, printed to stdout
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options=triton_stats.LAUNCH_OPTIONS,
        )
    report = log.getvalue()

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        if found is None:
            raise RuntimeError(f"no {pattern!r} in ptxas's report of {combination}:\n{report}")
        return int(found.group(1))

    return dict(
        kernel=variant,
        dtype=dtype_name,
        head_dim=head_dim,
        arch=f"sm_{arch}",
        tile=tile,
        inner=inner,
        registers=number(r"Used (\d+) registers"),
        stack=number(r"(\d+) bytes stack frame"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        shared=compiled.metadata.shared,
        shared_limit=SHARED_MEMORY_LIMIT[arch],
        shared_estimate=triton_stats.shared_memory_bytes(dtype, head_dim),
    )


def problems(row: dict) -> list[str]:
    """What is wrong with one configuration: spills, local memory, shared memory over the target's limit, or
    more than `triton_stats.shared_memory_bytes` (which the start-up device check relies on)."""
    found = []
    if row["spill_stores"] or row["spill_loads"] or row["stack"]:
        found.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads, {row['stack']} B stack)")
    if row["shared"] > row["shared_limit"]:
        found.append(f"shared memory {row['shared']} B > the target's {row['shared_limit']} B")
    if row["shared"] > row["shared_estimate"]:
        found.append(f"shared memory {row['shared']} B > shared_memory_bytes() = {row['shared_estimate']} B")
    return found


def table(rows: list[dict]) -> str:
    lines = [
        "| kernel | inputs | head dim | target | tile x inner | registers | spill stores / loads (B) | stack (B) "
        "| shared memory (B) | limit (B) |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['arch']} | {r['tile']} x {r['inner']} | "
        f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {r['shared']} | "
        f"{r['shared_limit']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration instead of a table")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    args = parser.parse_args()
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        rows = list(pool.map(compile_one, combinations()))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows))
    bad = [(row, problems(row)) for row in rows if problems(row)]
    for row, found in bad:
        print(f"{row['kernel']} {row['dtype']} D={row['head_dim']} {row['arch']}: {'; '.join(found)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
