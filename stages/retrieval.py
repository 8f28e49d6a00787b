"""BM25 retrieval over a corpus of passages (bm25s, Lù 2024: BM25 as sparse matrices) and the built-in `search` tool
over such an index (Search-R1, Jin et al. 2025: the top-k passages of a query, shown to the model).

An index is a directory: bm25s's saved matrices, vocabulary and parameters, plus `passages.jsonl` (rows `{id, text}`
in the corpus's order). Corpus and queries are tokenised alike, offline: lowercased words (`\\w+`, so single
letters and digits count), English stopwords from bm25s's built-in list removed, no stemmer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import bm25s

PASSAGES = "passages.jsonl"  # the passages of an index directory, one {id, text} per line
TOKEN_PATTERN = r"(?u)\b\w+\b"  # a token: a run of word characters
STOPWORDS = "en"  # bm25s's built-in English list (no download)
NO_QUERY = "no words to search for"  # what `search` answers a query that is empty (or stopwords only)
NO_MATCH = "no passage matches the query"  # … and a query none of whose words is in the corpus


def tokenize(texts: list[str], return_ids: bool) -> Any:
    """bm25s's tokens of `texts` (ids and vocabulary when `return_ids`, else lists of words)."""
    import bm25s  # here, not at the top: checking a pipeline that names the search tool need not load it

    return bm25s.tokenize(texts, token_pattern=TOKEN_PATTERN, stopwords=STOPWORDS, return_ids=return_ids,
                          show_progress=False)


def build_index(passages: list[str], out_dir: Path, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                ids: list[Any] | None = None) -> dict[str, int]:
    """Index `passages` (their `ids`, default their positions) with BM25 (`k1`: term-frequency saturation, `b`:
    length normalisation, `method`: bm25s's BM25 variant) into `out_dir`. Returns its size: passages, vocabulary."""
    if not passages:
        raise ValueError("no passages to index")
    import bm25s

    ids = list(range(len(passages))) if ids is None else ids
    model = bm25s.BM25(k1=k1, b=b, method=method)
    tokens = tokenize(passages, return_ids=True)
    model.index(tokens, show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir), show_progress=False)
    with open(out_dir / PASSAGES, "w", encoding="utf-8") as f:
        for passage_id, text in zip(ids, passages, strict=True):
            f.write(json.dumps({"id": passage_id, "text": text}, ensure_ascii=False) + "\n")
    return {"passages": len(passages), "vocabulary": sum(1 for word in tokens.vocab if word)}  # bm25s may add ""


@dataclass(frozen=True)
class Index:
    model: bm25s.BM25
    passages: list[str]  # in the corpus's order, whitespace collapsed

    def top(self, query: str, k: int) -> list[str] | None:
        """The (at most) `k` passages scoring highest for `query` with a positive score, best first (ties: corpus
        order); None when the query has no word to search for."""
        words = tokenize([query], return_ids=False)[0]
        if not words:
            return None
        import numpy as np

        scores = self.model.get_scores(words)
        best = np.argsort(-scores, kind="stable")[:k]
        return [self.passages[i] for i in best if scores[i] > 0]


@functools.lru_cache(maxsize=8)
def _load(directory: str, stamp: int) -> Index:
    import bm25s

    model = bm25s.BM25.load(directory, show_progress=False)
    with open(Path(directory) / PASSAGES, encoding="utf-8") as f:
        passages = [" ".join(json.loads(line)["text"].split()) for line in f]
    return Index(model, passages)


def load_index(directory: str | Path) -> Index:
    """The index saved in `directory` by `build_index`, loaded once per process (again only if rebuilt)."""
    path = Path(directory).resolve()
    if not (path / PASSAGES).is_file():
        raise ValueError(f"{directory}: not a BM25 index (no {PASSAGES}; build one with the bm25_index kind)")
    return _load(str(path), (path / PASSAGES).stat().st_mtime_ns)


def truncated(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters at a word boundary (a single longer word is cut inside)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars + 1].rsplit(" ", 1)[0] if " " in text[:max_chars + 1] else text[:max_chars]
    return cut[:max_chars].rstrip()


def joined(passages: list[str]) -> str:
    """Passages as one text, each ended by a " ." word unless it ends with its own sentence mark."""
    return " ".join(p if p.endswith((".", "!", "?")) else f"{p} ." for p in passages)


def search(query: str, *, index: str, top_k: int = 3, max_passage_chars: int = 300, **_: Any) -> str:
    """The `top_k` passages of the BM25 `index` (a bm25_index stage's output directory) best matching `query`, each
    cut to `max_passage_chars`, as one text; a short notice when the query is empty or matches nothing."""
    if top_k < 1 or max_passage_chars < 1:
        raise ValueError("top_k and max_passage_chars must be positive")
    found = load_index(index).top(query, top_k)
    if found is None:
        return NO_QUERY
    return joined([truncated(p, max_passage_chars) for p in found]) if found else NO_MATCH
