"""Nothing of a verl run, nor a math-verify worker, outlives what started it; a live run's directory is refused.

Real subprocesses throughout: a launcher process runs `run_main_ppo` and is sent a signal (or SIGKILL); the
test then looks in /proc for any process of that run. The quick tests run a stand-in `main_ppo` that starts a
process in a session of its own (as a daemon would), the slow one real verl with Ray. The math-verify tests
SIGKILL a process whose pool worker is deep in `9^{9^{9}}`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from verl_anchor.cli import main
from verl_anchor.commands.demo import demo_overrides
from verl_anchor.integration.cpu.launch import LOCK_FILE, hold_output_dir
from verl_anchor.models.tiny import ensure_tiny_model
from verl_anchor.rewards.math_verify_pool import MathVerifier

ROOT = Path(__file__).resolve().parents[1]
# A main_ppo stand-in: a child that leaves the session (setsid, as a daemon would), both pids in pids.txt, sleep.
_FAKE_MAIN_PPO = """
import os, time
child = os.fork()
if child == 0:
    os.setsid()
    time.sleep(600)
    os._exit(0)
with open("pids.tmp", "w") as f:
    f.write(f"{os.getpid()} {child}")
os.rename("pids.tmp", "pids.txt")
time.sleep(600)
"""
_LAUNCHER = """
import os, sys
from pathlib import Path
from verl_anchor.integration.cpu.launch import run_main_ppo
if "RUN_PYTHONPATH" in os.environ:  # the run's (a stand-in verl), set after verl_anchor imported the real one
    os.environ["PYTHONPATH"] = os.environ.pop("RUN_PYTHONPATH")
workdir = Path(sys.argv[1])
sys.exit(run_main_ppo(sys.argv[2:], workdir, workdir / "main_ppo.log"))
"""


def run_processes(launcher_pid: int) -> list[tuple[int, str]]:
    """(pid, name) of the live processes whose environment names a run launched by `launcher_pid`."""
    prefix = f"VERL_ANCHOR_RUN={launcher_pid}-".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
            comm = Path(f"/proc/{name}/comm").read_text().strip()
        except OSError:
            continue
        if any(entry.startswith(prefix) for entry in environ.split(b"\0")):
            found.append((int(name), comm))
    return found


def wait_for(condition, timeout: float, what: str, launcher: subprocess.Popen | None = None):
    """`condition()` once it is true; fails after `timeout` s, or as soon as `launcher` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if launcher is not None and launcher.poll() is not None:
            pytest.fail(
                f"the launcher exited with {launcher.returncode} before the {what}: {launcher.stdout.read()[-3000:]}"
            )
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s")


def start_launcher(workdir: Path, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(workdir), *overrides],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def fake_verl_env(tmp_path: Path) -> dict[str, str]:
    """The launcher's environment, with a PYTHONPATH for its run that puts the stand-in
    `verl.trainer.main_ppo` before the real verl."""
    package = tmp_path / "fake" / "verl" / "trainer"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "main_ppo.py").write_text(_FAKE_MAIN_PPO)
    return {**os.environ, "RUN_PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)])}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def stop_and_check(launcher: subprocess.Popen, signum: int, pids: list[int]) -> None:
    """Send `signum` to the launcher: it exits with the conventional code, and within 20 s neither `pids` nor
    any other process of its run is left."""
    try:
        launcher.send_signal(signum)
        rc = launcher.wait(timeout=60)
        output = launcher.stdout.read()
        assert rc == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum), output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        wait_for(
            lambda: not any(map(alive, pids)) and not run_processes(launcher.pid), 20, "end of the run's processes"
        )
    finally:  # never leave anything running, even when the test fails
        launcher.kill()
        for pid in [*pids, *(pid for pid, _ in run_processes(launcher.pid))]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL])
def test_a_stopped_or_killed_launcher_leaves_no_process_of_its_run(tmp_path: Path, signum: int) -> None:
    workdir = tmp_path / "run"
    launcher = start_launcher(workdir, [], fake_verl_env(tmp_path))
    try:
        text = wait_for(
            lambda: (workdir / "pids.txt").is_file() and (workdir / "pids.txt").read_text(),
            120,
            "stand-in run",
            launcher,
        )
    except BaseException:
        launcher.kill()
        raise
    pids = [int(pid) for pid in text.split()]  # the driver and the child that left its session
    assert all(map(alive, pids))
    stop_and_check(launcher, signum, pids)


def test_a_dir_that_a_live_run_holds_is_refused_until_the_run_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """demo and compare refuse an --out dir whose lock a command's verl run still holds (one error line naming
    the dir and the pid), and take it once the run is gone."""
    workdir = tmp_path / "run"
    locking = _LAUNCHER.replace(
        "workdir = Path(sys.argv[1])\n",
        "workdir = Path(sys.argv[1])\n"
        "from verl_anchor.integration.cpu.launch import hold_output_dir\nhold_output_dir(workdir)\n",
    )
    assert locking != _LAUNCHER
    workdir.mkdir()
    env = fake_verl_env(tmp_path)
    launcher = subprocess.Popen(
        [sys.executable, "-c", locking, str(workdir)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        text = wait_for(
            lambda: (workdir / "pids.txt").is_file() and (workdir / "pids.txt").read_text(),
            120,
            "stand-in run",
            launcher,
        )
        driver = int(text.split()[0])
        lock = str(workdir / LOCK_FILE)
        assert any(os.readlink(fd.path) == lock for fd in os.scandir(f"/proc/{driver}/fd"))  # the run inherits it
        for command in ("demo", "compare"):
            assert main([command, "--out", str(workdir)]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {workdir} is in use by process "), lines
            assert str(launcher.pid) in lines[0]
        stop_and_check(launcher, signal.SIGTERM, [int(pid) for pid in text.split()])
    finally:
        launcher.kill()
    hold_output_dir(workdir)  # gone with the run: the next command takes it


_POOL_PARENT = """
import threading, time
from verl_anchor.rewards.math_verify_pool import MathVerifier
if __name__ == "__main__":
    verifier = MathVerifier(1)
    threading.Thread(target=verifier.verify, args=("1", "9^{9^{9}}", 600), daemon=True).start()
    time.sleep(600)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children(pid: int) -> list[int]:
    """`pid`'s child processes (whichever of its threads forked them)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(name))
        except OSError:
            continue
    return found


def test_a_math_verify_worker_busy_in_c_code_dies_with_its_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"  # a file: spawn re-imports the parent's main module
    script.write_text(_POOL_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers: list[int] = []
    try:

        def busy_worker() -> list[int]:
            # pebble's worker (the spawn resource tracker is the other child) deep in 9^{9^{9}}: seconds of CPU
            return [pid for pid in children(parent.pid) if alive(pid) and cpu_seconds(pid) > 5]

        workers = wait_for(busy_worker, 120, "busy math-verify worker", parent)
        parent.kill()
        parent.wait()
        wait_for(lambda: not any(map(alive, workers)), 10, "end of the orphaned worker")
    finally:
        parent.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_math_verify_workers_outlive_the_thread_that_started_their_pool() -> None:
    verifier = MathVerifier(1)
    try:
        results = []
        first = threading.Thread(target=lambda: results.append(verifier.verify("1/2", "0.5", 60)))
        first.start()
        first.join()
        workers = multiprocessing.active_children()
        time.sleep(1)  # a worker killed with that thread would be gone by now
        assert results == [True] and workers and all(worker.is_alive() for worker in workers)
        assert verifier.verify("2", "2", 60)
        assert set(multiprocessing.active_children()) >= set(workers)  # the same workers did it
    finally:
        verifier.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_a_real_verl_run_leaves_no_ray_or_verl_process(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    overrides = demo_overrides(
        workdir, steps=100, estimator="anchor_coupled", model=ensure_tiny_model(tmp_path / "cache")
    )
    launcher = start_launcher(workdir, overrides, dict(os.environ))
    try:
        # Underway: Ray's daemons, the trainer's workers and the rollout server are up (the quick tests cover
        # SIGKILL and the other signals; one Ray start-up is the slow part).
        started = wait_for(
            lambda: (
                {"raylet", "gcs_server", "ray::WorkerDict", "ray::HFServer"}
                <= {name for _, name in run_processes(launcher.pid)}
                and run_processes(launcher.pid)
            ),
            600,
            "Ray and verl workers",
            launcher,
        )
    except BaseException:
        launcher.kill()
        raise
    stop_and_check(launcher, signal.SIGTERM, [pid for pid, _ in started])


def test_ctrl_c_outside_a_verl_run_is_one_line_and_exit_130():
    """A command busy in its own work (here the policy's evaluation) stopped by Ctrl-C: no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "verl_anchor.cli", "policy", "--evaluate"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # the evaluation starts right after the recorded accuracy is printed
            if line.startswith("recorded:"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["interrupted"], stderr


def test_an_output_dir_that_cannot_be_written_is_one_clear_error(capsys):
    """/proc/self exists, so make_dir accepts it, but no file can be created in it (not even by root)."""
    assert main(["demo", "--out", "/proc/self"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write in the output directory /proc/"), err
