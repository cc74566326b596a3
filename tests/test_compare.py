"""`verl-anchor compare`: its statistics, table, plot and refusals (the runs themselves: docs/experiments.md)."""

import json
import math
import shutil

import pytest

from verl_anchor.cli import main
from verl_anchor.commands import compare
from verl_anchor.models.tiny import ensure_tiny_model


def rows_for(values: dict[str, list[float]], step: int = 10) -> list[dict]:
    rows = []
    for estimator, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            rows.append(
                {
                    "estimator": estimator,
                    "seed": seed,
                    "step": 0,
                    "greedy": 0.2,
                    "mean_at_k": 0.1,
                    "train_mean_at_16": 0.15,
                }
            )
            rows.append(
                {
                    "estimator": estimator,
                    "seed": seed,
                    "step": step,
                    "greedy": value,
                    "mean_at_k": value / 2,
                    "train_mean_at_16": value * 2,
                }
            )
    return rows


def test_mean_and_standard_error():
    mean, se = compare.mean_and_se([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and se == pytest.approx(0.1 / math.sqrt(3))
    assert math.isnan(compare.mean_and_se([0.5])[1])  # one seed: no spread to report


def test_table_reports_final_step_mean_se_difference_and_detectable_difference():
    table = compare.summary_table(
        rows_for({"grpo": [0.10, 0.12, 0.14], "anchor_coupled": [0.20, 0.22, 0.24]}),
        ["grpo", "anchor_coupled"],
        samples=4,
    )
    lines = table.splitlines()
    assert lines[0] == "| metric (step 10) | grpo | anchor_coupled |"
    assert lines[2] == "| held-out greedy accuracy | 12.0 +- 1.2 | 22.0 +- 1.2 |"
    se_diff = math.sqrt(2) * 0.02 / math.sqrt(3)
    mde = 2.8016 * se_diff  # z(0.975) + z(0.80): a two-sided 5% test with 80% power
    assert lines[3] == (
        f"| held-out greedy accuracy: difference to grpo | - | +10.0 (SE {100 * se_diff:.1f}, MDE {100 * mde:.1f}) |"
    )
    assert "| held-out mean@4 accuracy (T = 1.0) | 6.0 +- 0.6 | 11.0 +- 0.6 |" in table
    assert "| training prompts mean@16 accuracy (T = 1.0) | 24.0 +- 2.3 | 44.0 +- 2.3 |" in table
    assert (
        "Step 0 (the SFT policy, shared): held-out greedy 20.0, mean@4 10.0; training prompts mean@16 15.0. "
        "Seeds: [0, 1, 2]"
    ) in table


def test_plot_is_written(tmp_path):
    path = tmp_path / "accuracy.png"
    compare.plot_accuracy(
        rows_for({"grpo": [0.1, 0.2], "anchor_random": [0.3, 0.1]}), ["grpo", "anchor_random"], 4, path
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--estimators", "grpo", "grpo"], ["must not repeat"]),
        (["--seeds", "1", "1"], ["must not repeat"]),
        (["--estimators", "anchor_copuled"], ["not an advantage estimator", "anchor_coupled"]),
        (["--heldout", "100000"], ["--heldout 100000", "held-out problems"]),
        (["--steps", "0"], ["--steps"]),
        (["--steps", "7", "--eval-every", "5"], ["--steps 7 is not a multiple of --eval-every 5"]),
    ],
)
def test_bad_options_are_one_error_line_before_anything_runs(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("verl_anchor.models.policy.ensure_policy", lambda *a, **k: pytest.fail("started building"))
    assert main(["compare", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert all(word in err[0] for word in words), err


# ---------------------------------------------------------------------------------------------
# Issue 16: the evaluation cache knows which policy it measured; a cut-short cache is recomputed; one seed


PROTOCOL = {"heldout": 2, "samples": 1, "train_problems": 1}


@pytest.fixture
def counted_evaluate(monkeypatch):
    """`policy.evaluate` replaced by one that records its calls (the cache, not the accuracy, is tested)."""
    calls = []

    def fake(model, tokenizer, problems, temperature=1.0, samples=1, seed=0, batch_size=64):
        calls.append(model.config.name_or_path)
        return 0.25

    monkeypatch.setattr("verl_anchor.models.policy.evaluate", fake)
    return calls


def same_named_models(tmp_path):
    """Two different policies in directories of the same name (as a retrained policy would be)."""
    models = []
    for seed in (0, 1):
        model = tmp_path / f"build{seed}" / "countdown-policy"
        shutil.copytree(ensure_tiny_model(tmp_path / "cache", seed=seed), model)
        models.append(model)
    return models


def test_the_step0_evaluation_of_one_policy_is_not_reused_for_another(tmp_path, counted_evaluate):
    first, second = same_named_models(tmp_path)
    cache = tmp_path / "step0.json"
    assert compare._evaluate_cached(cache, first, PROTOCOL)["greedy"] == 0.25
    assert len(counted_evaluate) == 3
    compare._evaluate_cached(cache, first, PROTOCOL)
    assert len(counted_evaluate) == 3  # the same policy: read back
    compare._evaluate_cached(cache, second, PROTOCOL)
    assert counted_evaluate[3:] == [str(second)] * 3  # another policy: measured anew


@pytest.mark.parametrize("content", ['{"protocol": {"heldout": 2, "sam', "", "[1, 2]", '{"accuracy": 3}'])
def test_a_cut_short_or_corrupt_evaluation_cache_is_measured_again(tmp_path, counted_evaluate, content):
    model = ensure_tiny_model(tmp_path / "cache")
    cache = tmp_path / "eval_step5.json"
    cache.write_text(content)
    assert compare._evaluate_cached(cache, model, PROTOCOL) == {
        "greedy": 0.25,
        "mean_at_k": 0.25,
        "train_mean_at_16": 0.25,
    }
    assert len(counted_evaluate) == 3 and json.loads(cache.read_text())["accuracy"]["greedy"] == 0.25


def test_another_starting_policy_is_another_training(tmp_path, monkeypatch, counted_evaluate):
    """The runs' training cache is keyed by the starting policy's weights, not its directory's name."""
    trainings = []
    models = iter(same_named_models(tmp_path))
    monkeypatch.setattr("verl_anchor.models.policy.ensure_policy", lambda *a, **k: next(models))
    monkeypatch.setattr(
        compare,
        "_run_one",
        lambda run_dir, estimator, seed, policy, training, *a: (
            trainings.append(training) or {5: {"greedy": 0.1, "mean_at_k": 0.1, "train_mean_at_16": 0.1}}
        ),
    )
    monkeypatch.setattr(compare, "plot_accuracy", lambda *a: None)
    for _ in range(2):
        assert (
            main(
                [
                    "compare",
                    "--out",
                    str(tmp_path / "o"),
                    "--estimators",
                    "grpo",
                    "--seeds",
                    "0",
                    "--steps",
                    "5",
                    "--heldout",
                    "2",
                    "--samples",
                    "1",
                    "--train-problems",
                    "1",
                ]
            )
            == 0
        )
    assert trainings[0]["policy"] != trainings[1]["policy"]


def test_one_seed_has_no_standard_error_and_says_so():
    table = compare.summary_table(
        rows_for({"grpo": [0.10], "anchor_coupled": [0.20]}), ["grpo", "anchor_coupled"], samples=4
    )
    assert "nan" not in table
    assert "| held-out greedy accuracy | 10.0 (SE n/a, 1 seed) | 20.0 (SE n/a, 1 seed) |" in table
    assert "| held-out greedy accuracy: difference to grpo | - | +10.0 (SE n/a, 1 seed) |" in table
