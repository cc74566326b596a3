"""math-verify in worker processes that are killed on timeout, with bounded recovery.

Why processes: math-verify bounds its work with ``signal.alarm``, which only works on the main
thread, while verl calls the reward from a thread pool; and one long C-level big-integer
operation (``9^{9^{9}}``) cannot be interrupted by a signal anyway. So each comparison runs as
a task of a `pebble.ProcessPool` with a per-task timeout: a task that overruns has its worker
killed and replaced, and the comparison scores 0. Nothing is ever verified in the calling
process, so no input can hang it.

Workers are started with ``spawn`` (never ``fork``: the callers are Ray's multi-threaded
reward workers). As with any spawn-based pool, a script that scores answers directly must keep
its top-level code under ``if __name__ == "__main__":``.

Recovery. A pool that fails as a whole (a worker cannot be started, every worker died, or
no worker picked up the task within `START_GRACE_S`) is stopped and replaced by a fresh one.
One comparison tries at most `ATTEMPTS` pools, waiting `RETRY_DELAYS_S` between them; if the
last one fails too, `MathVerifyUnavailable` is raised, which stops training with the cause
instead of scoring answers 0. So one comparison takes at most
``ATTEMPTS * (timeout_s + START_GRACE_S) + sum(RETRY_DELAYS_S)`` seconds. A pool that another
thread's comparison replaced is not a failure of this one: its waiters are woken at once and
resubmit to the fresh pool without using up an attempt (at most `ATTEMPTS` such resubmissions
per comparison; later ones count as failures).

``timeout_s`` must be a positive finite number of seconds, at most `MAX_TIMEOUT_S` (a day).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import importlib
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

from pebble import ProcessExpired, ProcessPool

logger = logging.getLogger(__name__)

# Pools one comparison may try: the first plus two fresh ones.
ATTEMPTS = 3
# Pause before the 2nd and 3rd pool (a transient failure, e.g. EAGAIN on fork, often clears).
RETRY_DELAYS_S = (1.0, 2.0)
# How long a task may wait for a worker to pick it up (a spawned worker imports math-verify
# first, ~2 s on an idle machine); the per-task timeout only starts once a worker has it.
START_GRACE_S = 60.0
# Longest accepted per-comparison timeout: longer ones overflow the pool's time arithmetic
# (1e10 s) and would only ever mean "no timeout", which a hostile answer turns into a hang.
MAX_TIMEOUT_S = 86_400.0


class MathVerifyUnavailable(RuntimeError):
    """math-verify could not be run in worker processes, even after fresh pools."""


def check_timeout(timeout_s: float) -> float:
    """``timeout_s`` if it is a positive finite number of seconds up to `MAX_TIMEOUT_S`, else ``ValueError``."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ValueError(f"timeout_s must be a number of seconds, got {timeout_s!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        # 0 would mean "no timeout" to pebble and a negative one kills every worker at once.
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    if timeout_s > MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be at most {MAX_TIMEOUT_S:.0f} seconds (a day), got {timeout_s!r}")
    return float(timeout_s)


def require_math_verify() -> None:
    """Import math-verify here, so that a missing or broken install fails loudly at first use
    instead of every worker dying at start-up (and every answer scoring 0)."""
    try:
        importlib.import_module("math_verify")
    except ImportError as exc:
        raise ImportError(
            f"the math reward needs math-verify (pip install math-verify), which cannot be imported: {exc}"
        ) from exc


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the thread that started it ends (its process's death included,
    SIGKILL too): a worker inside one C-level operation holds the GIL, so nothing of its own could notice."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before that: nothing would kill this orphan later
        os._exit(1)


def _init_worker(parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # pebble stops a worker with SIGTERM and its handler only runs between bytecodes, so a
    # worker inside one C-level big-integer operation would get 3 s more before SIGKILL: die at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The timeout is the parent's kill; silence math-verify's warning that its own is off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    importlib.import_module("math_verify")  # now, so that a task's timeout does not include it


def verify_answers(gold: str, pred: str) -> bool:
    """math-verify equivalence of two boxed answers (a worker's task; no timeout of its own)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", [LatexExtractionConfig()], parsing_timeout=None)
        pred_targets = [LatexExtractionConfig(), ExprExtractionConfig()]
        pred_parsed = parse(f"\\boxed{{{pred}}}", pred_targets, parsing_timeout=None)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001  (a parse/compare failure means "not verified")
        return False


class _Replaced(RuntimeError):
    """The pool of this attempt was discarded by another thread before the task finished."""

    def __init__(self) -> None:
        super().__init__("another comparison replaced the pool")


class _Generation:
    """One pool and a future that completes when it is discarded (which wakes every waiter on it)."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.discarded: concurrent.futures.Future[None] = concurrent.futures.Future()


class MathVerifier:
    """At most ``workers`` comparisons at a time, each in a pool worker; safe to call from many threads."""

    def __init__(self, workers: int, context: Any = None) -> None:
        require_math_verify()
        self._workers = workers
        self._context = context if context is not None else multiprocessing.get_context("spawn")
        # One task per worker in flight, so a scheduled task never queues behind another.
        self._slots = threading.BoundedSemaphore(workers)
        # A worker dies with the *thread* that forked it (`_die_with_parent`). pebble forks replacements on its
        # pool's own thread, but a pool's first workers on the thread of its first `schedule`: schedule on this
        # executor's one thread, which lives as long as the verifier, never on a caller's (which may end).
        self._scheduler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="math-verify-schedule")
        self._lock = threading.Lock()
        self._generation: _Generation | None = None

    def _current(self) -> _Generation:
        with self._lock:
            if self._generation is None:
                pool = ProcessPool(
                    self._workers, initializer=_init_worker, initargs=(os.getpid(),), context=self._context
                )
                self._generation = _Generation(pool)
            return self._generation

    def _discard(self, generation: _Generation) -> None:
        """Stop ``generation``'s pool (its workers included) and wake its waiters, unless another thread did."""
        with self._lock:
            if self._generation is not generation:
                return
            self._generation = None
        _stop(generation)

    def close(self) -> None:
        """Stop the workers; a later call starts a fresh pool."""
        with self._lock:
            generation, self._generation = self._generation, None
        if generation is not None:
            _stop(generation)

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool:
        """Whether ``pred`` is equivalent to ``gold``; False when the comparison overruns ``timeout_s``."""
        timeout_s = check_timeout(timeout_s)
        with self._slots:
            failure: BaseException | None = None
            failed = replaced = 0
            while failed < ATTEMPTS:
                generation = self._current()
                try:
                    return self._attempt(generation, gold, pred, timeout_s)
                except (_Replaced, RuntimeError, OSError) as exc:  # RuntimeError: BrokenProcessPool included
                    if generation.discarded.done() and replaced < ATTEMPTS:
                        # Another thread's comparison stopped this pool: not a failure of this one.
                        replaced += 1
                        continue
                    failure = exc
                    failed += 1
                    logger.warning("math-verify pool failed (%s); starting a fresh one (%d/%d)", exc, failed, ATTEMPTS)
                    self._discard(generation)
                if failed < ATTEMPTS:
                    time.sleep(RETRY_DELAYS_S[failed - 1])
            raise MathVerifyUnavailable(
                f"math-verify worker pool failed {ATTEMPTS} times in a row; last error: {failure!r}"
            ) from failure

    def _attempt(self, generation: _Generation, gold: str, pred: str, timeout_s: float) -> bool:
        """One try on ``generation``'s pool; `_Replaced` when another thread discards it meanwhile."""
        future = self._scheduler.submit(
            generation.pool.schedule, verify_answers, (gold, pred), timeout=timeout_s
        ).result()
        done, _ = concurrent.futures.wait(
            [future, generation.discarded],
            timeout=timeout_s + START_GRACE_S,
            return_when=concurrent.futures.FIRST_COMPLETED,
        )
        if future not in done:
            future.cancel()
            if generation.discarded in done:
                raise _Replaced()
            raise MathVerifyUnavailable(f"no worker took the task within {START_GRACE_S:.0f} s")
        try:
            return future.result()
        except concurrent.futures.TimeoutError:
            logger.warning("math-verify timed out after %.1fs on answer %.80r; scoring 0", timeout_s, pred)
            return False
        except ProcessExpired as exc:  # the worker died on this answer (e.g. out of memory)
            if generation.discarded.done():
                raise _Replaced() from None  # killed by another thread's discard, not by this answer
            logger.warning("math-verify worker died (%s) on answer %.80r; scoring 0", exc, pred)
            return False


def _stop(generation: _Generation) -> None:
    """Wake the generation's waiters, then stop its pool and workers."""
    if not generation.discarded.done():
        generation.discarded.set_result(None)
    generation.pool.stop()
    generation.pool.join()


_verifier: MathVerifier | None = None
_verifier_lock = threading.Lock()


def shared_verifier(workers: int) -> MathVerifier:
    """The process's verifier, created (and math-verify checked) on first use."""
    global _verifier
    with _verifier_lock:
        if _verifier is None:
            _verifier = MathVerifier(max(1, workers))
            atexit.register(_verifier.close)
        return _verifier
