"""`verl-anchor data NAME --out DIR`: write a dataset as verl parquet (``train.parquet`` / ``test.parquet``).

Every row has verl's schema (``RLHFDataset`` reads it; ``data.prompt_key=prompt``,
``data.reward_fn_key=data_source``)::

    data_source   string                     selects the reward (verl_anchor.rewards.compute_score)
    prompt        list<struct<role, content>>  one user message; verl applies the chat template
    ability       string                     "math"
    reward_model  struct<style="rule", ground_truth>
    extra_info    struct<split, index, ...>

Datasets and ``data_source`` routing:

- ``countdown``: generated here, reproducibly from ``--seed``: 3-4 numbers in 1..100 and a
  target in 1..``--max-target`` built from them with + - * / (every intermediate value a
  positive integer, as in the Countdown game); the witness expression is kept in
  ``extra_info``. Test problems are drawn first from their own seeded stream, so the test set
  does not depend on ``--train-size``; train skips every (numbers, target) already drawn, so
  the splits are disjoint and duplicate-free. ``data_source="countdown"``, ground truth
  ``{"target": int, "numbers": [int, ...]}``, scored 1.0 / 0.1 / 0.0 on the last ``<answer>``.
- Math sets (table :data:`DATASETS`): the question plus the paper's instruction
  "Please reason step by step, and put your final answer within \\boxed{}.", ground truth a
  string, ``data_source="verl_anchor/<name>"`` (e.g. ``verl_anchor/gsm8k``), which
  ``verl_anchor.rewards`` scores with math-verify on the last ``\\boxed{}``. Not
  ``openai/gsm8k`` (verl would look for ``#### 72``) nor ``aime*`` / ``math_dapo`` (verl's
  exact-string ``Answer:`` / ``\\boxed{}`` check with -1/1 scores). Loaded with
  ``datasets.load_dataset`` from the hub, or offline from ``--from PATH``: a
  parquet/json/jsonl/csv file, a directory of such files (``train*`` / ``test*`` files pick
  the split; in a hub snapshot, only the dataset's config folder), or a ``save_to_disk``
  directory.

All math sets share one schema (``extra_info`` = split, index, question, answer, and ``raw``:
the whole input row as JSON), so several of them can be given to verl together (verl
concatenates its data files, which needs identical features). Rows with the same question and
answer are written once (DAPO-Math-17k ships each problem many times); the summary line says
how many rows were read, dropped as duplicates and written, and the written parquet is read
back to check the count. A missing or malformed field stops with an error that names the
dataset, the row (and file line) and the field.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from verl_anchor.rewards import COUNTDOWN_SOURCE, MATH_SOURCE_PREFIX
from verl_anchor.rewards.boxed_math import last_boxed

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
MAX_NUMBER = 100  # countdown numbers are drawn from 1..MAX_NUMBER
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")

# DAPO-Math-17k ships verl-ready prompts asking for "Answer: ..."; the problem is stripped out of them.
_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
MATH_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", _MESSAGES),
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
_COUNTDOWN_TRUTH = pa.struct([("target", pa.int64()), ("numbers", pa.list_(pa.int64()))])
COUNTDOWN_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", _MESSAGES),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", _COUNTDOWN_TRUTH)])),
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


class DataError(ValueError):
    """Missing or malformed input; the message names the dataset, row and field."""


# ---------------------------------------------------------------------------------------------
# Hub datasets


@dataclass(frozen=True)
class HubDataset:
    """Where a math set lives and which fields hold its question and answer (first present wins)."""

    hub_id: str
    config: str | None
    splits: Mapping[str, str]  # our split (train/test) -> hub split
    question_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]  # dotted paths allowed; "solution" means: its last \boxed{}


_QUESTION_FIELDS = ("problem", "question", "Problem", "Question", "prompt")
_ANSWER_FIELDS = ("answer", "final_answer", "Answer", "reward_model.ground_truth", "solution")

DATASETS: dict[str, HubDataset] = {
    "gsm8k": HubDataset("openai/gsm8k", "main", {"train": "train", "test": "test"}, _QUESTION_FIELDS, _ANSWER_FIELDS),
    "dapo-math-17k": HubDataset(
        "BytedTsinghua-SIA/DAPO-Math-17k",
        None,
        {"train": "train"},
        ("prompt", "problem", "question"),
        ("reward_model.ground_truth", "answer", "solution"),
    ),
    "aime24": HubDataset("HuggingFaceH4/aime_2024", None, {"test": "train"}, _QUESTION_FIELDS, _ANSWER_FIELDS),
    "aime25": HubDataset("yentinglin/aime_2025", None, {"test": "train"}, _QUESTION_FIELDS, _ANSWER_FIELDS),
    "amc23": HubDataset("zwhe99/amc23", None, {"test": "test"}, _QUESTION_FIELDS, _ANSWER_FIELDS),
    "math500": HubDataset("HuggingFaceH4/MATH-500", None, {"test": "test"}, _QUESTION_FIELDS, _ANSWER_FIELDS),
    "olympiadbench": HubDataset(
        "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", {"test": "train"}, _QUESTION_FIELDS, _ANSWER_FIELDS
    ),
}


def math_prompt(question: str) -> list[dict[str, str]]:
    """The chat prompt for a math question (the paper's boxed-answer instruction)."""
    return [{"role": "user", "content": question + MATH_INSTRUCTION}]


def _lookup(row: Mapping[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):  # pandas/csv missing value
        return True
    return isinstance(value, str | list | tuple) and len(value) == 0


def _question_text(value: Any) -> str:
    """Question text from a string or a chat-message list (the last user message)."""
    if hasattr(value, "tolist"):  # numpy array from parquet
        value = value.tolist()
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, Mapping) and m.get("role", "user") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError("is a list but not a chat-message list with a user message")
        value = users[-1]
    if not isinstance(value, str):
        raise ValueError(f"has type {type(value).__name__}, expected text")
    text = value.removeprefix(_DAPO_PREFIX).removesuffix(_DAPO_SUFFIX).strip()
    if not text:
        raise ValueError("is empty")
    return text


def _answer_text(field: str, value: Any) -> str:
    """Ground-truth answer text from a field's value (see the rules in docs/data-and-rewards.md)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):  # e.g. OlympiadBench final_answer: ["$\\frac{1}{2}$"]
        return ", ".join(_answer_text(field, item) for item in value)
    if isinstance(value, bool):
        raise ValueError("is a boolean, expected text or a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise ValueError(f"has type {type(value).__name__}, expected text or a number")
    text = value.strip()
    if "####" in text:  # GSM8K: "<reasoning> #### 1,234"
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif field.rsplit(".", 1)[-1] == "solution":
        boxed = last_boxed(text)
        if boxed is None:
            raise ValueError("has no \\boxed{} answer")
        text = boxed.strip()
    text = text.strip("$").strip()
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():  # "142.0" read from a float column as text
        text = text[:-2]
    if not text:
        raise ValueError("is empty")
    return text


def _field(
    row: Mapping[str, Any], fields: Sequence[str], what: str, where: str, convert: Callable[[str, Any], str]
) -> tuple[str, str]:
    """(field name, converted value) of the first present field; DataError naming row and field otherwise."""
    for name in fields:
        value = _lookup(row, name)
        if _is_empty(value):
            continue
        try:
            return name, convert(name, value)
        except ValueError as exc:
            raise DataError(f"{where}: field {name!r} ({what}) {exc}") from None
    raise DataError(f"{where}: no {what} field (looked for {', '.join(fields)}); the row has fields {sorted(row)}")


def _question_and_answer(name: str, raw: Mapping[str, Any], where: str) -> tuple[str, str, str]:
    """(question, ground-truth answer, name of the answer field) of one input row."""
    spec = DATASETS[name]
    _, question = _field(raw, spec.question_fields, "question", where, lambda _f, v: _question_text(v))
    answer_field, answer = _field(raw, spec.answer_fields, "answer", where, _answer_text)
    return question, answer, answer_field


def _math_row(
    name: str, split: str, index: int, raw: Mapping[str, Any], question: str, answer: str, answer_field: str
) -> dict[str, Any]:
    raw_answer = _lookup(raw, answer_field)
    return {
        "data_source": MATH_SOURCE_PREFIX + name,
        "prompt": math_prompt(question),
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {
            "split": split,
            "index": index,
            "question": question,
            "answer": raw_answer if isinstance(raw_answer, str) else json.dumps(raw_answer, default=_jsonable),
            "raw": json.dumps(raw, default=_jsonable, ensure_ascii=False),
        },
    }


def _jsonable(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


# ---------------------------------------------------------------------------------------------
# Reading inputs: each yields (row, "where" for error messages)


def _read_file(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)  # streamed: DAPO-Math-17k has ~1.8M rows
        for i, row in enumerate(row for batch in batches for row in batch.to_pylist()):
            yield row, f"{path.name} row {i}"
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                yield row, f"{path.name} line {i + 2}"
    elif suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON Lines (HF often names those .json too)
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if isinstance(data, list):
            for i, row in enumerate(data):
                yield _as_row(row, f"{path.name} item {i}"), f"{path.name} item {i}"
            return
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            yield _as_row(row, where), where
    else:
        raise DataError(f"{path}: unsupported file type (use {', '.join(_DATA_SUFFIXES)})")


def _as_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES)


def _local_source(name: str, split: str, path: Path, single_split: bool) -> tuple[list[Path] | Any, str]:
    """Files (or a loaded ``datasets.Dataset``) holding ``split`` of ``name`` under ``path``, and a label."""
    hub_split = DATASETS[name].splits[split]
    if not path.exists():
        raise DataError(f"{name}: --from {path} does not exist")
    if path.is_file():
        if not single_split:
            splits = ", ".join(DATASETS[name].splits)
            raise DataError(f"{name} has splits {splits}: pass --split to say which one {path} holds")
        return [path], str(path)
    if _is_saved_dataset(path):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            for key in (hub_split, split):
                if key in loaded:
                    return loaded[key], f"{path}[{key}]"
            raise DataError(f"{name}: {path} has splits {sorted(loaded)}, none named {hub_split!r} or {split!r}")
        if not single_split:
            raise DataError(f"{name}: {path} holds a single split: pass --split to say which one")
        return loaded, str(path)
    files = _data_files(path)
    config = DATASETS[name].config
    # A hub snapshot holds every config (gsm8k: main/ and socratic/); keep the one we want.
    if config and any(config.lower() in str(p.relative_to(path)).lower() for p in files):
        files = [p for p in files if config.lower() in str(p.relative_to(path)).lower()]
    for key in (hub_split, split):
        chosen = [p for p in files if p.name.lower().startswith(key)]
        if chosen:
            return chosen, f"{path} ({', '.join(p.name for p in chosen)})"
    if single_split and files:
        return files, f"{path} ({len(files)} files)"
    raise DataError(
        f"{name}: no {split!r} data under {path} "
        f"(expected files named {hub_split}* or {split}* ending in {', '.join(_DATA_SUFFIXES)})"
    )


def _iter_source(source: list[Path] | Any) -> tuple[Iterator[tuple[dict[str, Any], str]], int | None]:
    if isinstance(source, list):
        # Each file's rows; the total is known only for parquet without reading it.
        all_parquet = all(p.suffix == ".parquet" for p in source)
        total = sum(pq.read_metadata(p).num_rows for p in source) if all_parquet else None
        return (item for p in source for item in _read_file(p)), total
    return ((row, f"row {i}") for i, row in enumerate(source)), len(source)


def _hub_source(name: str, split: str) -> Any:
    import datasets

    spec = DATASETS[name]
    try:
        return datasets.load_dataset(spec.hub_id, spec.config, split=spec.splits[split])
    except Exception as exc:  # noqa: BLE001  (offline, gated, renamed: all end the same way)
        raise DataError(
            f"{name}: could not load {spec.hub_id} (config {spec.config}, split {spec.splits[split]}) from the hub: "
            f"{type(exc).__name__}: {exc}. Offline, download it elsewhere and pass --from PATH."
        ) from None


def prepare_math(name: str, out_dir: Path, from_path: Path | None = None, split: str | None = None) -> dict[str, Path]:
    """Write ``{split}.parquet`` for each split of math set ``name``; returns split -> path."""
    spec = DATASETS[name]
    if split is not None and split not in spec.splits:
        raise DataError(f"{name} has no {split!r} split (it has {', '.join(spec.splits)})")
    splits = [split] if split else list(spec.splits)
    written = {}
    for out_split in splits:
        if from_path is None:
            source, label = _hub_source(name, out_split), spec.hub_id
        else:
            source, label = _local_source(name, out_split, from_path, single_split=len(splits) == 1)
        rows_in, total = _iter_source(source)
        rows, seen, n_read = [], set(), 0
        for raw, where in tqdm(rows_in, total=total, desc=f"{name} {out_split}", unit="row", disable=None):
            question, answer, answer_field = _question_and_answer(name, raw, f"{name} {out_split}: {where}")
            n_read += 1
            if (question, answer) not in seen:
                seen.add((question, answer))
                rows.append(_math_row(name, out_split, len(rows), raw, question, answer, answer_field))
        if not rows:
            raise DataError(f"{name} {out_split}: {label} has no rows")
        path = out_dir / f"{out_split}.parquet"
        write_parquet(rows, MATH_SCHEMA, path)
        print(
            f"{name} {out_split}: read {n_read} rows from {label}, "
            f"dropped {n_read - len(rows)} duplicates, wrote {len(rows)} to {path}"
        )
        written[out_split] = path
    return written


# ---------------------------------------------------------------------------------------------
# Countdown


@dataclass(frozen=True)
class CountdownProblem:
    """Numbers, a target reachable from them, and one expression (the witness) that reaches it."""

    numbers: tuple[int, ...]
    target: int
    witness: str

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for de-duplication: the numbers as a multiset and the target."""
        return tuple(sorted(self.numbers)), self.target


def _random_problem(rng: random.Random, count: int, max_target: int) -> CountdownProblem | None:
    """Combine random pairs of ``count`` random numbers with random valid operations until one value is left."""
    numbers = [rng.randint(1, MAX_NUMBER) for _ in range(count)]
    pool = [(n, str(n)) for n in numbers]
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (a, left), (b, right) = pool[i], pool[j]
        # Countdown-game rules: every intermediate value is a positive integer.
        options = [(a + b, f"{left} + {right}"), (a * b, f"{left} * {right}")]
        if a > b:
            options.append((a - b, f"{left} - {right}"))
        if b > 1 and a % b == 0:
            options.append((a // b, f"{left} / {right}"))
        value, text = rng.choice(options)
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({text})")]
    target, witness = pool[0]
    if target > max_target:
        return None
    return CountdownProblem(tuple(numbers), target, witness[1:-1] if len(numbers) > 1 else witness)


def _draw_unique(
    rng: random.Random, count: int, seen: set, min_numbers: int, max_numbers: int, max_target: int, bar: tqdm
) -> list[CountdownProblem]:
    problems: list[CountdownProblem] = []
    misses = 0  # attempts since the last new problem; many in a row means the space is exhausted
    while len(problems) < count:
        # The size is drawn first and kept until a target fits, so sizes stay uniform although
        # larger sets overshoot max_target more often.
        size = rng.randint(min_numbers, max_numbers)
        problem = None
        while problem is None:
            misses += 1
            if misses > 100_000:
                raise DataError(
                    f"countdown: could not draw {count} distinct problems with {min_numbers}-{max_numbers} numbers "
                    f"and targets <= {max_target}; ask for fewer or widen the ranges"
                )
            problem = _random_problem(rng, size, max_target)
        if problem.key in seen:
            continue
        seen.add(problem.key)
        problems.append(problem)
        misses = 0
        bar.update()
    return problems


def generate_countdown(
    train_size: int,
    test_size: int,
    seed: int = 0,
    min_numbers: int = 3,
    max_numbers: int = 4,
    max_target: int = 1000,
) -> tuple[list[CountdownProblem], list[CountdownProblem]]:
    """(train, test) Countdown problems: reproducible from ``seed``, distinct, and disjoint across splits."""
    if not 2 <= min_numbers <= max_numbers:
        raise ValueError(f"need 2 <= min_numbers <= max_numbers, got {min_numbers}, {max_numbers}")
    if max_target < 1 or train_size < 0 or test_size < 0:
        raise ValueError(f"max_target must be >= 1 and sizes >= 0, got {max_target}, {train_size}, {test_size}")
    seen: set = set()
    with tqdm(total=train_size + test_size, desc="countdown", unit="problem", disable=None) as bar:
        # String seeds are hashed with SHA-512 by `random`, so the streams are the same on every run.
        ranges = (min_numbers, max_numbers, max_target)
        test = _draw_unique(random.Random(f"countdown-test-{seed}"), test_size, seen, *ranges, bar)
        train = _draw_unique(random.Random(f"countdown-train-{seed}"), train_size, seen, *ranges, bar)
    return train, test


def countdown_prompt(numbers: Sequence[int], target: int) -> list[dict[str, str]]:
    """TinyZero's Countdown instruction as a chat prompt."""
    content = (
        f"Using the numbers {list(numbers)}, create an equation that equals {target}. "
        "You can use basic arithmetic operations (+, -, *, /) and each number must be used exactly once. "
        "Think step by step, then give the final equation in <answer> </answer> tags, "
        "for example <answer> (1 + 2) / 3 </answer>."
    )
    return [{"role": "user", "content": content}]


def countdown_rows(problems: Iterable[CountdownProblem], split: str) -> list[dict[str, Any]]:
    """verl rows for Countdown problems."""
    rows = []
    for index, p in enumerate(problems):
        numbers = list(p.numbers)
        rows.append(
            {
                "data_source": COUNTDOWN_SOURCE,
                "prompt": countdown_prompt(numbers, p.target),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": {"target": p.target, "numbers": numbers}},
                "extra_info": {
                    "split": split,
                    "index": index,
                    "target": p.target,
                    "numbers": numbers,
                    "witness": p.witness,
                },
            }
        )
    return rows


def prepare_countdown(out_dir: Path, train_size: int, test_size: int, seed: int = 0, **ranges: int) -> dict[str, Path]:
    """Write Countdown ``train.parquet`` / ``test.parquet`` (a split of size 0 is not written)."""
    train, test = generate_countdown(train_size, test_size, seed, **ranges)
    written = {}
    for split, problems in (("train", train), ("test", test)):
        if problems:
            path = out_dir / f"{split}.parquet"
            write_parquet(countdown_rows(problems, split), COUNTDOWN_SCHEMA, path)
            print(f"countdown {split}: wrote {len(problems)} problems to {path}")
            written[split] = path
    return written


# ---------------------------------------------------------------------------------------------
# Output


def write_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write ``rows`` with ``schema`` atomically, then check the file holds exactly ``len(rows)`` rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    found = pq.read_metadata(tmp).num_rows
    if found != len(rows):
        tmp.unlink()
        raise DataError(f"{path}: wrote {len(rows)} rows but the file holds {found}")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `verl-anchor data`."""
    parser.add_argument("name", choices=["countdown", *DATASETS], help="dataset to prepare")
    parser.add_argument("--out", type=Path, required=True, help="output directory for train.parquet / test.parquet")
    parser.add_argument(
        "--from",
        dest="from_path",
        type=Path,
        help="read a math set from this parquet/json/jsonl/csv file or directory (default: the Hugging Face hub)",
    )
    parser.add_argument(
        "--split", choices=["train", "test"], help="prepare only this split (needed for gsm8k --from a single file)"
    )
    group = parser.add_argument_group("countdown")
    group.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    group.add_argument("--train-size", type=int, default=20_000, help="train problems (default 20000)")
    group.add_argument("--test-size", type=int, default=512, help="test problems (default 512)")
    group.add_argument("--min-numbers", type=int, default=3, help="fewest numbers per problem (default 3)")
    group.add_argument("--max-numbers", type=int, default=4, help="most numbers per problem (default 4)")
    group.add_argument("--max-target", type=int, default=1000, help="largest target (default 1000)")


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset; 0 on success, 2 (with a one-line error) on bad input."""
    try:
        if args.name == "countdown":
            if args.from_path is not None:
                raise DataError("countdown is generated locally; --from does not apply")
            train_size = 0 if args.split == "test" else args.train_size
            test_size = 0 if args.split == "train" else args.test_size
            prepare_countdown(
                args.out,
                train_size,
                test_size,
                seed=args.seed,
                min_numbers=args.min_numbers,
                max_numbers=args.max_numbers,
                max_target=args.max_target,
            )
        else:
            prepare_math(args.name, args.out, args.from_path, args.split)
    except ValueError as exc:  # DataError included
        print(f"verl-anchor data: error: {exc}", file=sys.stderr)
        return 2
    return 0
