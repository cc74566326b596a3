"""Launch `python -m verl.trainer.main_ppo` in CPU mode and read its per-step metrics."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from verl_anchor.cpu import cpu_env

_STEP_LINE = re.compile(r"step:(\d+) - (.*)$")


def parse_step_metrics(log: str) -> dict[int, dict[str, float]]:
    """The numeric metrics of every `step:N - key:value - ...` line verl's console logger prints."""
    steps: dict[int, dict[str, float]] = {}
    for line in log.splitlines():
        match = _STEP_LINE.search(line)
        if not match:
            continue
        metrics = {}
        for item in match.group(2).split(" - "):
            key, _, value = item.rpartition(":")
            try:
                metrics[key.strip()] = float(value)
            except ValueError:
                continue
        steps[int(match.group(1))] = metrics
    return steps


def run_main_ppo(
    overrides: Sequence[str],
    workdir: str | os.PathLike,
    log_path: str | os.PathLike,
    timeout: float = 900,
    on_line: Callable[[str], None] | None = None,
) -> int:
    """Run verl's `main_ppo` with CPU mode on; the whole output goes to `log_path`.

    Returns the exit code. `on_line` sees each output line as it comes (progress display).
    The run gets its own process group and a short private Ray temp dir, both cleaned up.
    """
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, **cpu_env(), "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    try:
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "verl.trainer.main_ppo", *overrides], env=env,
                                    cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", start_new_session=True)
            # The driver and the Ray processes it started share one process group: kill them all.
            watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
            watchdog.start()
            try:
                for line in proc.stdout:
                    log_file.write(line)
                    if on_line is not None:
                        on_line(line.rstrip("\n"))
                return proc.wait()
            finally:
                watchdog.cancel()
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
