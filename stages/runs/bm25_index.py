"""Index a corpus's passages with BM25 into a directory the `search` tool loads (stages/retrieval.py). Deterministic:
the same corpus and params write the same files.

Params, inputs and outputs: stages/kinds/bm25_index.py.
"""

from __future__ import annotations

import time

from stages.context import StageContext
from stages.kinds.bm25_index import Params
from stages.retrieval import build_index


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    if not ctx.accelerator.is_main_process:  # the main process alone writes the index (its metrics are the stage's)
        return {}
    rows = ctx.rows("corpus")
    start = time.perf_counter()
    size = build_index([row["text"] for row in rows], ctx.outputs["index"], p.k1, p.b, p.method,
                       [row.get("id", i) for i, row in enumerate(rows)])
    return {**size, "index_seconds": time.perf_counter() - start}
