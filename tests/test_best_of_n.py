"""Best-of-N: the selection rules of stages/selection.py against hand-computed values, and the `best_of_n` kind end
to end on a tiny policy, outcome verifier and PRM."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from stages.data import load_rows, write_jsonl
from stages.models import load_scalar_head_model, load_tokenizer, save
from stages.selection import (aggregate_steps, best_score_credit, canonical_answer, selection_curve, sizes_up_to,
                              subsets, vote_credit)
from stages.spec import DataInput
from stages.verifiers import verifier_config
from tests.test_r1_kinds import run_kind, tiny_model

# --- selection rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how, expected", [("min", 0.2), ("prod", 0.9 * 0.2 * 0.5), ("last", 0.5)])
def test_each_step_aggregation(how, expected):
    assert aggregate_steps([0.9, 0.2, 0.5], how) == pytest.approx(expected)
    assert aggregate_steps([], how) == 0.0  # a solution without steps scores nothing
    assert aggregate_steps([0.7], how) == pytest.approx(0.7)


def test_an_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="unknown step aggregation 'mean'"):
        aggregate_steps([0.5], "mean")


def test_majority_voting_and_its_ties():
    assert vote_credit(["4", "4", "5"], [True, True, False]) == 1.0
    assert vote_credit(["4", "5", "5"], [True, False, False]) == 0.0
    assert vote_credit(["4", "5"], [True, False]) == 0.5  # two answers tied, one correct
    assert vote_credit(["4", "5", "6"], [False, True, False]) == pytest.approx(1 / 3)
    assert vote_credit(["1/2", "0.5", "\\frac{1}{2}", "3"], [True, True, True, False]) == 1.0  # one number, 3 votes
    assert canonical_answer("1/2") == canonical_answer("0.5") == canonical_answer(" \\frac{1}{2} ")
    assert vote_credit([None, None], [False, False]) == 0.0  # no answers, no vote
    assert vote_credit([None, None, "7"], [False, False, True]) == 1.0  # the only answer wins over non-answers
    assert vote_credit(["x  y", "x y", "z"], [False, False, True]) == 0.0  # whitespace does not split a vote


def test_reranking_takes_the_best_score_and_splits_ties():
    assert best_score_credit([0.1, 0.9, 0.3], [False, True, False]) == 1.0
    assert best_score_credit([0.1, 0.9, 0.3], [True, False, True]) == 0.0
    assert best_score_credit([0.9, 0.9, 0.3], [True, False, True]) == 0.5
    assert best_score_credit([0.2, 0.2, 0.2, 0.2], [True, True, True, False]) == 0.75


def test_subsets_enumerate_when_few_and_draw_deterministically_when_many():
    assert subsets(4, 2, 6, random.Random(0)) == list(itertools.combinations(range(4), 2))  # C(4,2) = 6 <= 6
    assert subsets(5, 5, 1, random.Random(0)) == [(0, 1, 2, 3, 4)]
    drawn = subsets(10, 5, 8, random.Random(3))  # C(10,5) = 252 > 8
    assert len(drawn) == 8 and all(len(set(s)) == 5 and list(s) == sorted(s) and max(s) < 10 for s in drawn)
    assert drawn == subsets(10, 5, 8, random.Random(3))
    assert drawn != subsets(10, 5, 8, random.Random(4))


def test_sizes_are_powers_of_two_up_to_n_max():
    assert sizes_up_to(1) == [1]
    assert sizes_up_to(2) == [1, 2]
    assert sizes_up_to(16) == [1, 2, 4, 8, 16]
    assert sizes_up_to(6) == [1, 2, 4, 6]


def test_selection_curve_on_a_hand_computed_problem():
    correct = [True, False, False]
    answers = ["3", "4", "4"]  # the wrong answer has the majority
    scores = [0.8, 0.9, 0.1]
    curve = selection_curve(lambda s: float(any(correct[i] for i in s)), 3, 64, random.Random(0))
    assert curve == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})  # pass@N: 1 of 3 singletons, 2 of 3 pairs
    votes = selection_curve(lambda s: vote_credit([answers[i] for i in s], [correct[i] for i in s]), 3, 64,
                            random.Random(0))
    # pairs: {3,4} tie (0.5), {3,4} tie (0.5), {4,4} (0): 1/3; all three: 4 wins
    assert votes == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 0.0})
    rerank = selection_curve(lambda s: best_score_credit([scores[i] for i in s], [correct[i] for i in s]), 3, 64,
                             random.Random(0))
    # pairs: (0,1) -> 1 (0.9, wrong), (0,2) -> 0 (0.8, right), (1,2) -> 1 (wrong): 1/3
    assert rerank == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 0.0})


# --- the kind end to end --------------------------------------------------------------------------------------

DIGITS = [str(d) for d in range(4)]
TEXTS = ["<think> 1 plus 2 is 3 , 3 minus 1 is 2 </think> <answer> 2 </answer>", "what is 0 plus 1 and 3 minus 2"]


def tiny_verifier(root: Path, kind: str, name: str) -> Path:
    """A tiny scalar-head model saved as an ORM (`outcome`) or PRM (`process`, steps split at " , ")."""
    base = tiny_model(TEXTS, root / f"{name}_base")
    tokenizer = load_tokenizer(str(base))
    model = load_scalar_head_model(str(base), tokenizer.pad_token_id)
    model.config.update(verifier_config(kind, " , "))
    save(model, tokenizer, root / name)
    return root / name


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("best_of_n")
    rng = random.Random(0)
    problems = [{"prompt": f"what is {a} plus {b}", "answer": str((a + b) % 4)}
                for a, b in ((rng.randrange(4), rng.randrange(4)) for _ in range(6))]
    write_jsonl(problems, root / "problems.jsonl")
    return {"policy": str(tiny_model(TEXTS, root / "policy")), "prompts": str(root / "problems.jsonl"),
            "verifier": str(tiny_verifier(root, "outcome", "orm")), "prm": str(tiny_verifier(root, "process", "prm"))}


# a random tiny policy writes words and digits; its last digit is its answer (lenient), right ~1 time in 4
PARAMS = {"n": 8, "max_new_tokens": 6, "temperature": 1.0, "draws": 16, "mode": "lenient",
          "verifier_reward": "math_verify", "verifier_reward_params": {"mode": "lenient"}}
SCORERS = ["pass1", "majority", "orm", "prm_min", "prm_prod", "prm_last", "oracle"]


def test_best_of_n_curves_from_a_policy_an_orm_and_a_prm(setup, tmp_path):
    metrics, _ = run_kind("best_of_n", tmp_path, setup, **PARAMS)
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert list(curves) == SCORERS
    for name, curve in curves.items():
        assert list(curve) == ["1", "2", "4", "8"]
        for n, value in curve.items():
            assert metrics[f"{name}_n{n}"] == value and 0.0 <= value <= 1.0
        assert metrics[name] == curve["8"]
        assert curve["1"] == pytest.approx(curves["pass1"]["1"])  # choosing among 1 candidate is that candidate
        assert all(curves["oracle"][n] >= value - 1e-12 for n, value in curve.items())
    assert curves["oracle"]["8"] > curves["pass1"]["8"] > 0  # some problems solved by some samples, not all
    assert metrics["problems"] == 6

    samples = load_rows(DataInput(path=str(tmp_path / "samples.jsonl")))
    assert len(samples) == 6 * 8 and all(0 <= s["orm_score"] <= 1 for s in samples)
    assert all(len(s["prm_step_scores"]) == len([p for p in s["completion"].split(" , ") if p.strip()])
               for s in samples)
    problems = [samples[i:i + 8] for i in range(0, 48, 8)]
    # at N = N_max the only subset is every sample: the curves' ends recomputed from samples.jsonl
    assert metrics["pass1"] == pytest.approx(statistics.fmean(s["correct"] for s in samples))
    assert metrics["oracle"] == pytest.approx(statistics.fmean(any(s["correct"] for s in p) for p in problems))
    assert metrics["majority"] == pytest.approx(statistics.fmean(
        vote_credit([s["answer"] for s in p], [s["correct"] for s in p]) for p in problems))
    assert metrics["orm"] == pytest.approx(statistics.fmean(
        best_score_credit([s["orm_score"] for s in p], [s["correct"] for s in p]) for p in problems))
    assert metrics["prm_min"] == pytest.approx(statistics.fmean(
        best_score_credit([min(s["prm_step_scores"], default=0.0) for s in p], [s["correct"] for s in p])
        for p in problems))
    assert all(s["correct"] == (s["answer"] == s["reference"]) for s in samples)  # one digit each

    alone, _ = run_kind("best_of_n", tmp_path / "alone", {k: setup[k] for k in ("policy", "prompts")},
                        **PARAMS, aggregations=["min"])
    assert {k for k in alone if not k.endswith(tuple(f"_n{n}" for n in (1, 2, 4, 8)))} == \
        {"pass1", "majority", "oracle", "problems", "answered_rate"}  # no verifier, no PRM: no curves of theirs
    # same seed, same samples and subsets: the verifiers change only their own curves
    assert {k: v for k, v in metrics.items() if k in alone} == alone


def test_a_prm_is_refused_where_an_outcome_verifier_is_expected(setup, tmp_path):
    with pytest.raises(ValueError, match="is a process verifier, not an outcome one"):
        run_kind("best_of_n", tmp_path, setup | {"verifier": setup["prm"]}, **PARAMS)


def test_params_check_the_aggregations_and_the_reward():
    from stages.kinds.best_of_n import Params

    with pytest.raises(ValueError, match="unknown step aggregation 'mean'"):
        Params(aggregations=["mean"])
    with pytest.raises(ValueError, match="no parameter"):
        Params(verifier_reward="accuracy", verifier_reward_params={"mode": "strict"})
    assert math.isclose(Params().temperature, 0.7) and Params().aggregations == ["min", "prod", "last"]
