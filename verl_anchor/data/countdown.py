"""Countdown problems, generated reproducibly from a seed, as verl parquet.

3-4 numbers in 1..``max_number`` (default 100) and a target in 1..``max_target`` built from them with + - * / (every
intermediate value a positive integer, as in the Countdown game); the witness expression is
kept in ``extra_info``. Test problems are drawn first from their own seeded stream, so the test
set does not depend on the train size; train skips every (numbers, target) already drawn, so
the splits are disjoint and duplicate-free. ``data_source="countdown"``, ground truth
``{"target": int, "numbers": [int, ...]}``, scored 1.0 / 0.1 / 0.0 on the last ``<answer>``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from verl_anchor.data.schema import MESSAGES, DataError, write_parquet
from verl_anchor.rewards import COUNTDOWN_SOURCE

MAX_NUMBER = 100  # countdown numbers are drawn from 1..max_number, by default this
MAX_COUNT = 10  # most numbers in one problem (the game has 6; larger sets almost never hit a target)
# Draws in a row without a new problem after which the ranges count as exhausted.
MAX_MISSES = 100_000
# Most problems in one call: they are all held in memory until written (about 3 GB and 1.5 minutes per
# million on a laptop core), so 1e8 would need ~300 GB instead of failing after an hour. The recipes use 20k.
MAX_PROBLEMS = 1_000_000

_TRUTH = pa.struct([("target", pa.int64()), ("numbers", pa.list_(pa.int64()))])
COUNTDOWN_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", MESSAGES),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", _TRUTH)])),
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


def max_distinct_problems(min_numbers: int, max_numbers: int, max_target: int, max_number: int = MAX_NUMBER) -> int:
    """An upper bound on the distinct (numbers, target) problems of the ranges.

    Per size k: the multisets of k numbers, times the targets one multiset can reach, which is
    at most ``max_target`` and at most the generator's combination histories (k-1 steps, each
    one of C(m, 2) pairs and 4 operations).
    """
    total = 0
    for k in range(min_numbers, max_numbers + 1):
        histories = math.prod(math.comb(m, 2) * 4 for m in range(2, k + 1))
        total += math.comb(max_number + k - 1, k) * min(max_target, histories)
    return total


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


def _random_problem(rng: random.Random, count: int, max_target: int, max_number: int) -> CountdownProblem | None:
    """Combine random pairs of ``count`` random numbers with random valid operations until one value is left."""
    numbers = [rng.randint(1, max_number) for _ in range(count)]
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
    rng: random.Random,
    count: int,
    seen: set,
    min_numbers: int,
    max_numbers: int,
    max_target: int,
    max_number: int,
    bar: tqdm,
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
            if misses > MAX_MISSES:
                raise DataError(
                    f"countdown: could not draw {count} distinct problems with {min_numbers}-{max_numbers} numbers "
                    f"and targets <= {max_target}; ask for fewer or widen the ranges"
                )
            problem = _random_problem(rng, size, max_target, max_number)
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
    max_number: int = MAX_NUMBER,
) -> tuple[list[CountdownProblem], list[CountdownProblem]]:
    """(train, test) Countdown problems: reproducible from ``seed``, distinct, and disjoint across splits."""
    if not 2 <= min_numbers <= max_numbers <= MAX_COUNT:
        raise DataError(
            f"countdown: need 2 <= min_numbers <= max_numbers <= {MAX_COUNT}, got {min_numbers}, {max_numbers}"
        )
    if max_target < 1 or max_number < 1 or train_size < 0 or test_size < 0:
        raise DataError(
            f"countdown: max_target and max_number must be >= 1 and sizes >= 0, got {max_target}, {max_number}, "
            f"{train_size}, {test_size}"
        )
    available = max_distinct_problems(min_numbers, max_numbers, max_target, max_number)
    if train_size + test_size > available:
        raise DataError(
            f"countdown: asked for {train_size + test_size} distinct problems, but at most {available} exist with "
            f"{min_numbers}-{max_numbers} numbers and targets <= {max_target}; ask for fewer or widen the ranges"
        )
    if train_size + test_size > MAX_PROBLEMS:
        raise DataError(
            f"countdown: asked for {train_size} train + {test_size} test problems, more than the "
            f"{MAX_PROBLEMS} one set can have (all are held in memory, about 3 GB per million); "
            "ask for fewer"
        )
    seen: set = set()
    with tqdm(total=train_size + test_size, desc="countdown", unit="problem", disable=None) as bar:
        # String seeds are hashed with SHA-512 by `random`, so the streams are the same on every run.
        ranges = (min_numbers, max_numbers, max_target, max_number)
        test = _draw_unique(random.Random(f"countdown-test-{seed}"), test_size, seen, *ranges, bar)
        train = _draw_unique(random.Random(f"countdown-train-{seed}"), train_size, seen, *ranges, bar)
    return train, test


PROMPT_STYLES = ("tinyzero", "short")


def countdown_prompt(numbers: Sequence[int], target: int, style: str = "tinyzero") -> list[dict[str, str]]:
    """The Countdown instruction as a chat prompt: TinyZero's (the recipes'), or a short one with the same
    answer format (~48 tokens with the tiny tokenizer instead of ~114: what a small CPU policy can learn)."""
    if style == "short":
        return [
            {
                "role": "user",
                "content": f"Make {target} from {list(numbers)} with + - * /, each number once. "
                "Think step by step, then answer in <answer> </answer>.",
            }
        ]
    if style != "tinyzero":
        raise DataError(f"countdown: unknown prompt style {style!r}; use one of {', '.join(PROMPT_STYLES)}")
    content = (
        f"Using the numbers {list(numbers)}, create an equation that equals {target}. "
        "You can use basic arithmetic operations (+, -, *, /) and each number must be used exactly once. "
        "Think step by step, then give the final equation in <answer> </answer> tags, "
        "for example <answer> (1 + 2) / 3 </answer>."
    )
    return [{"role": "user", "content": content}]


def countdown_rows(
    problems: Iterable[CountdownProblem], split: str, prompt_style: str = "tinyzero"
) -> list[dict[str, Any]]:
    """verl rows for Countdown problems."""
    rows = []
    for index, p in enumerate(problems):
        numbers = list(p.numbers)
        rows.append(
            {
                "data_source": COUNTDOWN_SOURCE,
                "prompt": countdown_prompt(numbers, p.target, prompt_style),
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


def prepare_countdown(
    out_dir: Path, train_size: int, test_size: int, seed: int = 0, prompt_style: str = "tinyzero", **ranges: int
) -> dict[str, Path]:
    """Write Countdown ``train.parquet`` / ``test.parquet`` (a split of size 0 is not written)."""
    if train_size == 0 and test_size == 0:
        raise DataError("countdown: nothing to write: the train and test sizes are both 0")
    train, test = generate_countdown(train_size, test_size, seed, **ranges)
    written = {}
    for split, problems in (("train", train), ("test", test)):
        if problems:
            path = out_dir / f"{split}.parquet"
            write_parquet(countdown_rows(problems, split, prompt_style), COUNTDOWN_SCHEMA, path)
            print(f"countdown {split}: wrote {len(problems)} problems to {path}")
            written[split] = path
    return written
