"""Datasets in verl's parquet schema: `verl-anchor data NAME --out DIR` writes ``train.parquet`` / ``test.parquet``.

Every row has verl's schema (``RLHFDataset`` reads it; ``data.prompt_key=prompt``,
``data.reward_fn_key=data_source``)::

    data_source   string                     selects the reward (verl_anchor.rewards.compute_score)
    prompt        list<struct<role, content>>  one user message; verl applies the chat template
    ability       string                     "math"
    reward_model  struct<style="rule", ground_truth>
    extra_info    struct<split, index, ...>

Modules: `countdown` (generated problems), `math_sets` (the hub math sets of `DATASETS`),
`readers` (their offline files), `schema` (shared parquet output and `DataError`), `commands.data`
(the sub-command). Every file is written to a temporary name, checked, then renamed.
"""

from verl_anchor.data.countdown import (
    COUNTDOWN_SCHEMA,
    MAX_NUMBER,
    CountdownProblem,
    countdown_prompt,
    countdown_rows,
    generate_countdown,
    max_distinct_problems,
    prepare_countdown,
)
from verl_anchor.data.math_sets import (
    DATASETS,
    MATH_INSTRUCTION,
    MATH_SCHEMA,
    HubDataset,
    HubUnavailable,
    math_prompt,
    prepare_math,
)
from verl_anchor.data.schema import DataError, write_parquet

__all__ = [
    "COUNTDOWN_SCHEMA",
    "DATASETS",
    "MATH_INSTRUCTION",
    "MATH_SCHEMA",
    "MAX_NUMBER",
    "CountdownProblem",
    "DataError",
    "HubDataset",
    "HubUnavailable",
    "countdown_prompt",
    "countdown_rows",
    "generate_countdown",
    "math_prompt",
    "max_distinct_problems",
    "prepare_countdown",
    "prepare_math",
    "write_parquet",
]
