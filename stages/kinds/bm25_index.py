"""Build a BM25 index of a corpus (bm25s: BM25 as sparse matrices): the retriever of the built-in `search` tool
(Search-R1, Jin et al. 2025, retrieves with E5 by default and offers BM25 as its sparse retriever). The index is a
directory that DVC tracks like any output; a grpo stage takes it as its `index` input, which is bound to the tools
that take an `index` (the search tool).

Declared here (what pipelines.yaml may set); how it works: stages/runs/bm25_index.py and stages/retrieval.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.kinds import Input, StageParams


class Params(StageParams):
    k1: float = Field(1.5, gt=0)  # BM25 term-frequency saturation
    b: float = Field(0.75, ge=0, le=1)  # BM25 document-length normalisation (0: none, 1: full)
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"  # BM25 variant (bm25s's names)


INPUTS = {
    "corpus": Input("the passages to index: rows {text} (and optionally {id}, kept with the passage)",
                    columns=("text",)),
}
OUTPUTS = {"index": "index"}  # a directory: bm25s's matrices and vocabulary, plus passages.jsonl {id, text}
KEY_METRICS = ("passages", "vocabulary")  # `rl4llm compare` shows these

run = "stages.runs.bm25_index:run"  # what a stage of this kind does
