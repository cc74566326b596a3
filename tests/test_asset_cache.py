"""`tiny.build_once`, the cache of every built asset: incomplete entries rebuilt, killed builds cleaned up,
concurrent builders taking turns, an unusable cache refused in one line."""

import fcntl
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from verl_anchor.models import tiny
from verl_anchor.usage import UsageError


def write_asset(directory: Path, text: str = "built") -> None:
    (directory / "weights.bin").write_text(text)


@pytest.fixture
def builders():
    """Started builder processes, killed at teardown whatever the test did (a failed test leaves none)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start_builder(builders: list, final: Path, release: Path) -> tuple[subprocess.Popen, Path]:
    """A real process inside `build_once(final)`: it has written part of its asset and waits until `release`
    exists. Returns the process and its temporary build directory."""
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from verl_anchor.models.tiny import build_once

        def build(tmp):
            (tmp / "weights.bin").write_text("from the other process")
            print(tmp, flush=True)
            while not Path(sys.argv[2]).exists():
                time.sleep(0.05)

        build_once(Path(sys.argv[1]), build)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(final), str(release)], stdout=subprocess.PIPE, text=True)
    builders.append(proc)
    tmp = Path(proc.stdout.readline().strip())  # blocks until the builder is inside its build
    assert tmp.is_dir() and tmp.parent == final.parent, tmp
    return proc, tmp


def leftovers(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.glob(f".{final.name}-*"))


def test_a_killed_build_leaves_its_temp_dir_to_the_next_build_which_removes_it(tmp_path, builders):
    final = tmp_path / "asset"
    proc, tmp = start_builder(builders, final, tmp_path / "never")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not final.exists()  # what a killed build leaves
    assert tiny.build_once(final, write_asset) == final
    assert (final / "weights.bin").read_text() == "built" and tiny.asset_problem(final) is None
    assert leftovers(final) == []


def test_a_second_builder_waits_for_a_live_one_and_uses_its_result(tmp_path, monkeypatch, builders):
    """The live builder's temp dir is not taken for a killed one's: the second builder finds the lock held,
    waits, and uses the first one's asset instead of building its own."""
    final, release = tmp_path / "asset", tmp_path / "release"
    proc, tmp = start_builder(builders, final, release)
    real_flock, found_held = fcntl.flock, []

    def flock_releasing_the_other_builder(fd, operation):
        try:
            real_flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:  # the other process holds it: let it finish, then wait for it
            found_held.append(True)
            release.touch()
            real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_releasing_the_other_builder)
    built_here = []
    assert tiny.build_once(final, built_here.append) == final
    assert proc.wait() == 0 and found_held == [True] and built_here == []
    assert (final / "weights.bin").read_text() == "from the other process"
    assert not tmp.exists() and leftovers(final) == []


@pytest.mark.parametrize("damage", ["delete", "truncate", "no checksums", "a file"])
def test_an_incomplete_asset_is_rebuilt(tmp_path, damage):
    final = tmp_path / "asset"
    tiny.build_once(final, lambda d: write_asset(d, "first build, long enough to cut short"))
    if damage == "delete":
        (final / "weights.bin").unlink()
    elif damage == "truncate":
        (final / "weights.bin").write_text("first")
    elif damage == "no checksums":  # e.g. a build of an older version, or one that did not finish
        (final / tiny.CHECKSUMS).unlink()
    else:
        import shutil

        shutil.rmtree(final)
        final.write_text("not a directory")
    assert tiny.asset_problem(final) is not None
    assert tiny.build_once(final, write_asset) == final
    assert (final / "weights.bin").read_text() == "built" and tiny.asset_problem(final) is None


def test_a_tiny_model_cut_short_is_rebuilt_and_loads(tmp_path):
    path = tiny.ensure_tiny_model(tmp_path)
    weights = path / "model.safetensors"
    expected = load_file(weights)
    weights.write_bytes(weights.read_bytes()[:1000])
    assert tiny.ensure_tiny_model(tmp_path) == path
    assert load_file(weights).keys() == expected.keys()


@pytest.mark.parametrize("where", ["is a file", "inside a file"])
def test_an_unusable_cache_is_one_clear_error(tmp_path, where):
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    cache = blocker if where == "is a file" else blocker / "sub"
    with pytest.raises(tiny.CacheError) as err:
        tiny.ensure_tiny_model(cache)
    message = str(err.value)
    assert isinstance(err.value, UsageError) and "\n" not in message  # the CLI's one `error:` line
    assert str(cache) in message and "writable directory" in message and "VERL_ANCHOR_CACHE" in message
