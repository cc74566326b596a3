"""Data preparation: countdown generator, verl parquet schema, local hub-dataset fixtures, errors, CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_anchor.cli import main as cli_main
from verl_anchor.data import (
    DataError,
    generate_countdown,
    math_sets,
    max_distinct_problems,
    prepare_countdown,
    prepare_math,
)
from verl_anchor.rewards import compute_score
from verl_anchor.rewards.countdown import _value, parse_equation

REPO = Path(__file__).resolve().parents[1]
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


# ---------------------------------------------------------------------------------------------
# Countdown generator


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**9),
    min_numbers=st.integers(2, 4),
    extra=st.integers(0, 2),
    max_target=st.sampled_from([10, 100, 1000]),
)
def test_countdown_witness_reaches_target_with_exactly_the_numbers(
    seed: int, min_numbers: int, extra: int, max_target: int
) -> None:
    max_numbers = min_numbers + extra
    train, test = generate_countdown(20, 5, seed, min_numbers, max_numbers, max_target)
    for p in train + test:
        assert min_numbers <= len(p.numbers) <= max_numbers
        assert all(1 <= n <= 100 for n in p.numbers)
        assert 1 <= p.target <= max_target
        tree, literals, rhs = parse_equation(p.witness)
        assert Counter(literals) == Counter(p.numbers) and rhs is None
        assert _value(tree) == p.target
        truth = {"target": p.target, "numbers": list(p.numbers)}
        assert compute_score("countdown", f"<answer>{p.witness}</answer>", truth) == 1.0


def test_countdown_reproducible_distinct_disjoint_exact_sizes() -> None:
    train, test = generate_countdown(500, 100, seed=7)
    assert len(train) == 500 and len(test) == 100
    assert (train, test) == generate_countdown(500, 100, seed=7)
    assert generate_countdown(500, 100, seed=8) != (train, test)
    train_keys, test_keys = {p.key for p in train}, {p.key for p in test}
    assert len(train_keys) == 500 and len(test_keys) == 100  # no duplicates within a split
    assert not train_keys & test_keys
    # the test set does not depend on the train size
    assert generate_countdown(50, 100, seed=7)[1] == test
    sizes = Counter(len(p.numbers) for p in train)
    assert set(sizes) == {3, 4} and min(sizes.values()) > 200  # both sizes, about evenly


def test_countdown_many_seeds_differ() -> None:
    tests = {tuple(p.key for p in generate_countdown(0, 20, seed=s)[1]) for s in range(20)}
    assert len(tests) == 20


def test_countdown_bad_ranges() -> None:
    with pytest.raises(ValueError, match="min_numbers"):
        generate_countdown(1, 1, min_numbers=4, max_numbers=3)
    with pytest.raises(DataError, match="distinct problems"):
        generate_countdown(5000, 0, min_numbers=2, max_numbers=2, max_target=3)
    with pytest.raises(DataError, match="max_numbers <= 10"):
        generate_countdown(1, 1, min_numbers=3, max_numbers=11)


def test_countdown_more_problems_than_exist_refused_at_once() -> None:
    # Today's main drew until it ran out of memory or patience (10**10 problems) before saying anything.
    assert max_distinct_problems(2, 2, 1000) == math.comb(101, 2) * 4  # pairs, each with at most 4 results
    start = time.perf_counter()
    for sizes, ranges in [((10**10, 0), {}), ((20_000, 201), {"min_numbers": 2, "max_numbers": 2})]:
        with pytest.raises(DataError, match="but at most .* exist"):
            generate_countdown(*sizes, **ranges)
    assert time.perf_counter() - start < 1


def test_countdown_nothing_to_write(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing to write"):
        prepare_countdown(tmp_path / "out", 0, 0)
    assert not (tmp_path / "out").exists()


COUNTDOWN_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", MESSAGES),
        ("ability", pa.string()),
        (
            "reward_model",
            pa.struct(
                [
                    ("style", pa.string()),
                    ("ground_truth", pa.struct([("target", pa.int64()), ("numbers", pa.list_(pa.int64()))])),
                ]
            ),
        ),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("target", pa.int64()),
                    ("numbers", pa.list_(pa.int64())),
                    ("witness", pa.string()),
                ]
            ),
        ),
    ]
)
MATH_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", MESSAGES),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("question", pa.string()),
                    ("answer", pa.string()),
                    ("raw", pa.string()),
                ]
            ),
        ),
    ]
)


def test_countdown_parquet_schema_and_rows(tmp_path: Path) -> None:
    written = prepare_countdown(tmp_path, 30, 8, seed=1)
    assert set(written) == {"train", "test"}
    for split, size in (("train", 30), ("test", 8)):
        table = pq.read_table(tmp_path / f"{split}.parquet")
        assert table.schema.remove_metadata() == COUNTDOWN_SCHEMA
        rows = table.to_pylist()
        assert len(rows) == size
        assert [r["extra_info"]["index"] for r in rows] == list(range(size))
        for r in rows:
            assert r["data_source"] == "countdown" and r["ability"] == "math"
            truth = r["reward_model"]["ground_truth"]
            assert r["reward_model"]["style"] == "rule"
            assert r["extra_info"]["split"] == split
            assert (truth["target"], truth["numbers"]) == (r["extra_info"]["target"], r["extra_info"]["numbers"])
            [message] = r["prompt"]
            assert message["role"] == "user"
            assert f"equals {truth['target']}" in message["content"] and str(truth["numbers"]) in message["content"]
            assert "<answer>" in message["content"]


def test_countdown_number_range_and_short_prompt_through_the_cli(tmp_path: Path) -> None:
    assert (
        cli_main(
            [
                "data",
                "countdown",
                "--out",
                str(tmp_path),
                "--train-size",
                "40",
                "--test-size",
                "4",
                "--min-numbers",
                "3",
                "--max-numbers",
                "3",
                "--max-target",
                "99",
                "--max-number",
                "12",
                "--prompt-style",
                "short",
            ]
        )
        == 0
    )
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    for r in rows:
        truth = r["reward_model"]["ground_truth"]
        assert len(truth["numbers"]) == 3 and max(truth["numbers"]) <= 12 and truth["target"] <= 99
        assert r["prompt"][0]["content"].startswith(f"Make {truth['target']} from {truth['numbers']} with + - * /")
    assert max_distinct_problems(2, 2, 1000, max_number=10) == math.comb(11, 2) * 4
    with pytest.raises(DataError, match="max_number must be >= 1"):
        generate_countdown(1, 1, max_number=0)
    with pytest.raises(DataError, match="unknown prompt style 'long'"):
        prepare_countdown(tmp_path, 2, 0, prompt_style="long")


# ---------------------------------------------------------------------------------------------
# Hub datasets from local fixtures


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM8K_TRAIN = [
    {"question": "Tom has 3 bags of 24 apples. How many apples?", "answer": "3 * 24 = <<3*24=72>>72\n#### 72"},
    {"question": "A shop sells 1,000 pens a day for 2 days. How many pens?", "answer": "2 * 1000 = 2000\n#### 2,000"},
]
GSM8K_TEST = [{"question": "What is 5 - 7?", "answer": "5 - 7 = -2\n#### -2"}]


def read_rows(path: Path) -> list[dict]:
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == MATH_SCHEMA
    return table.to_pylist()


def test_gsm8k_from_directory_with_both_splits(tmp_path: Path) -> None:
    src = tmp_path / "gsm8k"
    write_jsonl(src / "main" / "train-00000-of-00001.jsonl", GSM8K_TRAIN)
    write_jsonl(src / "main" / "test-00000-of-00001.jsonl", GSM8K_TEST)
    # a hub snapshot also holds the "socratic" config: only "main" may be read
    write_jsonl(src / "socratic" / "train-00000-of-00001.jsonl", [{"question": "other", "answer": "#### 1"}])
    written = prepare_math("gsm8k", tmp_path / "out", src)
    assert set(written) == {"train", "test"}
    train, test = read_rows(written["train"]), read_rows(written["test"])
    assert [r["reward_model"]["ground_truth"] for r in train] == ["72", "2000"]
    assert [r["reward_model"]["ground_truth"] for r in test] == ["-2"]
    r = train[0]
    assert r["data_source"] == "verl_anchor/gsm8k" and r["ability"] == "math"
    assert r["prompt"] == [
        {
            "role": "user",
            "content": GSM8K_TRAIN[0]["question"]
            + "\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]
    assert r["extra_info"]["split"] == "train" and r["extra_info"]["index"] == 0
    assert r["extra_info"]["question"] == GSM8K_TRAIN[0]["question"]
    assert r["extra_info"]["answer"] == GSM8K_TRAIN[0]["answer"]
    assert json.loads(r["extra_info"]["raw"]) == GSM8K_TRAIN[0]
    # the written rows route to the math-verify scorer
    assert compute_score(r["data_source"], "so \\boxed{72}", r["reward_model"]["ground_truth"]) == 1.0


def test_gsm8k_single_file_needs_split(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_TEST)
    with pytest.raises(DataError, match="--split"):
        prepare_math("gsm8k", tmp_path / "out", src)
    written = prepare_math("gsm8k", tmp_path / "out", src, split="test")
    assert list(written) == ["test"] and not (tmp_path / "out" / "train.parquet").exists()


def test_math500_from_parquet(tmp_path: Path) -> None:
    rows = [
        {
            "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
            "solution": "... $\\boxed{\\frac{3}{4}}$",
            "answer": "\\frac{3}{4}",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/1.json",
        },
        {
            "problem": "Find $x$ if $2x=10$.",
            "solution": "So $x=\\boxed{5}$.",
            "answer": "5",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/2.json",
        },
    ]
    src = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    written = prepare_math("math500", tmp_path / "out", src)
    out = read_rows(written["test"])
    assert [r["reward_model"]["ground_truth"] for r in out] == ["\\frac{3}{4}", "5"]
    assert out[0]["data_source"] == "verl_anchor/math500"
    assert json.loads(out[0]["extra_info"]["raw"])["unique_id"] == "test/algebra/1.json"


def test_math500_answer_falls_back_to_boxed_solution(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "thus \\boxed{\\{1, 2\\}}."}])
    out = read_rows(prepare_math("math500", tmp_path / "out", src)["test"])
    assert out[0]["reward_model"]["ground_truth"] == "\\{1, 2\\}"


def test_aime24_from_jsonl_and_alternative_fields(tmp_path: Path) -> None:
    rows = [
        {"id": 60, "problem": "Every morning Aya walks...", "solution": "...", "answer": "204", "year": 2024},
        {"id": 61, "Problem": "Let $ABC$ be a triangle...", "Answer": 113},  # alternative field names, numeric answer
        {"id": 62, "question": "Find the number...", "answer": 73.0},  # float answer read from a float column
    ]
    src = write_jsonl(tmp_path / "aime.jsonl", rows)
    out = read_rows(prepare_math("aime24", tmp_path / "out", src)["test"])
    assert [r["reward_model"]["ground_truth"] for r in out] == ["204", "113", "73"]
    questions = ["Every morning Aya walks...", "Let $ABC$ be a triangle...", "Find the number..."]
    assert [r["extra_info"]["question"] for r in out] == questions
    assert all(r["data_source"] == "verl_anchor/aime24" and r["extra_info"]["split"] == "test" for r in out)


def test_olympiadbench_list_answers_and_dapo_template_dedup(tmp_path: Path) -> None:
    olymp_row = {"id": 1, "question": "q", "final_answer": ["$\\frac{1}{2}$"], "is_multiple_answer": False}
    olymp_src = write_jsonl(tmp_path / "ob.jsonl", [olymp_row])
    olymp = read_rows(prepare_math("olympiadbench", tmp_path / "ob", olymp_src)["test"])
    assert olymp[0]["reward_model"]["ground_truth"] == "\\frac{1}{2}"

    problem = "How many positive divisors does 36 have?"
    content = math_sets._DAPO_PREFIX + problem + math_sets._DAPO_SUFFIX
    dapo_row = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": content}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "9", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "a1b2"},
    }
    other = {
        **dapo_row,
        "prompt": [{"role": "user", "content": math_sets._DAPO_PREFIX + "What is 2+2?" + math_sets._DAPO_SUFFIX}],
        "reward_model": {"ground_truth": "4", "style": "rule"},
    }
    src = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist([dapo_row, other, dapo_row, dapo_row]), src)
    out = read_rows(prepare_math("dapo-math-17k", tmp_path / "dapo", src)["train"])
    assert len(out) == 2  # each problem once
    assert out[0]["extra_info"]["question"] == problem
    assert out[0]["prompt"][0]["content"].startswith(problem + "\nPlease reason step by step")
    assert [r["reward_model"]["ground_truth"] for r in out] == ["9", "4"]
    assert [r["extra_info"]["index"] for r in out] == [0, 1]
    assert out[0]["data_source"] == "verl_anchor/dapo-math-17k"


def test_save_to_disk_directory(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}])}
    ).save_to_disk(str(tmp_path / "saved"))
    out = read_rows(prepare_math("aime25", tmp_path / "out", tmp_path / "saved")["test"])  # hub split "train" -> test
    assert [r["reward_model"]["ground_truth"] for r in out] == ["2", "4"]


# ---------------------------------------------------------------------------------------------
# Malformed input


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"problem": "ok", "answer": "1"}, {"problem": "ok2", "answer": "2"}, {"problem": "no answer"}],
            r"line 3: no answer field .*fields \['problem'\]",
        ),
        ([{"problem": "ok", "answer": "1"}, {"problem": "", "answer": "2"}], r"line 2: no question field"),
        ([{"problem": "ok", "answer": {"x": 1}}], r"line 1: field 'answer' \(answer\) has type dict"),
        ([{"problem": ["not", "messages"], "answer": "1"}], r"line 1: field 'problem' \(question\) is a list"),
        ([{"problem": "p", "answer": "  $ $ "}], r"line 1: field 'answer' \(answer\) is empty"),
        ([{"problem": "p", "solution": "no box"}], r"line 1: field 'solution' \(answer\) has no \\boxed"),
    ],
)
def test_malformed_rows_name_row_and_field(tmp_path: Path, rows: list[dict], message: str) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        prepare_math("math500", tmp_path / "out", src)
    assert "math500 test: bad.jsonl" in str(info.value)
    assert not (tmp_path / "out" / "test.parquet").exists()  # nothing half-written


def test_malformed_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text('{"problem": "p", "answer": "1"}\n{"problem": oops}\n')
    with pytest.raises(DataError, match="broken.jsonl line 2: not valid JSON"):
        prepare_math("math500", tmp_path / "out", bad_json)
    with pytest.raises(DataError, match="does not exist"):
        prepare_math("math500", tmp_path / "out", tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no 'test' data"):
        prepare_math("math500", tmp_path / "out", tmp_path / "empty")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        prepare_math("math500", tmp_path / "out", empty)
    with pytest.raises(DataError, match="no 'train' split"):
        prepare_math("math500", tmp_path / "out", empty, split="train")


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    # Today's main raised UnicodeDecodeError / pyarrow's ArrowInvalid with a traceback.
    cases = {
        "train.jsonl": (b'{"question": "\xff", "answer": "1"}\n', "not UTF-8"),
        "train.json": (b'[{"question": "\xff"}]', "not UTF-8"),
        "train.csv": (b"question,answer\n\xff,1\n", "not UTF-8"),
        "train.parquet": (b"PAR1 not really", "as parquet"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"cannot read {re.escape(str(path))}.*{reason}"):
            prepare_math("gsm8k", tmp_path / "out", path, split="train")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "test.parquet").write_bytes(b"not parquet either")
    with pytest.raises(DataError, match="cannot read .*test.parquet as parquet"):
        prepare_math("math500", tmp_path / "out", tmp_path / "dir")
    assert not (tmp_path / "out").exists()


def test_output_directory_that_cannot_be_created(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(
        DataError, match=re.escape(f"cannot create the output directory {a_file / 'sub'}: Not a directory")
    ):
        prepare_countdown(a_file / "sub", 3, 2)
    src = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(DataError, match="cannot create the output directory"):
        prepare_math("math500", a_file / "sub", src)


def test_cli_reports_data_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p"}])
    assert cli_main(["data", "aime24", "--out", str(tmp_path / "o"), "--from", str(src)]) == 2
    assert "bad.jsonl line 1: no answer field" in capsys.readouterr().err
    assert cli_main(["data", "countdown", "--out", str(tmp_path / "o"), "--from", str(src)]) == 2


# ---------------------------------------------------------------------------------------------
# CLI and verl's dataset class


def test_cli_countdown_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "cd"
    result = subprocess.run(
        [sys.executable, "-m", "verl_anchor.cli", "data", "countdown", "--out", str(out)]
        + ["--train-size", "50", "--test-size", "10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert pq.read_metadata(out / "train.parquet").num_rows == 50
    assert pq.read_metadata(out / "test.parquet").num_rows == 10
    assert "wrote 50 problems" in result.stdout


def tiny_chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def test_verl_rlhf_dataset_loads_our_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    prepare_countdown(tmp_path / "cd", 0, 12, seed=3)
    aime = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "1+1?", "answer": "2", "year": 2024}])
    math500_rows = [{"problem": "2+2?", "answer": "4", "level": 1}, {"problem": "3+3?", "answer": "6", "level": 2}]
    math500 = write_jsonl(tmp_path / "m.jsonl", math500_rows)
    prepare_math("aime24", tmp_path / "aime", aime)
    prepare_math("math500", tmp_path / "math500", math500)

    config = OmegaConf.create(
        {
            "max_prompt_length": 512,
            "filter_overlong_prompts": True,  # applies the chat template to every prompt
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(tmp_path / "verl-cache"),
        }
    )
    tokenizer = tiny_chat_tokenizer()
    countdown = RLHFDataset([str(tmp_path / "cd" / "test.parquet")], tokenizer, config)
    assert len(countdown) == 12
    item = countdown[0]
    assert item["data_source"] == "countdown"
    assert item["raw_prompt"][0]["role"] == "user"
    truth = item["reward_model"]["ground_truth"]
    assert isinstance(truth["target"], int) and len(truth["numbers"]) in (3, 4)
    assert compute_score(item["data_source"], f"<answer>{item['extra_info']['witness']}</answer>", truth) == 1.0

    # two evaluation sets in one RLHFDataset: verl concatenates them, which needs identical schemas
    files = [str(tmp_path / "aime" / "test.parquet"), str(tmp_path / "math500" / "test.parquet")]
    both = RLHFDataset(files, tokenizer, config)
    assert [both[i]["data_source"] for i in range(3)] == ["verl_anchor/aime24"] + ["verl_anchor/math500"] * 2
    assert [both[i]["reward_model"]["ground_truth"] for i in range(3)] == ["2", "4", "6"]
