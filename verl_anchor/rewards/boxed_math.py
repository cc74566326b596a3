"""Math reward: the response's last ``\\boxed{...}`` checked against the ground truth with math-verify.

Score 1.0 if the boxed answer is mathematically equivalent to the ground truth (math-verify's
``parse`` + ``verify``: ``\\frac{1}{2}`` = ``0.5``, ``\\boxed{72}`` = ``72``, sets, intervals,
...), else 0.0. A response without ``\\boxed{}`` scores 0: the prompt asks for one.

Timeouts. math-verify bounds its work with ``signal.alarm``, which only works on the main
thread, while verl calls the reward from a thread pool; with the alarms off, a hostile answer
such as ``9^{9^{9}}`` keeps sympy busy indefinitely, and one long C-level big-integer
operation cannot be interrupted by a signal anyway. So the check runs in a small pool of
worker processes with math-verify's own timeouts off: a worker that does not answer within
``timeout_s`` is killed (and replaced on the next call) and the response scores 0. Identical
strings skip the pool. If worker processes cannot be started at all, the check runs
in-process, with math-verify's signal timeouts on the main thread and none elsewhere.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
# Longest boxed answer considered (MATH-500's longest answer has 159 characters).
MAX_BOXED_CHARS = 1000
# Worker count per process calling the reward; override with VERL_ANCHOR_MATH_WORKERS.
NUM_WORKERS = int(os.environ.get("VERL_ANCHOR_MATH_WORKERS", min(4, os.cpu_count() or 1)))
_STARTUP_TIMEOUT_S = 120.0


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed) or ``\\boxed x`` in ``text``."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        return None
    rest = text[idx + len("\\boxed") : idx + len("\\boxed") + MAX_BOXED_CHARS + 2]
    if rest.startswith("{"):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return rest[1:i]
        return None  # unbalanced, or longer than MAX_BOXED_CHARS
    if rest.startswith(" "):
        token = rest.split(maxsplit=1)
        return token[0].rstrip("$.") if token else None
    return None


def _normalized(answer: str) -> str:
    return "".join(answer.split()).strip("$")


def _verify(gold: str, pred: str, timeout: int | None) -> bool:
    """math-verify equivalence of two boxed answers (the worker's job; also the in-process fallback)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", [LatexExtractionConfig()], parsing_timeout=timeout)
    pred_targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    pred_parsed = parse(f"\\boxed{{{pred}}}", pred_targets, parsing_timeout=timeout)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _serve() -> None:
    """Worker loop (run as ``python -c``): one JSON ``[gold, pred]`` per stdin line, one verdict per stdout line."""
    # Timeouts are enforced by the parent killing this process; silence math-verify's warning about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (imported before reporting ready, so startup is not timed as work)

    # The protocol owns the real stdout; anything else written to fd 1 (even from C) goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    protocol.write("ready\n")
    for line in sys.stdin:
        gold, pred = json.loads(line)
        try:
            verdict = _verify(gold, pred, None)
        except Exception:  # noqa: BLE001  (a parse/compare failure means "not verified")
            verdict = False
        protocol.write("1\n" if verdict else "0\n")


class _Worker:
    """A math-verify process, started with ``subprocess`` rather than ``multiprocessing``: spawn would
    re-import the caller's ``__main__`` (running an unguarded user script again) and fork is unsafe
    in a multi-threaded Ray actor."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from verl_anchor.rewards.boxed_math import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        if self._read_line(_STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("math-verify worker process did not start")

    def _read_line(self, timeout_s: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline().strip() if ready else None

    def ask(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None if it timed out or died (then it must be killed)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        line = self._read_line(timeout_s)
        return None if line not in ("0", "1") else line == "1"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class _Pool:
    """At most ``size`` workers, each serving one request at a time; safe to call from many threads."""

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the idle workers (busy ones are stopped by their callers)."""
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool:
        with self._slots:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = _Worker()
            verdict = worker.ask(gold, pred, timeout_s)
            if verdict is None:
                logger.warning("math-verify timed out after %.1fs on answer %.80r; scoring 0", timeout_s, pred)
                worker.kill()
                return False
            self._idle.put(worker)
            return verdict


_pool: _Pool | None = None
_pool_lock = threading.Lock()
_in_process = False  # set once worker processes turn out to be impossible here


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _Pool(max(1, NUM_WORKERS))
        return _pool


def answers_match(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether answer ``pred`` is equivalent to ``gold`` (both without ``\\boxed``), within ``timeout_s``."""
    global _in_process
    if _normalized(gold) == _normalized(pred):
        return True
    if not _in_process:
        try:
            return _get_pool().verify(gold, pred, timeout_s)
        except (RuntimeError, OSError) as exc:
            logger.warning("cannot start math-verify worker processes (%s); verifying in-process", exc)
            _in_process = True
    on_main = threading.current_thread() is threading.main_thread()
    try:
        return _verify(gold, pred, max(1, math.ceil(timeout_s)) if on_main else None)
    except Exception:  # noqa: BLE001
        return False


def score_math(solution_str: str, ground_truth: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the last ``\\boxed{}`` of ``solution_str`` is equivalent to ``ground_truth``, else 0.0."""
    pred = last_boxed(solution_str)
    if pred is None or not pred.strip():
        return 0.0
    return 1.0 if answers_match(str(ground_truth), pred, timeout_s) else 0.0
