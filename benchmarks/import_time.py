"""What the verl_anchor plugin adds to `import verl`: median seconds with and without it.

Each run is a fresh interpreter that times `import verl` itself (interpreter start-up excluded):
wall seconds, and the CPU seconds of the process, which a busy shared machine inflates much
less; it also counts the modules loaded. "Without" sets `VERL_USE_EXTERNAL_PLUGINS=none`, verl's
switch that skips entry-point plugins. The two kinds alternate, so a load change hits both alike.

    PYTHONPATH=. python benchmarks/import_time.py            # 9 runs of each
    PYTHONPATH=. python benchmarks/import_time.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

PROBE = (
    "import sys, time; wall, cpu = time.perf_counter(), time.process_time(); import verl; "
    "print(time.perf_counter() - wall, time.process_time() - cpu, len(sys.modules))"
)
KINDS = {"none": "without the plugin", "auto": "with the plugin"}


def import_cost(plugins: str) -> tuple[float, float, int]:
    """(wall s, CPU s, modules) of `import verl` in a new interpreter with `VERL_USE_EXTERNAL_PLUGINS=plugins`."""
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": plugins}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    wall, cpu, modules = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu), int(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs of each kind (default 9)")
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float, int]]] = {kind: [] for kind in KINDS}
    for _ in range(args.runs):
        for plugins, samples in runs.items():
            samples.append(import_cost(plugins))
    medians = {}
    for plugins, label in KINDS.items():
        wall, cpu, modules = (statistics.median(column) for column in zip(*runs[plugins]))
        medians[plugins] = wall, cpu, modules
        print(
            f"import verl {label:<18}: median wall {wall:.2f} s, CPU {cpu:.2f} s, {modules:.0f} modules "
            f"over {args.runs} runs (wall {', '.join(f'{run[0]:.2f}' for run in runs[plugins])})"
        )
    (wall0, cpu0, mod0), (wall1, cpu1, mod1) = medians["none"], medians["auto"]
    print(f"difference: wall {wall1 - wall0:+.2f} s, CPU {cpu1 - cpu0:+.2f} s, {mod1 - mod0:+.0f} modules")


if __name__ == "__main__":
    main()
