"""Choosing one of N sampled solutions (best-of-N): majority voting (self-consistency, Wang et al. 2023), reranking
by an outcome verifier (Cobbe et al. 2021) or by a process reward model's step scores aggregated by name (Lightman et
al. 2023: `prod`, `min`; Math-Shepherd: `min`; `last`), and the accuracy-vs-N curves of Lightman et al.'s Figure 3.

Pure Python. Selection is credited in expectation: when several candidates tie (equal votes or equal scores), a
uniformly random tie-break is assumed and the selection scores the share of tied candidates that are correct.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from typing import Callable, Sequence

from stages.rewards import normalize_answer, parse_number

# step scores (each in [0, 1]) -> the solution's score
STEP_AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": lambda scores: min(scores, default=0.0),  # the weakest step
    "prod": lambda scores: math.prod(scores) if scores else 0.0,  # every step correct, steps independent
    "last": lambda scores: scores[-1] if scores else 0.0,  # the score after the whole solution
}


def aggregate_steps(scores: Sequence[float], how: str) -> float:
    """A solution's score from its step scores by aggregation `how` (`STEP_AGGREGATIONS`); 0.0 with no steps."""
    if how not in STEP_AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {how!r}; allowed: {', '.join(STEP_AGGREGATIONS)}")
    return float(STEP_AGGREGATIONS[how](list(scores)))


def canonical_answer(answer: str | None) -> str | None:
    """The key majority voting groups answers by: a number's exact value ("0.5", "1/2" and "\\frac{1}{2}" vote
    together), else the answer with whitespace collapsed; None (no vote) for no answer."""
    if answer is None or not answer.strip():
        return None
    normalized = normalize_answer(answer)
    value = parse_number(normalized)
    return str(value) if value is not None else " ".join(normalized.split())


def vote_credit(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """Majority voting's expected correctness: the most frequent answer (by `canonical_answer`) wins; with several
    tied, each is chosen with equal probability. Candidates without an answer do not vote; 0.0 if none has one."""
    keys = [canonical_answer(a) for a in answers]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [k for k, n in votes.items() if n == top]
    # an answer is correct or not whatever sample carries it: any sample with the key tells
    return sum(next(ok for k, ok in zip(keys, correct) if k == w) for w in winners) / len(winners)


def best_score_credit(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """Reranking's expected correctness: the candidate with the highest score is chosen; among tied ones, each
    with equal probability."""
    top = max(scores)
    tied = [ok for s, ok in zip(scores, correct) if s == top]
    return sum(tied) / len(tied)


def subsets(n_max: int, n: int, draws: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Index subsets of size `n` of N_max candidates to average a selection over: all of them when there are at
    most `draws`, else `draws` drawn without replacement within each (Lightman et al. average best-of-N over
    subsamples of their N_max samples)."""
    if math.comb(n_max, n) <= draws:
        return list(itertools.combinations(range(n_max), n))
    return [tuple(sorted(rng.sample(range(n_max), n))) for _ in range(draws)]


def sizes_up_to(n_max: int) -> list[int]:
    """N = 1, 2, 4, … up to and including `n_max`."""
    sizes = [2 ** k for k in range(n_max.bit_length()) if 2 ** k < n_max]
    return sizes + [n_max]


def selection_curve(credit: Callable[[Sequence[int]], float], n_max: int, draws: int, rng: random.Random
                    ) -> dict[int, float]:
    """{N: the mean credit of selecting among N candidates} for one problem's N_max candidates: `credit(indices)`
    scores choosing among the candidates at `indices`."""
    return {n: sum(credit(s) for s in chosen) / len(chosen)
            for n in sizes_up_to(n_max) for chosen in [subsets(n_max, n, draws, rng)]}
