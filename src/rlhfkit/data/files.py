"""Read the rows of a data file, one ``(line, row)`` pair at a time, with errors that name file and line.

File types (``read_rows``):

* ``.jsonl``: one JSON object per line; blank lines are skipped; "line" is the physical line.
* ``.json``: a top-level array of objects; "line" is the line where each object starts.
* ``.csv``: a header row, then one record per row; "line" is the physical line where the row
  starts (the header is line 1). Blank cells count as missing columns. A cell starting with
  ``[`` or ``{`` is read as JSON (so message lists and rankings fit in a cell); if it is not
  valid JSON it stays text (``[INST] ...``), unless it starts like JSON data (``[{``, ``{"``,
  ``[1``, ``[[``), which is an error. The ``margin`` column is read as a number.
* ``.parquet`` and directories written by ``datasets`` ``save_to_disk`` (a ``DatasetDict``
  must have a ``train`` split): "line" is the 1-based row number; null cells count as missing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

from rlhfkit.errors import DataError

Row: TypeAlias = dict[str, Any]

SUPPORTED = ".jsonl, .json, .parquet, .csv or a datasets directory"
_BOM = b"\xef\xbb\xbf"
_CSV_NUMERIC_COLUMNS = frozenset({"margin"})
_CSV_JSON_LIKE = re.compile(r'\[\s*[\[{"\d-]|\{\s*"')


def read_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, Row]]:
    """Yield ``(line, row)`` for each record of a data file; raises ``DataError`` on unreadable input.

    The path and file type are checked at once; the contents as the rows are consumed.
    """
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(name, None, None, "no such file")
    if p.is_dir():
        return _non_empty(_read_datasets_dir(p, name), name)
    suffix = p.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        kind = f"'{suffix}'" if suffix else "(no extension)"
        raise DataError(name, None, None, f"unsupported file type {kind} (use {SUPPORTED})")
    return _non_empty(reader(p, name), name)


def _non_empty(rows: Iterator[tuple[int, Row]], name: str) -> Iterator[tuple[int, Row]]:
    empty = True
    for item in rows:
        empty = False
        yield item
    if empty:
        raise DataError(name, None, None, "contains no records")


def _read_jsonl(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = _decode(raw.removeprefix(_BOM) if lineno == 1 else raw, name, lineno)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(name, lineno, None, _json_message(e)) from None
            yield lineno, _expect_object(value, name, lineno)


def _read_json(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    text = _decode(p.read_bytes().removeprefix(_BOM), name)
    if not text.strip():
        return
    try:
        value = json.loads(text)  # validates the whole file, so the walk below cannot fail
    except json.JSONDecodeError as e:
        raise DataError(name, e.lineno, None, _json_message(e)) from None
    if not isinstance(value, list):
        raise DataError(name, None, None, f"must hold a JSON array of records, got {type_name(value)}")
    count = len(value)
    del value
    # Walk the array again with raw_decode to learn the offset (hence line) where each object starts.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted_to = 1, 0
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        item, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        yield line, _expect_object(item, name, line)
        pos = end


def _read_csv(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    text = _decode(p.read_bytes().removeprefix(_BOM), name)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1  # the next row starts on the line after the last one read
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(name, start, None, f"invalid CSV: {e}") from None
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            for i, column in enumerate(header):
                if column in header[:i]:
                    raise DataError(name, start, None, f"column '{column}' appears twice in the header")
            continue
        if len(cells) != len(header):
            message = f"has {len(cells)} cells but the header has {len(header)} columns"
            raise DataError(name, start, None, message)
        cells_by_column = zip(header, cells, strict=True)
        yield start, {col: _csv_cell(cell, col, name, start) for col, cell in cells_by_column if cell.strip()}


def _csv_cell(cell: str, column: str, name: str, line: int) -> Any:
    stripped = cell.strip()
    if column in _CSV_NUMERIC_COLUMNS:
        try:
            return float(stripped)
        except ValueError:
            return cell  # left as text, so validation reports "must be a number, got string"
    if stripped.startswith(("[", "{")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            if _CSV_JSON_LIKE.match(stripped):
                raise DataError(name, line, column, _json_message(e)) from None
    return cell


def _read_parquet(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(p)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(name, None, None, f"is not a readable Parquet file ({e})") from None
    row_number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, _drop_nulls(row)


def _read_datasets_dir(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        message = "is a directory but not a dataset saved with datasets' save_to_disk"
        raise DataError(name, None, None, message) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(dataset) or "none"
            raise DataError(name, None, None, f"has no 'train' split (splits: {splits})")
        dataset = dataset["train"]
    for row_number, row in enumerate(dataset, 1):
        yield row_number, _drop_nulls(row)


_READERS: dict[str, Callable[[Path, str], Iterator[tuple[int, Row]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _decode(data: bytes, name: str, first_line: int = 1) -> str:
    """Decode UTF-8, naming the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        line_start = data.rfind(b"\n", 0, e.start) + 1
        column = len(data[line_start : e.start].decode("utf-8")) + 1
        message = f"is not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
        raise DataError(name, line, None, message) from None


def _json_message(e: json.JSONDecodeError) -> str:
    return f"invalid JSON: {e.msg} (column {e.colno})"


def _expect_object(value: Any, name: str, line: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(name, line, None, f"expected a JSON object, got {type_name(value)}")
    return value


def _drop_nulls(row: Row) -> Row:
    return {key: value for key, value in row.items() if value is not None}


def type_name(value: Any) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
