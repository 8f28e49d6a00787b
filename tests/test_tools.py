"""Tools of multi-turn rollouts: the ToolBox's containment (errors, hangs, huge or non-text answers), the calculator
(arithmetic without eval, bounded) and the BM25 retriever (the bm25_index kind and the search tool over it)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from bm25s.stopwords import STOPWORDS_EN

from stages.calculator import MAX_QUERY_CHARS, calculator
from stages.data import write_jsonl
from stages.retrieval import NO_MATCH, NO_QUERY, load_index, search
from stages.tools import ToolBox, build_tool
from tests.test_r1_kinds import run_kind

# --- ToolBox containment ----------------------------------------------------------------------------------------


def raising(query: str, **_) -> str:
    raise RuntimeError(f"boom on {query}")


def hanging(query: str, **_) -> str:
    time.sleep(10)
    return "too late"


def swallowing(query: str, **_) -> str:
    """A tool whose blanket `except Exception` would hide a timeout that were an Exception."""
    try:
        time.sleep(10)
    except Exception:
        return "swallowed"
    return "too late"


def test_a_raising_tool_answers_an_error_and_is_counted():
    box = ToolBox({"t": raising})
    result = box.call("t", "q", {})
    assert not result.ok and "RuntimeError" in result.text and "boom on q" in result.text
    assert (box.calls, box.failures, box.first_failure) == (1, 1, result.text)
    assert box.call("t", "q", {}).text == result.text and box.failures == 2


@pytest.mark.parametrize("tool", [hanging, swallowing])
def test_a_hanging_tool_times_out_even_through_except_exception(tool):
    box = ToolBox({"t": tool}, timeout_s=0.2)
    start = time.perf_counter()
    result = box.call("t", "q", {})
    assert time.perf_counter() - start < 1.5
    assert not result.ok and "timed out" in result.text and box.failures == 1
    assert box.call("t", "q", {}).ok is False  # the next call is timed again
    time.sleep(0.3)  # and no alarm is left armed once a call ended


def test_a_huge_answer_is_cut_and_a_non_text_answer_is_an_error():
    box = ToolBox({"big": lambda q, **_: "x" * 1_000_000, "int": lambda q, **_: 42}, max_chars=500)
    big = box.call("big", "q", {})
    assert big.ok and big.text == "x" * 500
    wrong = box.call("int", "q", {})
    assert not wrong.ok and "int" in wrong.text and len(wrong.text) <= 500
    assert (box.calls, box.failures) == (2, 1)


def test_build_tool_names_an_unknown_parameter_and_an_unknown_tool():
    with pytest.raises(ValueError, match="no parameter.*precision"):
        build_tool("calculator", precision=3)
    with pytest.raises(ValueError, match="top_n"):
        build_tool("search", index="x", top_n=3)
    with pytest.raises(ValueError):
        build_tool("no_such_tool")
    assert build_tool("calculator")("2 + 3 * 4", answer="ignored") == "14"  # the row's columns are ignored


# --- calculator ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("2+3*4", "14"), ("(1+2)/4", "0.75"), ("-3**2", "-9"), ("10//3", "3"), ("10 % 4", "2"), ("2**-1", "0.5"),
    ("7.0 * 2", "14"), ("1/3", "0.3333333333"), ("+(2 - 5)", "-3"), (" 10**20 ", "100000000000000000000"),
])
def test_calculator_evaluates_arithmetic(query, expected):
    assert calculator(query) == expected


@pytest.mark.parametrize("query, reason", [
    ("2**1000000", "exponent too large"), ("9**9**9**9", "too large"), ("(10**40)*(10**40)", "too large"),
    ("__import__('os')", "Call is not allowed"), ("os.system('true')", "not allowed"), ("x + 1", "Name"),
    ("(1).real", "Attribute"), ("'a' * 3", "not a real number"), ("True + 1", "not a real number"),
    ("[1, 2]", "List"), ("1 if 1 else 2", "IfExp"), ("1 < 2", "Compare"), ("3 & 1", "BitAnd"),
    ("1/0", "division by zero"), ("(-8)**0.5", "not a real number"), ("1e308 * 10", "too large"), ("", "empty"),
    ("1 +", "not an arithmetic expression"), ("1" + "+1" * MAX_QUERY_CHARS, "too long"),
])
def test_calculator_refuses_what_is_not_bounded_arithmetic_quickly(query, reason):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=reason):
        calculator(query)
    assert time.perf_counter() - start < 0.1


def test_a_refused_calculation_reaches_the_model_as_an_error():
    result = ToolBox({"calculator": build_tool("calculator")}).call("calculator", "__import__('os')", {})
    assert not result.ok and "not allowed" in result.text


# --- retrieval ----------------------------------------------------------------------------------------------------

FACTS = [  # made-up facts: each query below shares words with several passages, but its fact is in one
    "zorblax is a country . its capital is quenta .",
    "quenta is a river in velmora . it flows into lake tarn .",
    "the capital of velmora is orith . orith has nine bridges .",
    "lake tarn is the deepest lake of zorblax .",
    "the mayor of orith is dela fenwick .",
    "fenwick glass is made in quenta from river sand .",
]
QUERIES = {
    "what is the capital of zorblax": 0,
    "which lake does the quenta river flow into": 1,
    "capital of velmora": 2,
    "deepest lake": 3,
    "who is the mayor of orith": 4,
    "where is fenwick glass made": 5,
}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bm25")
    write_jsonl([{"id": f"fact{i}", "text": text} for i, text in enumerate(FACTS)], root / "corpus.jsonl")
    metrics, _ = run_kind("bm25_index", root / "stage", {"corpus": str(root / "corpus.jsonl")})
    words = {word for fact in FACTS for word in re.findall(r"\w+", fact)} - set(STOPWORDS_EN)
    assert (metrics["passages"], metrics["vocabulary"]) == (len(FACTS), len(words))
    return root / "stage" / "index"


def test_the_passage_holding_the_queried_fact_ranks_first(index_dir):
    index = load_index(index_dir)
    for query, fact in QUERIES.items():
        assert index.top(query, 1) == [FACTS[fact]], query
        assert search(query, index=str(index_dir), top_k=1) == FACTS[fact]


def test_search_returns_top_k_passages_each_truncated_at_a_word(index_dir):
    index = load_index(index_dir)
    assert len(index.top("quenta", 3)) == 3 and len(index.top("quenta", 10)) == 3  # only those with the word
    tool = build_tool("search", index=str(index_dir), top_k=2, max_passage_chars=20)
    text = tool("capital of zorblax", answer="quenta")
    assert text.startswith("zorblax is a country . ")  # the best passage, cut at a word and ended by " ."
    passages = text.split(" . ")
    assert len(text) <= 2 * (20 + 2) and all(len(p.rstrip(" .")) <= 20 for p in passages)
    assert set(text.split()) <= {w for fact in FACTS for w in fact.split()}  # no word made up or glued
    assert search("", index=str(index_dir)) == NO_QUERY and search("the of is", index=str(index_dir)) == NO_QUERY
    assert search("xylophone", index=str(index_dir)) == NO_MATCH


def test_the_index_is_deterministic_and_its_search_tool_runs_in_a_toolbox(index_dir, tmp_path):
    corpus = index_dir.parent.parent / "corpus.jsonl"
    run_kind("bm25_index", tmp_path, {"corpus": str(corpus)})
    files = sorted(p.name for p in index_dir.iterdir())
    assert (index_dir / "passages.jsonl").read_text().splitlines()[0] == '{"id": "fact0", "text": "%s"}' % FACTS[0]
    assert files == sorted(p.name for p in (tmp_path / "index").iterdir())
    assert all((index_dir / f).read_bytes() == (tmp_path / "index" / f).read_bytes() for f in files)
    box = ToolBox({"search": build_tool("search", index=str(tmp_path / "index"), top_k=1)}, max_chars=2000)
    row = {"answer": "dela fenwick", "index": "elsewhere", "top_k": 5, "query": "deepest lake"}  # a row's columns
    result = box.call("search", "who is the mayor of orith", row)  # neither redirect the search nor break the call
    assert result.ok and result.text == FACTS[4]
