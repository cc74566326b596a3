"""Math sets (table `DATASETS`) from the hub or offline files, as verl parquet.

Each row: the question plus the paper's instruction "Please reason step by step, and put your
final answer within \\boxed{}.", ground truth a string, ``data_source="verl_anchor/<name>"``
(e.g. ``verl_anchor/gsm8k``), which ``verl_anchor.rewards`` scores with math-verify on the last
``\\boxed{}``. Not ``openai/gsm8k`` (verl would look for ``#### 72``) nor ``aime*`` /
``math_dapo`` (verl's exact-string ``Answer:`` / ``\\boxed{}`` check with -1/1 scores).
Loaded with ``datasets.load_dataset`` from the hub, or offline (see `verl_anchor.data.readers`).

All math sets share one schema (``extra_info`` = split, index, question, answer, and ``raw``:
the whole input row as JSON), so several of them can be given to verl together (verl
concatenates its data files, which needs identical features). Rows with the same question and
answer are written once (DAPO-Math-17k ships each problem many times); the summary line says
how many rows were read, dropped as duplicates and written. A missing or malformed field stops
with an error that names the dataset, the row (and file line) and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from verl_anchor.data.readers import iter_source, local_source
from verl_anchor.data.schema import MESSAGES, DataError, write_parquet
from verl_anchor.rewards import MATH_SOURCE_PREFIX
from verl_anchor.rewards.boxed_math import last_boxed

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."

# DAPO-Math-17k ships verl-ready prompts asking for "Answer: ..."; the problem is stripped out of them.
_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

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


class HubUnavailable(DataError):
    """A math set could not be loaded from the hub (offline, gated, renamed); the caller says how to go offline."""


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


def _hub_source(name: str, split: str) -> Any:
    import datasets

    spec = DATASETS[name]
    try:
        return datasets.load_dataset(spec.hub_id, spec.config, split=spec.splits[split])
    except Exception as exc:  # noqa: BLE001  (offline, gated, renamed: all end the same way)
        raise HubUnavailable(
            f"{name}: could not load {spec.hub_id} (config {spec.config}, split {spec.splits[split]}) from the hub: "
            f"{type(exc).__name__}: {exc}"
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
            source, label = local_source(name, spec, out_split, from_path, single_split=len(splits) == 1)
        rows_in, total = iter_source(source)
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
