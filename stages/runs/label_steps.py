"""Label each step of sampled solutions by Monte-Carlo continuations of its prefix (Math-Shepherd, Wang et al. 2024,
§3.3): the training data of a process reward model.

For every prompt, `samples_per_prompt` solutions are sampled from the policy and split into steps at
`step_separator` (`steps.split_steps`). After each step but the last, `completions_per_step` continuations are
sampled by the completer from the prompt and the solution's own tokens up to that step's end
(`steps.step_token_ends`), and each continued solution (prefix + continuation) is judged by the `verifier` reward.
A step's soft label is the share of its continuations that reach the right answer, its hard label whether any does
(`steps.math_shepherd_labels`); the last step's label is the solution's own correctness. A continuation completes
its solution within the solution's budget: at most `max_new_tokens` minus the prefix's tokens. The continuations of
`solutions_per_call` solutions go to the engine in one call (sampled with the largest budget among them, each then
cut to its own: sampling is token by token, so that is sampling with its own budget).

The completer is the policy unless a `completer` input is wired. The policy samples through the stage's rollout
engine (`rollout: {engine: vllm}` included), and so does a completer that is the policy; a separate completer
samples with transformers' `generate` in the stage (`hf`), from the prompt and the prefix's text encoded with its
own tokenizer.

Writes TRL's stepwise PRM format `{prompt, completions: [step texts], labels: [bool], soft_labels: [float], answer,
correct}` (correct: the solution's own correctness), split by prompt into train and held-out files, the prompts
taken in an order drawn from the seed (the held-out ones first). Each process labels its share of the prompts.
Deterministic given the seed.

Params, inputs and outputs: stages/kinds/label_steps.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages import data
from stages.chat import Prompt, held_out_prompts, prompt_key
from stages.context import StageContext
from stages.data import write_jsonl
from stages.distributed import gather_list, shard, write_trace
from stages.kinds.label_steps import Params
from stages.models import load_policy, load_tokenizer, sampling_policy
from stages.rewards import RewardFn, build_reward
from stages.rollout import stage_engine
from stages.steps import math_shepherd_labels, split_steps, step_token_ends
from stages.text import RolloutEngine, Samples, context_length, encode_prompt, sample, sample_ids


@dataclass
class Solution:
    row: dict[str, Any]  # its prompt row
    prompt_ids: list[int]  # the prompt as the policy saw it (cut to max_prompt_length)
    response_ids: list[int]  # its tokens (EOS included unless cut at max_new_tokens)
    steps: list[str]  # its decoded text split at the separator
    step_ends: list[int]  # the index in response_ids of each step's last token
    correct: bool  # the verifier's judgement of the whole solution


@dataclass
class Completer:
    """What samples the continuations: the model, its tokenizer, its engine (None: `hf_generate`)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    engine: RolloutEngine | None
    context: int | None


def step_labels(continuations_correct: list[list[bool]], solution_correct: bool) -> tuple[list[float], list[bool]]:
    """(soft, hard) labels of every step of a solution: Math-Shepherd's from the correctness of the continuations
    sampled after each step but the last (one list per such step), then the solution's own correctness for its last
    step (a finished solution needs no continuation)."""
    soft, hard = math_shepherd_labels(continuations_correct)
    return soft + [float(solution_correct)], hard + [solution_correct]


def judge(reward: RewardFn, completions: list[str], rows: list[dict[str, Any]], min_score: float) -> list[bool]:
    """Whether the verifier `reward`, given every column of each completion's prompt row, scores it at least
    `min_score`."""
    names = dict.fromkeys(key for row in rows for key in row)
    columns = {key: [row.get(key) for row in rows] for key in names}
    return [score >= min_score for score in reward(completions, **columns)]


def response_rows(samples: Samples) -> list[list[int]]:
    """Each sample's response token ids (EOS included when it ended)."""
    return [samples.batch.response_ids[i, :length].tolist() for i, length in enumerate(samples.lengths)]


def check_continuations_fit(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, context: int | None,
                            prompts: dict[int, Prompt], who: str) -> None:
    """Refuse at stage start a prompt (cut to max_prompt_length) that leaves no room in `who`'s context for a step
    prefix and its continuation sampled in one call: up to 2 · max_new_tokens − 2 tokens after it (a prefix is at
    most max_new_tokens − 1 tokens, the call's budget that of the shortest prefix)."""
    p: Params = ctx.params
    if not context:
        return
    after = max(p.max_new_tokens, 2 * p.max_new_tokens - 2)
    for i, prompt in prompts.items():
        length = min(len(encode_prompt(tokenizer, prompt)), p.max_prompt_length or context)
        if length + after > context:
            raise ValueError(f"{data.row_name(ctx.inputs['prompts'], i)}: a prompt of {length} tokens leaves no room "
                             f"in the {who}'s context (max_position_embeddings={context}) for a step prefix and its "
                             f"continuation ({after} tokens with max_new_tokens={p.max_new_tokens}); lower "
                             "max_new_tokens or set max_prompt_length")


def sample_solutions(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     rows: list[dict[str, Any]], reward: RewardFn) -> list[Solution]:
    """`samples_per_prompt` solutions of each row from the policy, split into steps and judged."""
    p: Params = ctx.params
    repeated = [row for row in rows for _ in range(p.samples_per_prompt)]
    samples = sample(model, tokenizer, [row["prompt"] for row in repeated], p.max_new_tokens, p.temperature,
                     max_prompt_length=p.max_prompt_length, engine=stage_engine(ctx))
    correct = judge(reward, samples.completions, repeated, p.min_score)
    responses = response_rows(samples)
    # the steps of the text `step_token_ends` splits (decoded as it decodes it), so that they pair up one to one
    texts = [tokenizer.decode(response, skip_special_tokens=True) for response in responses]
    return [Solution(row, prompt_ids, response, split_steps(text, p.step_separator),
                     step_token_ends(tokenizer, response, p.step_separator), ok)
            for row, prompt_ids, response, text, ok in zip(repeated, samples.prompt_ids, responses, texts, correct,
                                                           strict=True)]


def step_prefixes(solution: Solution, tokenizer: PreTrainedTokenizerBase, completer: Completer,
                  max_prompt_length: int | None) -> tuple[list[int], list[list[int]]]:
    """The completer's ids of the solution's prompt and of its prefix up to the end of each step but the last: the
    policy's own tokens when the completer is the policy, else the text encoded with the completer's tokenizer."""
    prefixes = [solution.response_ids[:end + 1] for end in solution.step_ends[:-1]]
    if completer.tokenizer is tokenizer:
        return solution.prompt_ids, prefixes
    own = completer.tokenizer
    prompt_ids = encode_prompt(own, solution.row["prompt"])[-(max_prompt_length or 0):]
    return prompt_ids, [own(tokenizer.decode(ids, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
                        for ids in prefixes]


def continue_steps(p: Params, solutions: list[Solution], tokenizer: PreTrainedTokenizerBase, completer: Completer,
                   reward: RewardFn) -> list[list[list[bool]]]:
    """For each solution, for each step but its last, whether each of its `completions_per_step` continuations
    reaches the right answer: every continuation of `solutions` sampled in one engine call."""
    rows, prefixes, owners = [], [], []
    for s, solution in enumerate(solutions):
        prompt_ids, step_ids = step_prefixes(solution, tokenizer, completer, p.max_prompt_length)
        for k, prefix in enumerate(step_ids):
            rows += [prompt_ids + prefix] * p.completions_per_step
            prefixes += [prefix] * p.completions_per_step
            owners += [(s, k)] * p.completions_per_step
    outcomes: list[list[list[bool]]] = [[[] for _ in solution.steps[:-1]] for solution in solutions]
    if not rows:
        return outcomes
    budgets = [max(p.max_new_tokens - len(prefix), 0) for prefix in prefixes]
    budget = max(max(budgets), 1)
    if completer.context:
        budget = min(budget, completer.context - max(map(len, rows)))
    if budget < 1:
        raise ValueError(f"a step prefix of {max(map(len, rows))} tokens (prompt included) fills the completer's "
                         f"context ({completer.context}); lower max_new_tokens or set max_prompt_length")
    samples = sample_ids(completer.model, completer.tokenizer, rows, budget, p.temperature,
                         what="continuing steps", engine=completer.engine)
    texts = [completer.tokenizer.decode(prefix + continuation[:own], skip_special_tokens=True).strip()
             for prefix, continuation, own in zip(prefixes, response_rows(samples), budgets, strict=True)]
    judged = judge(reward, texts, [solutions[s].row for s, _ in owners], p.min_score)
    for (s, k), ok in zip(owners, judged, strict=True):
        outcomes[s][k].append(ok)
    return outcomes


def stepwise_row(solution: Solution, continuations_correct: list[list[bool]]) -> dict[str, Any]:
    """The solution in TRL's stepwise format, with its soft labels, its answer and its own correctness."""
    soft, hard = step_labels(continuations_correct, solution.correct)
    return {"prompt": solution.row["prompt"], "completions": solution.steps, "labels": hard, "soft_labels": soft,
            "answer": solution.row.get("answer"), "correct": solution.correct}


def label_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Counts and label rates of the labelled solutions."""
    hard = [label for row in rows for label in row["labels"]]
    soft = [label for row in rows for label in row["soft_labels"]]
    return {"solutions": len(rows), "steps": len(hard), "mean_steps": len(hard) / max(len(rows), 1),
            "step_positive_rate": sum(hard) / max(len(hard), 1), "mean_soft_label": sum(soft) / max(len(soft), 1),
            "solutions_with_error": sum(not all(row["labels"]) for row in rows),
            "correct_rate": sum(row["correct"] for row in rows) / max(len(rows), 1)}


def open_completer(ctx: StageContext, p: Params) -> Completer | None:
    """The `completer` input, loaded on this rank's device, if wired (it samples with `hf_generate`)."""
    if not ctx.has("completer"):
        return None
    model = load_policy(ctx.path("completer"), p).to(ctx.accelerator.device)
    return Completer(model, load_tokenizer(ctx.path("completer")), None, context_length(model))


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    separate = open_completer(ctx, p)  # loaded before the policy seeds the sampling RNG
    model, tokenizer = sampling_policy(ctx, p)
    completer = separate or Completer(model, tokenizer, stage_engine(ctx), context_length(model))
    rows = ctx.rows("prompts")
    n_prompts = len(rows) if p.prompts is None else min(p.prompts, len(rows))
    ids = random.Random(ctx.seed).sample(range(len(rows)), n_prompts)  # the seed's order: the held-out ones first
    # a prompt that leaves no room for a solution, or a step prefix and its continuation, is refused now
    chosen = {i: rows[i]["prompt"] for i in ids}
    check_continuations_fit(ctx, tokenizer, context_length(model), chosen, "policy")
    if separate:
        check_continuations_fit(ctx, separate.tokenizer, separate.context, chosen, "completer")
    rows = [rows[i] for i in ids]
    write_trace(acc, f"{ctx.pipeline}.{ctx.stage}", shard(ids, acc))
    reward = build_reward(p.verifier, **p.verifier_params)
    solutions = [s for s in sample_solutions(ctx, model, tokenizer, shard(rows, acc), reward) if s.steps]
    labelled = []
    for start in range(0, len(solutions), p.solutions_per_call):
        chunk = solutions[start:start + p.solutions_per_call]
        labelled += [stepwise_row(solution, outcomes) for solution, outcomes
                     in zip(chunk, continue_steps(p, chunk, tokenizer, completer, reward))]
    labelled = gather_list(labelled, acc)
    held_out = held_out_prompts(rows, p.eval_fraction)
    evaluation = [row for row in labelled if prompt_key(row["prompt"]) in held_out]
    if acc.is_main_process:
        write_jsonl([row for row in labelled if prompt_key(row["prompt"]) not in held_out], ctx.outputs["train"])
        write_jsonl(evaluation, ctx.outputs["eval"])
    continued = sum(len(row["completions"]) - 1 for row in labelled) * p.completions_per_step
    return label_metrics(labelled) | {"eval_solutions": len(evaluation), "continuation_samples": continued,
                                      "empty_solutions": len(rows) * p.samples_per_prompt - len(labelled)}
