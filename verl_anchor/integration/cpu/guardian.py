"""A verl run's guardian: once the process that launched the run is gone, no process of the run is left.

Every process of the run carries the run's marker ``VERL_ANCHOR_RUN=<id>`` in its environment: the
launcher sets it for verl's driver, and the Ray processes the driver starts (gcs_server, raylet,
dashboard, workers) inherit it, including any that leave the driver's session or process group. The
guardian is started before the run, in a session of its own (so neither a terminal's Ctrl-C nor a
signal to the launcher's process group reaches it), and reads its stdin: a pipe whose only write
end the launcher holds. EOF - the launcher closed it (the run ended, timed out or was interrupted)
or died (SIGKILL included, which no handler sees) - means: SIGKILL every process that carries the
marker until none is left, then remove the run's Ray temp dir.

Run as a file (``python -I guardian.py RUN_ID RAY_TMP``), so it imports only the standard library
and is up in milliseconds. The launcher's output-dir locks are passed to it (`launch.hold_output_dir`):
it holds them until the run's processes are gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

MARKER = "VERL_ANCHOR_RUN"
# Give up after this long: a run whose processes keep reappearing for a minute is not being stopped by SIGKILL.
KILL_DEADLINE_S = 60.0
# A process the driver forks just before being killed shows up a moment later: scan until this many come back empty.
EMPTY_SCANS = 3


def marked_pids(run_id: str) -> list[int]:
    """The processes (of this user: others' environments are unreadable) whose environment holds `run_id`'s marker."""
    entry = f"{MARKER}={run_id}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if entry in environ.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return pids


def kill_run(run_id: str) -> list[int]:
    """SIGKILL every process of the run until none is left (or `KILL_DEADLINE_S` passes); the pids still alive."""
    deadline = time.monotonic() + KILL_DEADLINE_S
    empty = 0
    while True:
        pids = [pid for pid in marked_pids(run_id) if pid != os.getpid()]
        if not pids:
            empty += 1
            if empty >= EMPTY_SCANS:
                return []
        else:
            empty = 0
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    run_id, ray_tmp = argv
    # It ends by itself once the run is gone; a closing terminal, or a `kill` of every pid a refusal named,
    # must not end it first.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    while sys.stdin.buffer.read(1 << 16):  # nothing is ever written: wait for EOF
        pass
    left = kill_run(run_id)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if left:
        print(f"verl_anchor guardian: processes {left} of run {run_id} survived SIGKILL", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
