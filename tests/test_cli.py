"""Every `verl-anchor` input error is one `error:` line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_anchor import cli
from verl_anchor.analysis import common

REPO = Path(__file__).resolve().parents[1]


def assert_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """``verl-anchor argv`` exits 2 with exactly one stderr line, ``error: ...`` containing ``fragments``."""
    capsys.readouterr()  # drop what the test's own set-up printed
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The command line itself


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error([], capsys, "COMMAND")
    assert_usage_error(["nosuch"], capsys, "invalid choice")
    assert_usage_error(["data", "countdown"], capsys, "--out")
    assert_usage_error(["data", "countdown", "--out", "x", "--max-target", "many"], capsys, "--max-target")
    assert_usage_error(["data", "countdown", "--out", "x", "--bogus"], capsys, "unrecognized arguments: --bogus")


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from verl_anchor.commands import data as data_cli

    def broken(args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(data_cli, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["data", "countdown", "--out", str(tmp_path)])


def test_subprocess_prints_one_error_line_and_exits_2(tmp_path: Path) -> None:
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "verl_anchor.cli", "data", "countdown", "--out", str(existing)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: argument --out: {existing} is an existing file, not a directory (see verl-anchor data --help)"
    ]


# ---------------------------------------------------------------------------------------------
# Paths and seeds


def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None) -> None:
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    for command in (
        ["data", "countdown"],
        ["analyze", "--demo"],
        ["coupling", "--demo"],
        ["perturb", "--demo"],
        ["demo"],
    ):
        assert_usage_error([*command, "--out", str(existing)], capsys, "--out", "is an existing file")
    assert_usage_error(["data", "countdown", "--out", str(existing / "sub")], capsys, f"is inside {existing}")


def test_model_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None) -> None:
    out = str(tmp_path / "out")
    assert_usage_error(["analyze", "--model", str(tmp_path / "missing"), "--out", out], capsys, "does not exist")
    (tmp_path / "no_config").mkdir()
    assert_usage_error(["coupling", "--model", str(tmp_path / "no_config"), "--out", out], capsys, "no config.json")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    assert_usage_error(["perturb", "--model", str(tmp_path / "weights.bin"), "--out", out], capsys, "is a file")


def test_model_that_does_not_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    assert_usage_error(
        ["analyze", "--model", str(model), "--out", str(tmp_path / "out")], capsys, f"cannot load --model {model}"
    )


@pytest.mark.parametrize("command", [["data", "countdown"], ["analyze", "--demo"]])
@pytest.mark.parametrize("value", [str(2**64), str(2**63), "-1", "1.5"])
def test_seeds_beyond_64_bits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, command: list[str], value: str
) -> None:
    assert_usage_error([*command, "--out", str(tmp_path), "--seed", value], capsys, "--seed")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Prompt files


@pytest.mark.parametrize("column", [["a string prompt"], [7], [[{"role": "user", "content": 3}]]])
def test_parquet_prompt_column_of_the_wrong_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, column: list
) -> None:
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": column}), path)
    assert_usage_error(
        ["analyze", "--demo", "--prompts", str(path), "--out", str(tmp_path / "o")],
        capsys,
        "row 0",
        "expected a list of chat messages",
    )


def test_missing_prompts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None) -> None:
    for name in ("missing.jsonl", "missing.parquet"):
        assert_usage_error(
            ["analyze", "--demo", "--prompts", str(tmp_path / name), "--out", str(tmp_path / "o")], capsys, name
        )


def test_empty_prompt_without_chat_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_anchor.models.tiny import ensure_tiny_model

    path = ensure_tiny_model(tmp_path / "cache")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = None
    monkeypatch.setattr(common, "load_model", lambda args: (model, tokenizer, "tiny"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Count to three."}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    assert_usage_error(
        ["analyze", "--demo", "--prompts", str(prompts), "--out", str(tmp_path / "o")],
        capsys,
        "prompt 1 is empty",
        "no chat template",
    )


# ---------------------------------------------------------------------------------------------
# data


def test_data_countdown_impossible_or_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "cd")
    assert_usage_error(
        [
            "data",
            "countdown",
            "--out",
            out,
            "--min-numbers",
            "2",
            "--max-numbers",
            "2",
            "--max-number",
            "2",
            "--train-size",
            "20",
            "--test-size",
            "0",
        ],
        capsys,
        "asked for 20 distinct problems, but at most",
    )
    assert_usage_error(
        [
            "data",
            "countdown",
            "--out",
            out,
            "--min-numbers",
            "2",
            "--max-numbers",
            "2",
            "--max-target",
            "3",
            "--train-size",
            "20000",
            "--test-size",
            "0",
        ],
        capsys,
        "at most 15150",
    )
    assert_usage_error(
        ["data", "countdown", "--out", out, "--train-size", "0", "--test-size", "0"], capsys, "nothing to write"
    )
    assert_usage_error(
        ["data", "countdown", "--out", out, "--split", "train", "--train-size", "0"], capsys, "nothing to write"
    )
    assert_usage_error(
        ["data", "countdown", "--out", out, "--min-numbers", "5", "--max-numbers", "3"], capsys, "min_numbers"
    )
    assert not (tmp_path / "cd").exists()


def test_data_math_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    out = str(tmp_path / "o")
    assert_usage_error(["data", "math500", "--out", out], capsys, "could not load", "pass --from PATH")
    assert_usage_error(["data", "gsm8k", "--out", out, "--from", str(tmp_path / "nope")], capsys, "does not exist")


# ---------------------------------------------------------------------------------------------
# train


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VERL_ANCHOR_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_train_unknown_recipe_and_bad_overrides(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(
        ["train", "countdown_qwen3_4", "--dry-run"], capsys, "unknown recipe 'countdown_qwen3_4'", "countdown_qwen3_4b"
    )
    assert_usage_error(["train", "countdown_qwen3_4b", "--dry-run", "no_such_key=1"], capsys, "no_such_key")
    assert_usage_error(["train", "countdown_qwen3_4b", "--dry-run", "=="], capsys, "Error parsing override")
    assert not data_dir.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        # verl's validate_config, as main_ppo runs it
        (
            ["actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.temperature=0"],
            "temperature should be greater than 0",
        ),
        (["+algorithm.anchor.k=-1"], "algorithm.anchor.k=-1"),  # the anchor checks
    ],
)
def test_train_dry_run_validates_before_preparing_data(
    data_dir: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    assert_usage_error(["train", "countdown_qwen3_4b", "--dry-run", *overrides], capsys, "invalid config", message)
    assert not data_dir.exists()


def test_train_offline_math_data_names_the_data_command(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    line = assert_usage_error(
        ["train", "math_qwen3_4b_1k", "--dry-run"],
        capsys,
        f"verl-anchor data dapo-math-17k --from PATH --out {data_dir / 'dapo-math-17k'}",
    )
    assert "pass --from" not in line


# ---------------------------------------------------------------------------------------------
# Review fixes: unreadable files, uncreatable --out, empty paths, odd values


@pytest.fixture
def bad_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "bad" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    return path


def test_unreadable_input_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, bad_utf8: Path
) -> None:
    out = str(tmp_path / "o")
    assert_usage_error(
        ["analyze", "--demo", "--prompts", str(bad_utf8), "--out", out], capsys, str(bad_utf8), "not UTF-8"
    )
    assert_usage_error(
        ["data", "gsm8k", "--from", str(bad_utf8.parent), "--split", "train", "--out", out],
        capsys,
        str(bad_utf8),
        "not UTF-8",
    )
    not_parquet = tmp_path / "notparquet.parquet"
    not_parquet.write_text("hi\n")
    assert_usage_error(
        ["data", "gsm8k", "--from", str(not_parquet), "--split", "train", "--out", out],
        capsys,
        f"cannot read {not_parquet} as parquet",
    )
    bad_csv = tmp_path / "test.csv"
    bad_csv.write_bytes(b"problem,answer\n\xff,1\n")
    assert_usage_error(["data", "math500", "--from", str(bad_csv), "--out", out], capsys, str(bad_csv), "not UTF-8")


@pytest.mark.skipif(not Path("/proc/1").is_dir(), reason="needs Linux /proc")
def test_out_that_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None) -> None:
    # /proc accepts no new directories, whoever asks (root included)
    assert_usage_error(
        ["data", "countdown", "--out", "/proc/1/nope", "--train-size", "3", "--test-size", "2"],
        capsys,
        "cannot create the output directory /proc/1/nope",
    )
    assert_usage_error(
        ["analyze", "--demo", "--out", "/proc/1/nope"], capsys, "cannot create the output directory /proc/1/nope"
    )


def test_empty_paths_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty --out used to mean the current directory
    assert_usage_error(
        ["data", "countdown", "--out", "", "--train-size", "3", "--test-size", "2"], capsys, "argument --out", "empty"
    )
    assert_usage_error(["analyze", "--demo", "--out", " "], capsys, "argument --out", "empty")
    assert_usage_error(["demo", "--out", ""], capsys, "argument --out", "empty")
    assert_usage_error(["analyze", "--demo", "--prompts", "", "--out", "o"], capsys, "argument --prompts", "empty")
    assert_usage_error(["data", "gsm8k", "--from", "", "--out", "o"], capsys, "argument --from", "empty")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("response", [5, ["a"], {"text": "a"}, True])
def test_jsonl_response_must_be_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, response: object
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Count to three."})
        + "\n"
        + json.dumps({"prompt": "Count to four.", "response": response})
        + "\n"
    )
    assert_usage_error(
        ["analyze", "--demo", "--prompts", str(prompts), "--out", str(tmp_path / "o")],
        capsys,
        f"{prompts}:2",
        "`response`",
        "expected a string",
    )


def test_jsonl_null_response_means_generate(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "p", "response": None}) + "\n")
    assert common.load_prompts(prompts) == [{"prompt": "p", "response": None}]


def test_countdown_selected_split_of_size_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "cd")
    line = assert_usage_error(
        ["data", "countdown", "--out", out, "--split", "test", "--test-size", "0", "--train-size", "3"],
        capsys,
        "nothing to write",
        "--split test with --test-size 0",
    )
    assert "both" not in line
    assert not (tmp_path / "cd").exists()


# ---------------------------------------------------------------------------------------------
# Review fixes: demo options are checked before anything is built


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from verl_anchor.commands import demo

    monkeypatch.setattr(demo, "demo_overrides", lambda *args, **kwargs: pytest.fail("the demo started building"))
    monkeypatch.setattr(
        "verl_anchor.models.policy.ensure_policy", lambda *a, **k: pytest.fail("the demo started training")
    )


def test_demo_shows_each_step_with_the_accuracy_of_its_own_rollout_dump(tmp_path: Path, capsys, monkeypatch) -> None:
    """verl dumps a step's rollouts on a background thread, after or before its metrics line: the demo prints
    the step once both are there, the accuracy from this run's dump (a stale file from an earlier run is gone)."""
    from verl_anchor.commands import demo
    from verl_anchor.integration.cpu import launch

    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.json").write_text(
        json.dumps({"parameters": 1e6, "heldout_accuracy": {"greedy": 0.2, "sampled_t1": 0.1}})
    )
    monkeypatch.setattr("verl_anchor.models.policy.ensure_policy", lambda *a, **k: policy)
    monkeypatch.setattr("verl_anchor.models.policy.policy_dir", lambda *a, **k: policy)
    monkeypatch.setattr(demo, "demo_overrides", lambda *a, **k: [])
    monkeypatch.setattr(
        "verl_anchor.integration.compose.check_main_ppo", lambda overrides: None
    )  # [] is not a demo's config
    out = tmp_path / "out"
    stale = out / "rollouts" / "1.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"score": 1.0}\n')

    def fake_run(overrides, workdir, log_path, on_line=None, **kwargs):
        lines = ["(TaskRunner pid=1) step:1 - critic/score/mean:0.25 - anchor/amplified_frac:0.4"]
        (out / "rollouts").mkdir()  # verl makes it; the demo removed the stale one
        (out / "rollouts" / "1.jsonl").write_text(
            "".join(json.dumps({"score": s}) + "\n" for s in (1.0, 0.0, 0.0, 0.0))
        )
        lines.append(f"(TaskRunner pid=1) Dumped generations to {out / 'rollouts' / '1.jsonl'}")
        Path(log_path).write_text("\n".join(lines) + "\n")
        for line in lines:
            on_line(line)
        return 0

    monkeypatch.setattr(launch, "run_main_ppo", fake_run)
    assert cli.main(["demo", "--out", str(out), "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "step 1: reward 0.25, accuracy 0.25" in printed
    assert "amplified share 0.4" in printed


@pytest.mark.parametrize("steps", ["0", "-1", "two", "1.5"])
def test_demo_steps_must_be_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None, steps: str
) -> None:
    assert_usage_error(["demo", "--out", str(tmp_path / "d"), "--steps", steps], capsys, "argument --steps")
    assert not (tmp_path / "d").exists()


def test_demo_unknown_estimator_with_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None
) -> None:
    from verl_anchor.commands.demo import check_estimator

    assert_usage_error(
        ["demo", "--out", str(tmp_path / "d"), "--estimator", "anchor_copuled"],
        capsys,
        "--estimator 'anchor_copuled'",
        "did you mean anchor_coupled?",
        "rloo",
    )
    assert_usage_error(
        ["demo", "--out", str(tmp_path / "d"), "--estimator", "zzz"], capsys, "not an advantage estimator"
    )
    assert not (tmp_path / "d").exists()
    for name in ("anchor_coupled", "anchor_random", "grpo", "gae", "rloo", "reinforce_plus_plus"):
        check_estimator(name)  # accepted


# ---------------------------------------------------------------------------------------------
# Review fixes: train


def test_train_data_dir_that_cannot_be_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setenv("VERL_ANCHOR_DATA", str(a_file))
    assert_usage_error(
        ["train", "countdown_qwen3_4b", "--dry-run"],
        capsys,
        f"cannot create the output directory {a_file / 'countdown'}",
        "VERL_ANCHOR_DATA",
    )
    monkeypatch.setenv("VERL_ANCHOR_DATA", "")  # the recipes would read and write /countdown/...
    assert_usage_error(["train", "countdown_qwen3_4b", "--dry-run"], capsys, "$VERL_ANCHOR_DATA is set but empty")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+algorithm.anchor=5"], "algorithm.anchor=5 must be a mapping"),
        (["+algorithm.anchor.base_estimator=[1]"], "algorithm.anchor.base_estimator=[1] must be an estimator name"),
        (["+algorithm.anchor.k=[1]"], "algorithm.anchor.k"),
        (["data.train_files=5"], "data.train_files=5 must be a path"),
    ],
)
def test_train_values_of_the_wrong_type(
    data_dir: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    assert_usage_error(["train", "countdown_qwen3_4b", "--dry-run", *overrides], capsys, "invalid config", message)
    assert not data_dir.exists()


# ---------------------------------------------------------------------------------------------
# Review fixes: a refusal's stderr is its one error line (no library warnings, logs or bars)


def test_refusals_print_only_the_error_line(tmp_path: Path) -> None:
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    env = {**os.environ, "VERL_ANCHOR_DATA": str(tmp_path / "data")}
    env.pop("PYTHONWARNINGS", None)
    for argv, fragment in [
        # imports verl (accelerator / engine warnings, "Disabled critic ...") before refusing
        (["train", "countdown_qwen3_4b", "--dry-run", "+algorithm.anchor.k=-1"], "algorithm.anchor.k=-1"),
        (["data", "countdown", "--out", str(existing)], "is an existing file"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "verl_anchor.cli", *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
