"""Launch `python -m verl.trainer.main_ppo` in CPU mode (leaving nothing running) and read its per-step metrics."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from verl_anchor.integration.cpu import cpu_env
from verl_anchor.integration.cpu import guardian as guardian_module
from verl_anchor.usage import UsageError

_STEP_LINE = re.compile(r"step:(\d+) - (.*)$")


_NUMPY_REPR = re.compile(r"^np\.\w+\((.*)\)$")


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
            try:  # the legacy trainer prints numpy scalars by repr: `np.float64(0.081)`
                metrics[key.strip()] = float(_NUMPY_REPR.sub(r"\1", value.strip()))
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
    However this ends - the run's exit, `timeout`, an exception, a signal, even SIGKILL of this
    process - no process of the run is left afterwards (see `guardian`), and its short private
    Ray temp dir is removed. SIGTERM, SIGINT or SIGHUP to this process (main thread) stops the run
    and raises `RunInterrupted` (exit code 128 + the signal's number). The run inherits the
    output-dir locks this process holds (`hold_output_dir`).
    """
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    run_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # the launcher's pid first: a test finds its run by it
    locks = tuple(_held_locks.values())
    guardian = subprocess.Popen(
        [sys.executable, "-I", guardian_module.__file__, run_id, ray_tmp],
        stdin=subprocess.PIPE,
        start_new_session=True,
        pass_fds=locks,
    )
    env = {**os.environ, **cpu_env(), "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1", guardian_module.MARKER: run_id}
    with _signals_interrupt():
        try:
            with open(log_path, "w", buffering=1) as log_file:  # line by line: the log can be followed
                proc = subprocess.Popen(
                    [sys.executable, "-m", "verl.trainer.main_ppo", *overrides],
                    env=env,
                    cwd=workdir,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    start_new_session=True,
                    pass_fds=locks,
                )
                # The driver's process group holds the Ray processes too: killing it ends the output.
                watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
                watchdog.daemon = True  # never keeps a stopped command alive
                try:
                    watchdog.start()
                    for line in proc.stdout:
                        log_file.write(line)
                        if on_line is not None:
                            on_line(line.rstrip("\n"))
                    return proc.wait()
                finally:
                    watchdog.cancel()
        finally:
            guardian.stdin.close()  # EOF: the guardian kills whatever of the run is left
            if guardian.wait() < 0:  # a signal (SIGKILL: it ignores the others) ended it: do its job here
                guardian_module.kill_run(run_id)
                shutil.rmtree(ray_tmp, ignore_errors=True)


class RunInterrupted(SystemExit):
    """A signal stopped the run (whose processes are gone): exits with code 128 + the signal's number."""


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise `RunInterrupted` (once: later ones are ignored while the run is
    stopped); the previous handlers come back after. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def interrupt(signum: int, frame: object) -> None:
        for other in stopping:
            signal.signal(other, signal.SIG_IGN)
        raise RunInterrupted(128 + signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in stopping}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class OutputDirBusy(UsageError):
    """Another process (a verl-anchor command, or a verl run one started) holds the output directory."""


LOCK_FILE = ".verl-anchor.lock"
_held_locks: dict[Path, int] = {}  # output dir -> the fd of its flock'ed lock file, open until this process exits


def hold_output_dir(path: Path) -> None:
    """Lock the output directory `path` for the rest of this process, or raise `OutputDirBusy` naming who holds it.

    The lock is an flock on `path/.verl-anchor.lock`; every verl run this process starts (`run_main_ppo`)
    and its guardian inherit it, so it lives as long as anything of this command may still write in `path`,
    the command's SIGKILL included. Taking it twice in one process is a no-op.
    """
    path = path.resolve()
    if path in _held_locks:
        return
    lock_file = path / LOCK_FILE
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:  # a directory that exists but is not ours to write (make_dir only made sure it exists)
        raise UsageError(f"cannot write in the output directory {path}: {err.strerror}; choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        recorded = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        holders = [str(pid) for pid in _lock_holders(lock_file)]
        # The command that took it, while it lives (stopping it stops its run); else what is left of its run.
        holders = ", ".join([recorded] if recorded in holders or not holders else holders)
        raise OutputDirBusy(
            f"{path} is in use by process {holders} (a verl-anchor command, or the verl run it "
            f"started, still writes there): wait for it to end, or stop it (kill {holders}), "
            "then run again"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[path] = fd


def _lock_holders(lock_file: Path) -> list[int]:
    """The processes (of this user) with `lock_file` open."""
    holders = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if any(os.readlink(fd.path) == str(lock_file) for fd in os.scandir(f"/proc/{name}/fd")):
                    holders.append(int(name))
            except OSError:  # gone meanwhile, or not ours
                continue
    return holders
