"""`verl-anchor perturb` (Table 1): content words, Jaccard, position choice, the summary, and the
command on the demo model, whose reference continuations must reproduce the greedy response."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from verl_anchor.analysis.common import demo_prompts
from verl_anchor.analysis.perturb import content_words, fai_positions, jaccard, summarise
from verl_anchor.cli import main


def test_content_words_drop_function_words_and_keep_numbers():
    assert content_words("The answer is 42, so 3.5 apples! Then THE apples are left.") == {
        "answer",
        "42",
        "3.5",
        "apples",
        "left",
    }
    assert content_words("") == set() and content_words("is the of") == set()


def test_jaccard():
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard({"a"}, {"a"}) == 1.0 and jaccard(set(), set()) == 1.0 and jaccard({"a"}, set()) == 0.0


def test_fai_positions_high_low_disjoint_and_eligible():
    fai = torch.tensor([0.1, 0.9, math.nan, 0.5, 0.3, 0.8, 0.2])
    # min_future = 2: positions 0..4 have two tokens after them; 2 is undefined.
    assert fai_positions(fai, 2, 1) == ([1], [0])
    assert fai_positions(fai, 2, 3) == ([1, 3], [4, 0])  # 4 eligible: two each
    assert fai_positions(fai, 0, 2) == ([1, 5], [6, 0])
    assert fai_positions(fai, 7, 2) == ([], [])
    assert fai_positions(torch.tensor([0.5, 0.5, 0.5, 0.5]), 0, 1) == ([0], [3])  # ties keep position order


def test_summarise():
    problems = [
        {"jaccard_high": 0.2, "jaccard_low": 0.6},
        {"jaccard_high": 0.5, "jaccard_low": 0.4},
        {"jaccard_high": None, "jaccard_low": None},
    ]
    s = summarise(problems)
    assert (s["problems"], s["problems_used"]) == (3, 2)
    assert s["jaccard_high"] == pytest.approx(0.35) and s["jaccard_low"] == pytest.approx(0.5)
    assert s["share_high_below_low"] == 0.5
    assert summarise([])["jaccard_high"] is None


def test_demo_command_greedy_references_reproduce_the_response(tmp_path, capsys):
    continuation = 6
    argv = [
        "perturb",
        "--demo",
        "--out",
        str(tmp_path),
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
        "--positions",
        "2",
        "--candidates",
        "2",
        "--continuation-tokens",
        str(continuation),
    ]
    assert main(argv) == 0
    assert "share of problems where high < low" in capsys.readouterr().out
    data = json.loads((tmp_path / "perturb.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    assert data["temperature"] == 0.0
    # The same greedy responses and their FAI, from the analyze command.
    assert (
        main(["analyze", "--demo", "--out", str(tmp_path / "a"), "--temperature", "0", "--max-new-tokens", "40"]) == 0
    )
    responses = {p["index"]: p for p in json.loads((tmp_path / "a" / "metrics.json").read_text())["prompts"]}
    assert len(data["problems"]) == len(demo_prompts())
    for problem in data["problems"]:
        response = responses[problem["index"]]
        n = len(response["token_ids"])
        fai = response["fai"]
        high, low = problem["high_positions"], problem["low_positions"]
        assert len(high) == len(low) == 2 and not set(high) & set(low)
        assert min(fai[t] for t in high) >= max(fai[t] for t in low)
        assert all(t < n - 10 for t in high + low)
        assert len(problem["trials"]) == 2 * 2 * 2
        for trial in problem["trials"]:
            t = trial["position"]
            assert trial["token_id"] == response["token_ids"][t] != trial["forced_id"]
            # Greedy from the response's own prefix and token: the response's next tokens again.
            expected = tokenizer.decode(response["token_ids"][t + 1 : t + 1 + continuation], skip_special_tokens=True)
            assert trial["reference"] == expected
            assert trial["jaccard"] == jaccard(content_words(trial["reference"]), content_words(trial["continuation"]))
        for group in ("high", "low"):
            values = [tr["jaccard"] for tr in problem["trials"] if tr["group"] == group]
            assert problem[f"jaccard_{group}"] == pytest.approx(sum(values) / len(values))
    assert data["summary"]["problems_used"] == len(demo_prompts())
