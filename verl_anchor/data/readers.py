"""Reading a math set offline (``--from PATH``).

PATH is a parquet/json/jsonl/csv file, a directory of such files (``train*`` / ``test*`` files
pick the split; in a hub snapshot, only the dataset's config folder), or a ``save_to_disk``
directory. Rows come as ``(row, where)``, ``where`` naming the file and row for error messages.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_anchor.data.schema import DataError

if TYPE_CHECKING:
    from verl_anchor.data.math_sets import HubDataset

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
# What reading a data file raises for a bad file (rather than a bug): OSError (no permission, a
# directory), UnicodeError (not UTF-8), csv.Error, and pyarrow's errors (not parquet, truncated).
UNREADABLE = (OSError, UnicodeError, csv.Error, pa.ArrowException)


def read_file(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """The rows of one data file; `DataError` naming the file when it cannot be read or decoded."""
    try:
        yield from _read_file(path)
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None


def unreadable(path: Path, exc: BaseException) -> DataError:
    """The `DataError` for a file that cannot be read (no permission, not UTF-8, not parquet, ...)."""
    if isinstance(exc, UnicodeDecodeError):
        reason = f"not UTF-8 text (byte {exc.start}: {exc.reason})"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = str(exc) or type(exc).__name__
    kind = "parquet" if path.suffix.lower() == ".parquet" else path.suffix.lower().lstrip(".") or "data"
    return DataError(f"cannot read {path} as {kind}: {reason}")


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
        raise DataError(f"{path}: unsupported file type (use {', '.join(DATA_SUFFIXES)})")


def _as_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def local_source(
    name: str, spec: HubDataset, split: str, path: Path, single_split: bool
) -> tuple[list[Path] | Any, str]:
    """Files (or a loaded ``datasets.Dataset``) holding ``split`` of ``name`` under ``path``, and a label."""
    hub_split = spec.splits[split]
    if not path.exists():
        raise DataError(f"{name}: --from {path} does not exist")
    if path.is_file():
        if not single_split:
            splits = ", ".join(spec.splits)
            raise DataError(f"{name} has splits {splits}: pass --split to say which one {path} holds")
        return [path], str(path)
    if _is_saved_dataset(path):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except UNREADABLE as exc:
            raise unreadable(path, exc) from None
        if isinstance(loaded, datasets.DatasetDict):
            for key in (hub_split, split):
                if key in loaded:
                    return loaded[key], f"{path}[{key}]"
            raise DataError(f"{name}: {path} has splits {sorted(loaded)}, none named {hub_split!r} or {split!r}")
        if not single_split:
            raise DataError(f"{name}: {path} holds a single split: pass --split to say which one")
        return loaded, str(path)
    try:
        files = _data_files(path)
    except OSError as exc:  # a subdirectory without permission
        raise unreadable(path, exc) from None
    config = spec.config
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
        f"(expected files named {hub_split}* or {split}* ending in {', '.join(DATA_SUFFIXES)})"
    )


def iter_source(source: list[Path] | Any) -> tuple[Iterator[tuple[dict[str, Any], str]], int | None]:
    if isinstance(source, list):
        # Each file's rows; the total is known only for parquet without reading it.
        all_parquet = all(p.suffix.lower() == ".parquet" for p in source)
        total = sum(_parquet_rows(p) for p in source) if all_parquet else None
        return (item for p in source for item in read_file(p)), total
    return ((row, f"row {i}") for i, row in enumerate(source)), len(source)


def _parquet_rows(path: Path) -> int:
    try:
        return pq.read_metadata(path).num_rows
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None
