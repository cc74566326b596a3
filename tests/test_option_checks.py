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
import torch
from test_cli import assert_usage_error

from verl_anchor import cli

REPO = Path(__file__).resolve().parents[1]

# Refused by hydra (an unknown key), by the anchor checks, and by verl's own validate_config.
BAD_OVERRIDES = [
    (["nonsense.key=1"], "Could not override 'nonsense.key'"),
    (["+algorithm.anchor.ratio=5"], "algorithm.anchor.ratio=5 is invalid"),
    (
        ["actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.temperature=0"],
        "temperature should be greater than 0",
    ),
]


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy is not trained or evaluated and no data is written."""
    from verl_anchor.commands import compare, demo

    monkeypatch.setattr("verl_anchor.models.policy.ensure_policy", lambda *a, **k: pytest.fail("the policy was built"))
    monkeypatch.setattr(demo, "write_policy_data", lambda *a, **k: pytest.fail("the demo data was written"))
    monkeypatch.setattr(compare, "_evaluate_cached", lambda *a, **k: pytest.fail("the policy was evaluated"))


# ---------------------------------------------------------------------------------------------
# demo and compare: the overrides


@pytest.mark.parametrize("command", ["demo", "compare"])
@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES)
def test_bad_overrides_are_refused_before_anything_is_built(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    nothing_built: None,
    command: str,
    overrides: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert_usage_error([command, "--out", str(out), *overrides], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize(
    "estimator", ["anchor_coupled", "anchor_local_chunk", "anchor_random", "anchor_entropy", "grpo", "gae"]
)
def test_the_demo_config_itself_passes_the_check(tmp_path: Path, estimator: str) -> None:
    """The check does not trip on the CPU-mode overrides the demo adds (gae: verl's critic too)."""
    from verl_anchor.commands.demo import POLICY_OVERRIDES, POLICY_RUN, demo_overrides
    from verl_anchor.integration.compose import check_main_ppo

    config = check_main_ppo(demo_overrides(tmp_path / "out", 3, estimator, POLICY_OVERRIDES, build=False, **POLICY_RUN))
    assert config.algorithm.adv_estimator == estimator and config.trainer.device == "cpu"
    assert not (tmp_path / "out").exists()


def test_the_check_sees_the_overrides_the_run_gets(tmp_path: Path) -> None:
    from verl_anchor.commands.demo import demo_overrides

    model = tmp_path / "model"  # only a path in the overrides: nothing loads it
    built = demo_overrides(
        tmp_path / "out", 2, "anchor_coupled", ["trainer.n_gpus_per_node=2"], model=model, rl_problems=8
    )
    assert (tmp_path / "out" / "data" / "train.parquet").is_file()
    assert (
        demo_overrides(
            tmp_path / "out",
            2,
            "anchor_coupled",
            ["trainer.n_gpus_per_node=2"],
            model=model,
            rl_problems=8,
            build=False,
        )
        == built
    )


def test_compare_checks_every_run_with_its_own_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nothing_built: None
) -> None:
    from verl_anchor.integration import compose

    checked = []

    def check(overrides: list[str]) -> None:
        checked.append(overrides)
        if len(checked) == 4:
            raise compose.UsageError("stop")

    monkeypatch.setattr(compose, "check_main_ppo", check)
    assert (
        cli.main(
            [
                "compare",
                "--out",
                str(tmp_path / "out"),
                "--estimators",
                "grpo",
                "anchor_random",
                "--seeds",
                "3",
                "4",
                "--steps",
                "2",
                "--eval-every",
                "1",
                "trainer.nnodes=1",
            ]
        )
        == 2
    )
    assert len(checked) == 4 and all(o[-1] == "trainer.nnodes=1" for o in checked)
    runs = {
        (
            next(o for o in overrides if o.startswith("algorithm.adv_estimator=")),
            next(o for o in overrides if o.startswith("actor_rollout_ref.rollout.seed=")),
        )
        for overrides in checked
    }
    assert runs == {
        (f"algorithm.adv_estimator={e}", f"actor_rollout_ref.rollout.seed={s}")
        for e in ("grpo", "anchor_random")
        for s in (3, 4)
    }
    assert not (tmp_path / "out").exists()


def test_demo_subprocess_refuses_an_unknown_key_with_one_line(tmp_path: Path) -> None:
    """The policy is shipped, so a demo that does not check first starts verl and fails there (exit 1)."""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "verl_anchor.cli", "demo", "--out", str(out), "nonsense.key=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nonsense.key" in lines[0], done.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Numbers: inf, nan, negative, beyond what the model or the machine has


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e-45", "1e9"])
def test_temperature_must_be_greedy_or_a_sensible_finite_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, value: str
) -> None:
    for command in ("analyze", "coupling", "perturb"):
        assert_usage_error(
            [command, "--demo", "--out", str(tmp_path / "o"), "--temperature", value], capsys, "argument --temperature"
        )
    assert not (tmp_path / "o").exists()


def test_temperature_zero_and_ordinary_values_are_accepted() -> None:
    from verl_anchor.usage import temperature

    assert [temperature(v) for v in ("0", "0.7", "1", "2")] == [0.0, 0.7, 1.0, 2.0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--num-layers", "1000"], "argument --num-layers: 1000 is too large"),
        (["coupling", "--shuffles", str(10**9)], "argument --shuffles"),
        (["perturb", "--candidates", "1000"], "argument --candidates: 1000 is too large"),
        (["perturb", "--positions", "-1"], "argument --positions"),
        (["perturb", "--min-future", "-1"], "argument --min-future"),
    ],
)
def test_analysis_numbers_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, argv: list[str], message: str
) -> None:
    assert_usage_error([*argv, "--demo", "--out", str(tmp_path / "o")], capsys, message)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from verl_anchor.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny"))  # 2 layers: the middle third is both


def test_num_layers_beyond_the_models_middle_third(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Count to three.", "response": "one two three"}) + "\n")
    argv = ["analyze", "--model", str(tiny_model), "--prompts", str(prompts), "--map-bins", "4"]
    assert_usage_error(
        [*argv, "--num-layers", "3", "--out", str(tmp_path / "a")],
        capsys,
        "--num-layers 3 is more layers than the middle third",
        "2 (0, 1)",
        "use --num-layers 2 or fewer",
        "--layers",
    )
    assert cli.main([*argv, "--num-layers", "2", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["layers"] == [0, 1]
    assert cli.main([*argv, "--out", str(tmp_path / "c")]) == 0  # the default (5) takes what there is


def test_peak_radius_beyond_the_response_is_the_whole_response() -> None:
    from verl_anchor.analysis.coupling import find_peaks

    values = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert find_peaks(values, 1.0, 10**12).tolist() == find_peaks(values, 1.0, 5).tolist() == [1]


def test_compare_seeds_are_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None) -> None:
    for value in ("-1", str(2**64)):
        assert_usage_error(["compare", "--out", str(tmp_path / "o"), "--seeds", "0", value], capsys, "argument --seeds")


# ---------------------------------------------------------------------------------------------
# data countdown


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--train-size", str(10**8)],
            "argument --train-size: 100000000 is too large: use an integer from 0 to 1000000",
        ),
        (["--test-size", "-5"], "argument --test-size: -5 is invalid: use an integer >= 0"),
        (["--max-numbers", "11"], "argument --max-numbers: 11 is too large"),
        (["--min-numbers", "1"], "argument --min-numbers: 1 is invalid"),
        (["--max-target", str(10**24)], "argument --max-target"),  # parquet's int64
        (["--max-number", str(10**20)], "argument --max-number"),
    ],
)
def test_countdown_sizes_and_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert_usage_error(["data", "countdown", "--out", str(tmp_path / "cd"), *argv], capsys, message)
    assert not (tmp_path / "cd").exists()


def test_countdown_problems_in_one_set_are_capped() -> None:
    """Held in memory until written: a million is ~3 GB; 1e8 would need ~300 GB (and an hour) before failing."""
    from verl_anchor.data.countdown import MAX_PROBLEMS, generate_countdown
    from verl_anchor.data.schema import DataError

    with pytest.raises(DataError, match=f"{MAX_PROBLEMS} train \\+ 1 test problems, more than the {MAX_PROBLEMS}"):
        generate_countdown(MAX_PROBLEMS, 1)


def test_countdown_subprocess_refuses_1e8_problems_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl_anchor.cli",
            "data",
            "countdown",
            "--out",
            str(tmp_path / "cd"),
            "--train-size",
            "100000000",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: argument --train-size: 100000000 is too large: use an integer from 0 "
        "to 1000000 (the problems are held in memory, about 3 GB per million) "
        "(see verl-anchor data --help)"
    ]
    assert not (tmp_path / "cd").exists()
