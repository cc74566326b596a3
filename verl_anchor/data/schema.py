"""What every dataset writer shares: the error type, verl's chat-message column, atomic parquet output."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_anchor.usage import UsageError, make_dir

# verl's `prompt` column: one list of chat messages per row.
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class DataError(UsageError):
    """Missing or malformed input, or an impossible request; the message names the dataset, row and field."""


def write_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write ``rows`` with ``schema`` atomically, then check the file holds exactly ``len(rows)`` rows."""
    make_dir(path.parent, DataError)
    tmp = path.with_name(path.name + ".tmp")
    table = pa.Table.from_pylist(rows, schema=schema)
    try:
        pq.write_table(table, tmp)
        found = pq.read_metadata(tmp).num_rows
        if found != len(rows):
            tmp.unlink()
            raise DataError(f"{path}: wrote {len(rows)} rows but the file holds {found}")
        os.replace(tmp, path)
    except OSError as err:  # disk full, read-only file system, a directory named like the file, ...
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None
