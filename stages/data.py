"""Reading and writing stage data through `datasets`: local jsonl/json/parquet/csv files or HF dataset ids.

An input spec (resolved from pipelines.yaml) is `{path, split, subset, columns}`; `columns` maps the names a stage
expects to the dataset's own column names, e.g. `{prompt: question, response: answer}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def is_local(path: str) -> bool:
    return Path(path).suffix in LOCAL_FORMATS or Path(path).exists()


def load(spec: dict[str, Any]) -> Dataset:
    """The dataset an input spec names, with its columns renamed to the names the stage expects."""
    path = spec["path"]
    suffix = Path(path).suffix
    if suffix in LOCAL_FORMATS:
        dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=path, split="train")
    else:
        dataset = load_dataset(path, spec.get("subset"), split=spec.get("split") or "train")
    renames = {theirs: ours for ours, theirs in (spec.get("columns") or {}).items() if theirs != ours}
    return dataset.rename_columns(renames) if renames else dataset


def load_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return load(spec).to_list()


def local_columns(path: str, split: str | None = None) -> list[str]:
    """Column names of a local data file, or of a Hub-layout dataset folder (`data/<split>-*.parquet`), read from
    its first record or schema (cheap: used by `rl4llm validate`)."""
    if Path(path).is_dir():
        files = sorted(Path(path).glob(f"**/{split or 'train'}-*")) or sorted(
            f for f in Path(path).rglob("*") if f.suffix in LOCAL_FORMATS)
        if not files:
            raise ValueError(f"{path}: no data files (expected data/{split or 'train'}-*.parquet or *.jsonl)")
        path = str(files[0])
    suffix = Path(path).suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path) as f:
        first = f.readline()
    if suffix == ".csv":
        return [c.strip() for c in first.split(",")]
    record = json.loads(first) if suffix == ".jsonl" else json.loads(Path(path).read_text())
    return list((record[0] if isinstance(record, list) else record).keys())


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows through `datasets` (so every consumer reads what `load` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_json(str(path), lines=True, force_ascii=False)
