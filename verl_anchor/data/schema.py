"""What every dataset writer shares: the error type, verl's chat-message column, atomic parquet output."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_anchor.usage import UsageError

# verl's `prompt` column: one list of chat messages per row.
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class DataError(UsageError):
    """Missing or malformed input, or an impossible request; the message names the dataset, row and field."""


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
