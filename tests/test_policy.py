"""The small Countdown policy: worked solutions, disjoint splits, deterministic SFT, cache by recipe."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from verl_anchor import policy
from verl_anchor.data.countdown import CountdownProblem
from verl_anchor.policy import PolicyRecipe, ensure_policy, policy_splits, train_policy, worked_solution
from verl_anchor.rewards.countdown import score_countdown

# Small enough to train in seconds: the loop, the cache and determinism, not the accuracy.
QUICK = PolicyRecipe(sft_problems=64, heldout_problems=8, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16,
                     intermediate=64, steps=3, batch_size=4, warmup_steps=1)


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
    assert all(len(p.numbers) == 3 and max(p.numbers) <= QUICK.max_number and p.target <= QUICK.max_target
               for p in splits.sft)


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
