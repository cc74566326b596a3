"""Cost of the attention statistics: the paper's dense way vs capture inside a plain forward.

For a random model with Qwen3-4B's depth but narrow width (36 layers, hidden 256, 8 query /
2 KV heads, head dim 32, intermediate 1024, vocab 8192; float32 on CPU) and one sequence of
N tokens (the last half is the response), it measures in one run:

  (a) dense : eager forward with `output_attentions=True`, then `reference_stats` on the
              selected layers (the paper's way: every N x N attention matrix is materialised);
  (b) fast  : sdpa forward with `AttentionCapture` computing `token_stats` on the selected layers;
  (c) plain : the sdpa forward alone;

and, with `--analysis`,

  (d) analysis : sdpa forward with the capture in `verl-anchor analyze`'s mode: FAI horizon to the
              end of the response and the response's attention pooled to 256 x 256 cells per head;

and prints time and peak memory of each, and the ratios to (c). Each (mode, N) runs
in its own process so peak memory (max RSS above the RSS after building the model) is its own.
Where (a) would need more memory than is available it prints the estimate and skips it.

    python benchmarks/bench_stats.py                       # N = 1k, 2k, 4k, 8k, 16k
    python benchmarks/bench_stats.py --sizes 1024 4096 --repeats 3
    python benchmarks/bench_stats.py --sizes 1024 4096 --analysis
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=36,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=32768,
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def dense_estimate(n: int) -> int:
    """Bytes the dense way holds at its peak: every layer's (H, N, N) float32 probabilities are kept
    by `output_attentions`, plus eager's scores and softmax of the layer being computed."""
    per_layer = MODEL["num_attention_heads"] * n * n * 4
    return (MODEL["num_hidden_layers"] + 2) * per_layer


def worker(mode: str, n: int, repeats: int) -> dict:
    """Run one (mode, N) measurement in this process and return its numbers."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from verl_anchor import AnchorConfig
    from verl_anchor.capture.hooks import AttentionCapture
    from verl_anchor.core.metrics import reference_stats, select_layers

    torch.manual_seed(0)
    impl = "eager" if mode == "dense" else "sdpa"
    model = AutoModelForCausalLM.from_config(Qwen3Config(**MODEL), attn_implementation=impl).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (1, n))
    cfg = AnchorConfig()
    layers = select_layers(MODEL["num_hidden_layers"], cfg.num_layers)
    response_start = n // 2
    analysis_capture = AttentionCapture(model, AnchorConfig(fai_h_lo=0, fai_h_hi=None), map_bins=256)
    analysis_capture.map_from = response_start

    def run_once() -> None:
        with torch.no_grad():
            if mode == "plain":
                model(ids, use_cache=False)
            elif mode in ("fast", "analysis"):
                capture = analysis_capture if mode == "analysis" else AttentionCapture(model, cfg)
                with capture:
                    model(ids, use_cache=False)
                (stats,) = capture.pop()
                stats.response(response_start)
            else:
                attentions = model(ids, use_cache=False, output_attentions=True).attentions
                reference_stats(torch.cat([attentions[layer][0] for layer in layers]), response_start, cfg)

    baseline = rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "n": n,
        "seconds": min(times),
        "peak_bytes": max(0, peak - baseline),
        "threads": torch.get_num_threads(),
    }


def measure(mode: str, n: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(n), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"mode": mode, "n": n, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per (mode, N); the best is kept")
    parser.add_argument("--analysis", action="store_true", help="also measure (d), the analysis toolkit's capture")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs keep the whole table
    console.print(
        f"model: {MODEL}; statistics on 5 of 36 layers; response = last N/2 tokens; "
        f"best of {args.repeats} runs; memory = peak RSS above the RSS after building the model"
    )
    table = Table(title="attention statistics: dense (paper) vs fast capture vs plain forward")
    analysis = ["(d) analysis s", "(d)/(c) time", "(d) analysis MiB"] if args.analysis else []
    for column in (
        "N",
        "(c) plain s",
        "(b) fast s",
        "(a) dense s",
        "(b)/(c) time",
        "(a)/(c) time",
        "(c) plain MiB",
        "(b) fast MiB",
        "(a) dense MiB",
        "(b)-(c) MiB",
        *analysis,
    ):
        table.add_column(column, justify="right")
    mib = 1 << 20
    for n in args.sizes:
        repeats = args.repeats if n <= 4096 else 1
        with console.status(f"N = {n}: plain forward"):
            plain = measure("plain", n, repeats)
        with console.status(f"N = {n}: forward + capture"):
            fast = measure("fast", n, repeats)
        need, have = dense_estimate(n), available_bytes()
        if need > 0.8 * have:
            dense = {"skipped": f"needs ~{need / (1 << 30):.1f} GiB > 80% of {have / (1 << 30):.1f} GiB available"}
        else:
            with console.status(f"N = {n}: eager forward + output_attentions + dense formulas"):
                dense = measure("dense", n, repeats)
        results = [plain, fast, dense]
        if args.analysis:
            with console.status(f"N = {n}: forward + analysis-mode capture with attention maps"):
                results.append(measure("analysis", n, repeats))

        def cell(result: dict, key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
            if key in result:
                return fmt.format(result[key] / scale)
            return "[red]" + result.get("skipped", result.get("error", "?"))[:60] + "[/red]"

        def ratio(result: dict) -> str:
            return f"{result['seconds'] / plain['seconds']:.3f}" if "seconds" in result and "seconds" in plain else "-"

        extra = (
            [cell(results[3], "seconds"), ratio(results[3]), cell(results[3], "peak_bytes", mib, "{:.0f}")]
            if args.analysis
            else []
        )
        table.add_row(
            str(n),
            *(cell(r, "seconds") for r in results[:3]),
            ratio(fast),
            ratio(dense),
            *(cell(r, "peak_bytes", mib, "{:.0f}") for r in results[:3]),
            f"{(fast['peak_bytes'] - plain['peak_bytes']) / mib:.0f}"
            if "peak_bytes" in fast and "peak_bytes" in plain
            else "-",
            *extra,
        )
        console.print(f"N = {n}: " + json.dumps(results))
    console.print(table)


if __name__ == "__main__":
    main()
