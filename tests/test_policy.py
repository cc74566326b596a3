"""The small Countdown policy: worked solutions, disjoint splits, deterministic SFT, cache by recipe, the
shipped policy and the `verl-anchor policy` command."""

import dataclasses
import json
import re
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from verl_anchor.cli import main
from verl_anchor.data.countdown import CountdownProblem
from verl_anchor.models import policy
from verl_anchor.models.policy import (
    DEFAULT_RECIPE,
    SHIPPED_POLICY,
    PolicyRecipe,
    ensure_policy,
    policy_splits,
    train_policy,
    worked_solution,
)
from verl_anchor.models.tiny import CacheError, asset_problem
from verl_anchor.rewards.countdown import score_countdown
from verl_anchor.usage import UsageError

# Small enough to train in seconds: the loop, the cache and determinism, not the accuracy.
QUICK = PolicyRecipe(
    sft_problems=64,
    heldout_problems=8,
    layers=2,
    hidden=32,
    heads=2,
    kv_heads=1,
    head_dim=16,
    intermediate=64,
    steps=3,
    batch_size=4,
    warmup_steps=1,
)


def test_worked_solution_steps_follow_the_witness_and_score_full_marks():
    problem = CountdownProblem((3, 7, 5), 26, "(3 * 7) + 5")
    text = worked_solution(problem)
    assert text == "<think> 3 * 7 = 21, 21 + 5 = 26 </think> <answer> (3 * 7) + 5 </answer>"
    assert score_countdown(text, {"target": 26, "numbers": [3, 7, 5]}) == 1.0
    nested = CountdownProblem((12, 4, 2), 1, "2 - (12 / 4)")
    with pytest.raises(AssertionError):  # 2 - 3 is not 1: a witness that does not reach the target
        worked_solution(nested)
    assert worked_solution(CountdownProblem((12, 4, 5), 2, "5 - (12 / 4)")).startswith("<think> 12 / 4 = 3, 5 - 3 = 2")


def test_every_generated_solution_scores_full_marks():
    splits = policy_splits(QUICK, rl_problems=16)
    for problem in splits.sft + splits.rl + splits.heldout:
        truth = {"target": problem.target, "numbers": list(problem.numbers)}
        assert score_countdown(worked_solution(problem), truth) == 1.0


def test_splits_are_disjoint_and_the_heldout_set_does_not_depend_on_the_other_sizes():
    splits = policy_splits(QUICK, rl_problems=32)
    keys = [{p.key for p in part} for part in (splits.sft, splits.rl, splits.heldout)]
    assert [len(k) for k in keys] == [64, 32, 8]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    other = policy_splits(dataclasses.replace(QUICK, sft_problems=100), rl_problems=5)
    assert other.heldout == splits.heldout
    assert other.sft[:64] == splits.sft  # the RL prompts follow the SFT ones in the same stream
    assert all(
        len(p.numbers) == 3 and max(p.numbers) <= QUICK.max_number and p.target <= QUICK.max_target for p in splits.sft
    )


def test_training_is_deterministic_for_a_seed_and_the_seed_matters(tmp_path):
    first = train_policy(tmp_path / "a", QUICK, progress=False)
    train_policy(tmp_path / "b", QUICK, progress=False)
    train_policy(tmp_path / "c", dataclasses.replace(QUICK, seed=1), progress=False)
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in "abc"}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
    info = json.loads((tmp_path / "a" / "policy.json").read_text())
    assert info == json.loads(json.dumps(first)) and info["digest"] == QUICK.digest()
    assert set(info["heldout_accuracy"]) == {"greedy", "sampled_t1"}


def test_ensure_policy_builds_once_per_recipe(tmp_path, monkeypatch):
    calls = []
    real = policy.train_policy
    monkeypatch.setattr(policy, "train_policy", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    path = ensure_policy(tmp_path, QUICK, progress=False)
    assert ensure_policy(tmp_path, QUICK, progress=False) == path and len(calls) == 1
    other = ensure_policy(tmp_path, dataclasses.replace(QUICK, steps=4), progress=False)
    assert other != path and len(calls) == 2  # a changed recipe is a new cache entry
    built = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # the builders' lock files
    assert built == sorted([path.name, other.name])  # no temp dirs left


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_ANCHOR_CACHE", str(tmp_path / "x"))
    assert policy.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("VERL_ANCHOR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert policy.default_cache_dir() == tmp_path / "xdg" / "verl_anchor"


# ---------------------------------------------------------------------------------------------
# Issue 16: the cache of trained policies recovers; the default recipe's policy is shipped


@pytest.mark.parametrize("damage", ["no policy.json", "weights cut short"])
def test_a_damaged_cache_entry_is_trained_again(tmp_path, monkeypatch, damage):
    calls = []
    real = policy.train_policy
    monkeypatch.setattr(policy, "train_policy", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    path = ensure_policy(tmp_path, QUICK, progress=False)
    if damage == "no policy.json":
        (path / "policy.json").unlink()
    else:
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    assert ensure_policy(tmp_path, QUICK, progress=False) == path and len(calls) == 2
    assert json.loads((path / "policy.json").read_text())["digest"] == QUICK.digest()
    assert load_file(path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_an_unusable_cache_directory_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VERL_ANCHOR_CACHE", str(blocker))
    monkeypatch.setattr(policy, "train_policy", lambda *a, **k: pytest.fail("trained into an unusable cache"))
    with pytest.raises(CacheError, match="VERL_ANCHOR_CACHE") as err:
        ensure_policy(recipe=QUICK)
    assert isinstance(err.value, UsageError) and str(blocker) in str(err.value)


def test_the_default_recipe_is_the_shipped_policy_and_is_never_trained(tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "train_policy", lambda *a, **k: pytest.fail("trained the default recipe"))
    monkeypatch.setenv("VERL_ANCHOR_CACHE", str(tmp_path / "cache"))
    assert ensure_policy() == SHIPPED_POLICY == ensure_policy(tmp_path) == policy.policy_dir()
    assert not (tmp_path / "cache").exists()


def test_the_shipped_policy_is_the_default_recipes_complete_and_small():
    """Changing DEFAULT_RECIPE (or the versions its digest covers) fails here until the policy is retrained
    and shipped again (docs/experiments.md)."""
    assert asset_problem(SHIPPED_POLICY) is None
    info = json.loads((SHIPPED_POLICY / "policy.json").read_text())
    assert info["digest"] == DEFAULT_RECIPE.digest() and info["recipe"] == dataclasses.asdict(DEFAULT_RECIPE)
    assert sum(p.stat().st_size for p in SHIPPED_POLICY.iterdir()) <= 10 * 2**20
    weights = load_file(SHIPPED_POLICY / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert sum(t.numel() for t in weights.values()) == info["parameters"]
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_POLICY))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_every_shipped_policy_file_is_package_data():
    """The wheel carries what setuptools' package-data globs match (relative to the package directory)."""
    package = Path(policy.__file__).resolve().parents[1]  # verl_anchor/, whose package data the globs name
    globs = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "verl_anchor"
    ]
    for path in SHIPPED_POLICY.iterdir():
        assert any(fnmatch(path.relative_to(package).as_posix(), g) for g in globs), path


@pytest.mark.parametrize("damage", ["weights cut short", "another recipe"])
def test_a_damaged_or_outdated_shipped_policy_is_refused(tmp_path, monkeypatch, damage):
    shipped = tmp_path / "countdown-policy"
    shutil.copytree(SHIPPED_POLICY, shipped)
    monkeypatch.setattr(policy, "SHIPPED_POLICY", shipped)
    monkeypatch.setattr(policy, "train_policy", lambda *a, **k: pytest.fail("trained instead of refusing"))
    if damage == "weights cut short":
        (shipped / "model.safetensors").write_bytes((shipped / "model.safetensors").read_bytes()[:1000])
        words = "model.safetensors does not match its sha256"
    else:
        monkeypatch.setattr(policy, "DEFAULT_RECIPE", dataclasses.replace(DEFAULT_RECIPE, steps=701))
        words = f"DEFAULT_RECIPE is {policy.DEFAULT_RECIPE.digest()}"
    with pytest.raises(policy.PolicyError) as err:
        policy.ensure_policy(recipe=policy.DEFAULT_RECIPE)
    assert words in str(err.value) and "verl-anchor policy --train --out DIR" in str(err.value)


def test_policy_command_prints_the_shipped_policy(capsys):
    assert main(["policy"]) == 0
    out = capsys.readouterr().out
    accuracy = json.loads((SHIPPED_POLICY / "policy.json").read_text())["heldout_accuracy"]
    assert str(SHIPPED_POLICY) in out and f"{accuracy['greedy']:.1%} greedy" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--train"], "--train and --out go together"),
        (["--out", "{tmp}/x"], "--train and --out go together"),
        (["--train", "--evaluate", "--out", "{tmp}/x"], "give one"),
        (["--train", "--out", "{tmp}"], "is not empty"),
    ],
)
def test_policy_command_refuses_bad_options_in_one_line(tmp_path, capsys, monkeypatch, argv, words):
    (tmp_path / "something").write_text("")
    monkeypatch.setattr(policy, "train_policy", lambda *a, **k: pytest.fail("started training"))
    assert main(["policy", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


# The held-out accuracy the training command reached (sampled at T = 1 / greedy, in %): 11.7 / 26.6 on the
# earlier dev machine, 23.0 / 38.3 on a fresh clone elsewhere and again on the machine that built the
# shipped policy (its policy.json). The spread is ~11.5 points on each; a retraining must land within BAND
# of the shipped numbers (wide enough for that spread, narrow enough that a broken recipe, ~0-5%, fails).
BAND = 0.15


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_training_command_reaches_the_shipped_policys_accuracy(tmp_path, capsys):
    assert main(["policy", "--train", "--out", str(tmp_path / "policy")]) == 0
    trained = json.loads((tmp_path / "policy" / "policy.json").read_text())
    shipped = json.loads((SHIPPED_POLICY / "policy.json").read_text())
    assert trained["digest"] == shipped["digest"] and asset_problem(tmp_path / "policy") is None
    for key in ("greedy", "sampled_t1"):
        assert abs(trained["heldout_accuracy"][key] - shipped["heldout_accuracy"][key]) <= BAND, (trained, shipped)
    assert trained["heldout_accuracy"]["greedy"] >= 0.15, trained  # and not a broken recipe near 0
    assert "ship it by replacing" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_shipped_policys_recorded_accuracy_is_what_evaluate_measures(capsys):
    """Within 2 of 256 problems: the same weights, evaluated on another machine's float arithmetic."""
    assert main(["policy", "--evaluate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    recorded = next(line for line in lines if line.startswith("recorded:"))
    measured = next(line for line in lines if line.startswith("measured:"))
    numbers = [[float(x) for x in re.findall(r"([\d.]+)% ", line)] for line in (recorded, measured)]
    assert len(numbers[0]) == 2 and all(abs(a - b) <= 100 * 2 / 256 for a, b in zip(*numbers)), (recorded, measured)
