"""Every option is checked before anything is built: `demo` / `compare` overrides through the config main_ppo
will compose (as `train --dry-run` checks a recipe), and the numeric options (no inf, nan, negative or
unholdable sizes) while the command line is parsed, or once the model is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verl_anchor import cli

from test_cli import assert_usage_error, no_model_load  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[1]

# Refused by hydra (an unknown key), by the anchor checks, and by verl's own validate_config.
BAD_OVERRIDES = [
    (["nonsense.key=1"], "Could not override 'nonsense.key'"),
    (["+algorithm.anchor.ratio=5"], "algorithm.anchor.ratio=5 is invalid"),
    (["actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.temperature=0"],
     "temperature should be greater than 0"),
]


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy is not trained or evaluated and no data is written."""
    from verl_anchor import compare, demo

    monkeypatch.setattr("verl_anchor.policy.ensure_policy", lambda *a, **k: pytest.fail("the policy was built"))
    monkeypatch.setattr(demo, "write_policy_data", lambda *a, **k: pytest.fail("the demo data was written"))
    monkeypatch.setattr(compare, "_evaluate_cached", lambda *a, **k: pytest.fail("the policy was evaluated"))


# ---------------------------------------------------------------------------------------------
# demo and compare: the overrides


@pytest.mark.parametrize("command", ["demo", "compare"])
@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES)
def test_bad_overrides_are_refused_before_anything_is_built(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            nothing_built: None, command: str,
                                                            overrides: list[str], message: str) -> None:
    out = tmp_path / "out"
    assert_usage_error([command, "--out", str(out), *overrides], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("estimator", ["anchor_coupled", "anchor_local_chunk", "anchor_random", "anchor_entropy",
                                       "grpo", "gae"])
def test_the_demo_config_itself_passes_the_check(tmp_path: Path, estimator: str) -> None:
    """The check does not trip on the CPU-mode overrides the demo adds (gae: verl's critic too)."""
    from verl_anchor.demo import POLICY_OVERRIDES, POLICY_RUN, demo_overrides
    from verl_anchor.launch import check_main_ppo

    config = check_main_ppo(demo_overrides(tmp_path / "out", 3, estimator, POLICY_OVERRIDES, build=False,
                                           **POLICY_RUN))
    assert config.algorithm.adv_estimator == estimator and config.trainer.device == "cpu"
    assert not (tmp_path / "out").exists()


def test_the_check_sees_the_overrides_the_run_gets(tmp_path: Path) -> None:
    from verl_anchor.demo import demo_overrides

    model = tmp_path / "model"  # only a path in the overrides: nothing loads it
    built = demo_overrides(tmp_path / "out", 2, "anchor_coupled", ["trainer.n_gpus_per_node=2"], model=model,
                           rl_problems=8)
    assert (tmp_path / "out" / "data" / "train.parquet").is_file()
    assert demo_overrides(tmp_path / "out", 2, "anchor_coupled", ["trainer.n_gpus_per_node=2"], model=model,
                          rl_problems=8, build=False) == built


def test_compare_checks_every_run_with_its_own_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         nothing_built: None) -> None:
    from verl_anchor import launch

    checked = []

    def check(overrides: list[str]) -> None:
        checked.append(overrides)
        if len(checked) == 4:
            raise launch.UsageError("stop")

    monkeypatch.setattr(launch, "check_main_ppo", check)
    assert cli.main(["compare", "--out", str(tmp_path / "out"), "--estimators", "grpo", "anchor_random",
                     "--seeds", "3", "4", "--steps", "2", "--eval-every", "1", "trainer.nnodes=1"]) == 2
    assert len(checked) == 4 and all(o[-1] == "trainer.nnodes=1" for o in checked)
    runs = {(next(o for o in overrides if o.startswith("algorithm.adv_estimator=")),
             next(o for o in overrides if o.startswith("actor_rollout_ref.rollout.seed="))) for overrides in checked}
    assert runs == {(f"algorithm.adv_estimator={e}", f"actor_rollout_ref.rollout.seed={s}")
                    for e in ("grpo", "anchor_random") for s in (3, 4)}
    assert not (tmp_path / "out").exists()


def test_demo_subprocess_refuses_an_unknown_key_with_one_line(tmp_path: Path) -> None:
    """A built policy in the cache, so that a run that does not check first fails fast in verl (exit 1)."""
    from verl_anchor.policy import policy_dir

    policy = policy_dir(tmp_path / "cache")
    policy.mkdir(parents=True)
    (policy / "policy.json").write_text(json.dumps({"parameters": 1e6, "heldout_accuracy": {"greedy": 0.2,
                                                                                            "sampled_t1": 0.1}}))
    env = {**os.environ, "VERL_ANCHOR_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONWARNINGS", None)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "verl_anchor.cli", "demo", "--out", str(out), "nonsense.key=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nonsense.key" in lines[0], done.stderr
    assert not out.exists()
