"""Reading and writing stage data through `datasets`: local jsonl/json/parquet/csv files or HF dataset ids.

An input spec (resolved from pipelines.yaml) is `{path, split, subset, columns}`; `columns` maps the names a stage
expects to the dataset's own column names, e.g. `{prompt: question, response: answer}`.

Local data is checked row by row when pipelines.yaml is validated (`local_rows`, `check_row`); Hub data when a stage
loads it (`load_rows`). Errors name the file (or Hub id and split), the 1-based line or row, and the column.
"""

from __future__ import annotations

import csv
import itertools
import json
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:  # `datasets` loads in a stage only: checking pipelines.yaml reads files without it
    from datasets import Dataset

    from stages.spec import DataInput

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, at a cost bounded whatever the value's size (for error messages)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _is_text_or_messages(value: Any) -> bool:
    return isinstance(value, str) or _is_messages(value)


MESSAGES = "a list of {role, content} messages"
COLUMN_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {  # column a stage reads -> (check, what it must be)
    "text": (lambda v: isinstance(v, str), "a string"),
    "messages": (_is_messages, MESSAGES),
    **{name: (_is_text_or_messages, f"a string or {MESSAGES}")
       for name in ("prompt", "response", "chosen", "rejected", "completion")},
}


def is_local(path: str, root: Path | str = ".") -> bool:
    """Whether `path` names local data (a data file, a path, or something existing under `root`), not a Hub id."""
    return path.startswith(("./", "../", "/")) or Path(path).suffix in LOCAL_FORMATS or (Path(root) / path).exists()


def load(spec: DataInput) -> Dataset:
    """The dataset an input spec names, with its columns renamed to the names the stage expects."""
    from datasets import load_dataset

    path = spec.path
    suffix = Path(path).suffix
    if suffix in LOCAL_FORMATS:
        dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=path, split="train")
    else:
        dataset = load_dataset(path, spec.subset, split=spec.split)
    renames = {theirs: ours for ours, theirs in spec.columns.items() if theirs != ours}
    return dataset.rename_columns(renames) if renames else dataset


def load_rows(spec: DataInput, columns: tuple[str, ...] = (),
              or_columns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The rows of an input spec. Hub data (not checked by `rl4llm validate`) is checked here: each row must hold
    the mapped columns and the stage's `columns` (or all of `or_columns`, when the first row has them), by the
    stage's names, and text columns must hold text or chat messages."""
    if is_local(spec.path):  # an empty file is refused by name (`datasets` would raise a bare StopIteration)
        next(local_rows(Path(spec.path), spec.split), None)
    rows = load(spec).to_list()
    if not is_local(spec.path):
        source = _hub_source(spec)
        if or_columns and rows and all(c in rows[0] for c in or_columns):
            columns = or_columns
        for number, row in enumerate(rows, 1):
            check_row(row, f"{source} row {number}", {*columns, *spec.columns})
    return rows


def _hub_source(spec: DataInput) -> str:
    return f"{spec.path} (split {spec.split})"


def row_name(spec: DataInput, index: int) -> str:
    """How errors name row `index` (0-based) of `load_rows(spec)`: by its file and 1-based line or row as
    `local_rows` does (`demos.jsonl line 3`; read again, so call it for an error only), or a Hub row by number."""
    if is_local(spec.path):
        rows = local_rows(Path(spec.path), spec.split, spec.path)
        return next(itertools.islice(rows, index, None), (f"{spec.path} row {index + 1}",))[0]
    return f"{_hub_source(spec)} row {index + 1}"


def check_row(row: dict[str, Any], where: str, required: Iterable[str] = (),
              columns: dict[str, str] | None = None) -> None:
    """Raise a ValueError naming `where` and the column when `row` lacks a `required` column or holds a value of
    the wrong type in a column of `COLUMN_TYPES`. `columns` maps the stage's names to the row's (as in a spec)."""
    columns = columns or {}

    def named(ours: str) -> str:
        theirs = columns.get(ours, ours)
        return f"'{theirs}'" + (f" (mapped to '{ours}')" if theirs != ours else "")

    for ours in required:
        if row.get(columns.get(ours, ours)) is None:
            raise ValueError(f"{where}: column {named(ours)} missing")
    for ours, (accepts, expected) in COLUMN_TYPES.items():
        theirs = columns.get(ours, ours)
        if theirs in row and not accepts(row[theirs]):
            raise ValueError(f"{where}: column {named(ours)} must be {expected}, got {short_repr(row[theirs])}")


def local_files(path: Path, split: str | None = None) -> list[Path]:
    """The data files of a local dataset: the file itself, or a Hub-layout folder's `data/<split>-*` files (any
    data files when there are none by that name)."""
    if not path.is_dir():
        return [path]
    files = [f for f in sorted(path.glob(f"**/{split or 'train'}-*")) if f.suffix in LOCAL_FORMATS]
    return files or sorted(f for f in path.rglob("*") if f.suffix in LOCAL_FORMATS)


def decode_utf8(raw: bytes, label: str = "", line: int = 1) -> str:
    """`raw` as text, or a ValueError naming `label` and the line and column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        column = e.start - raw.rfind(b"\n", 0, e.start)
        where = f"{label} line {line} column {column}".lstrip()
        raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x})") from None


def _json_record(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {short_repr(record)}")
    return record


def _jsonl_rows(file: Path, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            text = decode_utf8(raw, label, number)
            if text.strip():
                yield f"{label} line {number}", _json_record(text, f"{label} line {number}")


def _json_rows(file: Path, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    text = decode_utf8(file.read_bytes(), label)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file, which `datasets` reads too
            yield from _jsonl_rows(file, label)
            return
        raise ValueError(f"{label} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    for number, record in enumerate(document if isinstance(document, list) else [document], 1):
        if not isinstance(record, dict):
            raise ValueError(f"{label} row {number}: expected a JSON object, got {short_repr(record)}")
        yield f"{label} row {number}", record


def _csv_rows(file: Path, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(file, "rb") as f:
        reader = csv.DictReader(decode_utf8(raw, label, number) for number, raw in enumerate(f, 1))
        for row in reader:
            yield f"{label} line {reader.line_num}", row


def _parquet_rows(file: Path, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"{label} row {number}", row
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{label}: not a readable parquet file ({e})") from None


def local_rows(path: Path, split: str | None = None, label: str | None = None) -> Iterator[tuple[str, dict]]:
    """Every row of a local dataset (a file or a Hub-layout folder), streamed, with where it is (`demos.jsonl
    line 3`, `chat/data/train-00000-of-00001.parquet row 7`); raises a ValueError naming the file and line on
    unreadable data (not UTF-8, invalid JSON, not parquet) or when there are no rows. `label` names `path`."""
    label = label or str(path)
    files = local_files(path, split)
    if not files:
        raise ValueError(f"{label}: no data files (expected data/{split or 'train'}-*.parquet or *.jsonl)")
    empty = True
    for file in files:
        name = str(Path(label) / file.relative_to(path)) if path.is_dir() else label
        reader = {".parquet": _parquet_rows, ".csv": _csv_rows, ".json": _json_rows}.get(file.suffix, _jsonl_rows)
        for where, row in reader(file, name):
            empty = False
            yield where, row
    if empty:
        raise ValueError(f"{label}: no rows (an empty dataset)")


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows through `datasets` (so every consumer reads what `load` reads)."""
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_json(str(path), lines=True, force_ascii=False)
