"""Best-of-N evaluation (Lightman et al. 2023, Figure 3; Math-Shepherd, Figure 3).

Sample N_max solutions per held-out problem from a policy, judge each by the `verifier_reward` (correct: score >= 1),
read its final answer (`answer_of`, `mode`), score it with an outcome verifier (ORM) and the step scores of a process
reward model (PRM), if given. Then, per problem, the accuracy of choosing one of N candidates for N = 1, 2, 4, …,
N_max, each N averaged over subsets of the N_max samples (`selection.selection_curve`), by each scorer:

- `pass1`: one sample (the subset's share of correct samples; flat in N),
- `majority`: the most frequent answer (self-consistency; ties split the credit),
- `orm`: the highest ORM score; `prm_<agg>`: the highest PRM score aggregated over steps by `<agg>` (min, prod, last),
- `oracle`: any of the N is correct (pass@N, the ceiling of every selector).

Every scorer of a problem is evaluated on the same subsets, so at N = 1 each equals `pass1`. The curves are averaged
over problems.

Params, inputs and outputs: stages/kinds/best_of_n.py.
"""

from __future__ import annotations

import json
import random
import statistics
from typing import Any, Callable, Sequence

from stages.context import StageContext
from stages.data import write_jsonl
from stages.distributed import gather_list, shard, write_trace
from stages.kinds.best_of_n import Params
from stages.models import sampling_policy
from stages.rewards import answer_of, build_reward
from stages.rollout import stage_engine
from stages.selection import aggregate_steps, best_score_credit, selection_curve, vote_credit
from stages.text import check_prompts_fit, context_length, sample
from stages.verifiers import load_verifier

Credit = Callable[[Sequence[int]], float]  # indices of a subset of a problem's samples -> expected correctness


def scored_samples(ctx: StageContext, p: Params, rows: list[dict[str, Any]], completions: list[str]
                   ) -> list[dict[str, Any]]:
    """One record per sample: its prompt, completion, reference, correctness, answer and, when the verifier / PRM
    inputs are given, its ORM score and PRM step scores."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    judged = build_reward(p.verifier_reward, **p.verifier_reward_params)(completions, **columns)
    prompts = [row["prompt"] for row in rows]
    records = [{"prompt": row["prompt"], "completion": completion, "reference": row["answer"],
                "correct": score >= 1.0, "answer": answer_of(completion, row["answer"], p.mode)}
               for row, completion, score in zip(rows, completions, judged)]
    device = ctx.accelerator.device
    if ctx.has("verifier"):
        orm = load_verifier(ctx.path("verifier"), device, p.micro_batch_size, expected="outcome")
        for record, score in zip(records, orm.outcome_scores(prompts, completions)):
            record["orm_score"] = score
    if ctx.has("prm"):
        prm = load_verifier(ctx.path("prm"), device, p.micro_batch_size, expected="process")
        for record, scores in zip(records, prm.step_scores(prompts, completions)):
            record["prm_step_scores"] = scores
    return records


def scorer_credits(samples: list[dict[str, Any]], aggregations: list[str]) -> dict[str, Credit]:
    """{scorer: its credit of choosing among a subset of one problem's samples}: pass1, majority, orm (if the
    samples carry ORM scores), prm_<agg> for each aggregation (if they carry PRM step scores), oracle."""
    correct = [s["correct"] for s in samples]
    answers = [s["answer"] for s in samples]

    def rerank(scores: list[float]) -> Credit:
        return lambda chosen: best_score_credit([scores[i] for i in chosen], [correct[i] for i in chosen])

    credits: dict[str, Credit] = {
        "pass1": lambda chosen: statistics.fmean(correct[i] for i in chosen),
        "majority": lambda chosen: vote_credit([answers[i] for i in chosen], [correct[i] for i in chosen])}
    if "orm_score" in samples[0]:
        credits["orm"] = rerank([s["orm_score"] for s in samples])
    if "prm_step_scores" in samples[0]:
        credits |= {f"prm_{how}": rerank([aggregate_steps(s["prm_step_scores"], how) for s in samples])
                    for how in aggregations}
    credits["oracle"] = lambda chosen: float(any(correct[i] for i in chosen))
    return credits


def problem_curves(samples: list[dict[str, Any]], aggregations: list[str], draws: int, rng: random.Random
                   ) -> dict[str, dict[int, float]]:
    """{scorer: {N: expected accuracy}} for one problem's samples, every scorer on the same subsets."""
    start = rng.getstate()
    curves = {}
    for name, credit in scorer_credits(samples, aggregations).items():
        rng.setstate(start)  # the same subsets for every scorer: paired, and equal to pass1 at N = 1
        curves[name] = selection_curve(credit, len(samples), draws, rng)
    return curves


def mean_curves(per_problem: list[dict[str, dict[int, float]]]) -> dict[str, dict[int, float]]:
    """The curves averaged over problems."""
    return {name: {n: statistics.fmean(c[name][n] for c in per_problem) for n in curve}
            for name, curve in per_problem[0].items()}


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    model, tokenizer = sampling_policy(ctx, p)
    rows = ctx.rows("prompts")
    rng = random.Random(ctx.seed)  # the problems evaluated, then the subsets each N is averaged over
    ids = list(range(len(rows))) if p.prompts is None else sorted(rng.sample(range(len(rows)),
                                                                             min(p.prompts, len(rows))))
    # a prompt that leaves no room for the tokens sampled after it in the model's context is refused now
    check_prompts_fit(ctx, tokenizer, context_length(model), "prompts", "max_new_tokens", cut=True,
                      prompts={i: rows[i]["prompt"] for i in ids})
    local_ids = shard(ids, acc)  # each rank samples and scores its problems' N_max solutions
    write_trace(acc, f"{ctx.pipeline}.{ctx.stage}", local_ids)
    repeated = [rows[i] for i in local_ids for _ in range(p.n)]
    completions = sample(model, tokenizer, [row["prompt"] for row in repeated], p.max_new_tokens, p.temperature,
                         max_prompt_length=p.max_prompt_length, engine=stage_engine(ctx)).completions
    samples = gather_list(scored_samples(ctx, p, repeated, completions), acc)
    problems = [samples[i:i + p.n] for i in range(0, len(samples), p.n)]
    curves = mean_curves([problem_curves(problem, p.aggregations, p.draws, rng) for problem in problems])
    if acc.is_main_process:
        write_jsonl(samples, ctx.outputs["samples"])
        ctx.outputs["curves"].write_text(json.dumps(curves, indent=2))
    metrics = {f"{name}_n{n}": value for name, curve in curves.items() for n, value in curve.items()}
    metrics |= {name: curve[p.n] for name, curve in curves.items()}
    return metrics | {"problems": len(problems), "answered_rate": statistics.fmean(
        s["answer"] is not None for s in samples)}
