"""GRPO (DeepSeekMath, Shao et al. 2024, §4) with the Dr.GRPO (Liu et al. 2025) and DAPO (Yu et al. 2025) options:
the RL stage of DeepSeek-R1-Zero and DeepSeek-R1 (DeepSeek-AI 2025), readable top to bottom.

Each iteration:
  1. roll out: G samples for each of a batch of prompts from π_old. DAPO dynamic sampling drops the groups whose
     rewards are all equal (they carry no gradient) and samples again until the batch is full, at most
     `max_sampling_rounds` rounds. With `tools`, each sample is a multi-turn rollout (stages/multiturn.py): the
     policy's tool calls are answered in `<information>` text it did not write, which the loss, the KL term, the
     entropy and the response length leave out (Search-R1's retrieved-token masking);
  2. score: rewards chosen by name with weights — rule rewards (accuracy, format, language consistency, overlong),
     a trained reward model and/or an LLM judge (stages/judge.py) — optionally routed by a dataset column (R1's
     secondary round: reasoning rows get the rules, general rows the reward model); with process supervision, each
     response's steps are scored too, by a rule over its tokens or by a trained PRM (stages/process_rewards.py);
  3. advantages: outcome supervision, (r − mean_G) / (std_G + eps) given to every token (`grpo`; `drgrpo` drops the
     std), or process supervision: each response's step rewards, then its outcome reward as a last step ending on
     its last token, normalised over all steps of the group, A_t = sum of the normalised rewards of the steps ending
     at or after t;
  4. update: μ = `ppo_epochs` passes over shuffled minibatches of the token-level clipped surrogate with ratio
     bounds [1 − clip_low, 1 + clip_high] (DAPO clip-higher) plus β·KL(π‖π_ref) inside the loss (k3 estimator),
     aggregated by `loss_agg_mode`; DAPO overlong filtering masks out truncated samples (`mask_truncated`).

Params, inputs and outputs: stages/kinds/grpo.py.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Iterable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from stages.algorithms import (ADVANTAGE_ESTIMATORS, aggregate_loss, aggregation_size, groups_with_signal, kl_penalty,
                               masked_mean, outcome_token_rewards, ppo_policy_loss, process_supervision_advantages,
                               truncated_importance_weights)
from stages.context import StageContext
from stages.distributed import (check_divisible, full_parameters, gather_list, global_means, local_rows, seed_sampling,
                                shard)
from stages.judge import JUDGE_REWARD, Ask, JudgeReward, served_judge
from stages.kinds.grpo import MODEL_REWARD, PRM_STEP_REWARD, Params
from stages.loop import TrainingLoop, at_step, check_finite
from stages.models import last_token_scores, load_policy, load_scalar_head_model, load_tokenizer, reward_bias
from stages.multiturn import MultiTurnSamples, multi_turn_sample
from stages.process_rewards import StepSource, prm_steps, rule_steps, step_metrics
from stages.registry import STEP_REWARDS, VERIFIER_REWARDS
from stages.rewards import RewardError, RewardFn, Scorer, build_reward, reward_model_reward, routed_reward
from stages.rollout import logprob_gap, stage_engine, wants_logprobs
from stages.text import (RolloutEngine, batched, check_prompts_fit, context_length, count_long_prompts, encode_prompt,
                         encode_response, logprob_rows, pair_batch, response_logprobs, response_logprobs_and_entropy,
                         sample)
from stages.tool_params import stage_tools
from stages.tools import ToolBox
from stages.training import (as_initial, check_evaluation_fits, disable_dropout, evaluate, prepare_optimization,
                             reference_logprobs, rl_optimiser_steps, save_model, update_on_buffer)
from stages.verifiers import load_verifier

ROW_ID = "_row_id"  # the prompt's row index, carried with each sample (not a column the rewards see)


def reward_model_scorer(path: str, device: torch.device, micro_batch_size: int) -> Scorer:
    """`scorer(prompts, texts)`: the normalised score of a trained reward model on the last token, `micro_batch_size`
    rows per forward."""
    tokenizer = load_tokenizer(path)
    model = load_scalar_head_model(path, tokenizer.pad_token_id).eval().requires_grad_(False).to(device)
    bias = reward_bias(path)

    @torch.no_grad()
    def score(prompts: list[str], texts: list[str]) -> list[float]:
        scores = []
        for start in range(0, len(prompts), micro_batch_size):
            batch = pair_batch([encode_prompt(tokenizer, q) for q in prompts[start:start + micro_batch_size]],
                               [encode_response(tokenizer, t) for t in texts[start:start + micro_batch_size]],
                               tokenizer.pad_token_id).to(device)
            scores += last_token_scores(model, batch.ids, batch.attention_mask, bias).tolist()
        return scores

    return score


def model_judge(path: str, device: torch.device, p: Params) -> Ask:
    """`ask(questions)`: the greedy replies (at most `judge.max_new_tokens` tokens) of the causal LM at `path`, each
    question as a user turn of its chat template, `micro_batch_size` rows per `generate`; a question longer than
    the model's context keeps its end."""
    tokenizer = load_tokenizer(path)
    model = load_policy(path, p).eval().requires_grad_(False).to(device)
    context = context_length(model)
    room = None if context is None else max(context - p.judge.max_new_tokens, 1)

    def ask(questions: list[str]) -> list[str | None]:
        return sample(model, tokenizer, questions, p.judge.max_new_tokens, 0.0, p.micro_batch_size,
                      max_prompt_length=room, what="judging").completions

    return ask


def _no_reward(completions: list[str], **_: Any) -> list[float]:
    return [0.0] * len(completions)


def build_rewards(p: Params, scorer: Scorer | None, judge: JudgeReward | None = None) -> dict[str, RewardFn]:
    """The reward fns by name; with `route_column`, each one scores only the rows of the routes listing it."""
    reserved = {MODEL_REWARD: lambda: reward_model_reward(scorer, p.reward_model_score_on), JUDGE_REWARD: lambda: judge}
    fns = {name: reserved[name]() if name in reserved else build_reward(name, **p.reward_params.get(name, {}))
           for name in p.rewards}
    if not p.route_column:
        return fns
    return {name: routed_reward(p.route_column, {route: fn if name in names else _no_reward
                                                 for route, names in p.routes.items()})
            for name, fn in fns.items()}


def call_reward(label: str, name: str, fn: RewardFn, completions: list[str], columns: dict[str, list[Any]]
                ) -> list[float]:
    """`fn(completions, **columns)`, checked: one finite real number per completion, returned as floats.

    Errors name the stage `label`, the running step, the reward `name` as pipelines.yaml writes it
    (`my_rewards:brevity`) and the first bad completion: RewardError (bad input, the stage exits 2; the reward's own
    exception chained) when it raises or returns anything but one number per completion, NonFinite (exit 1) for
    NaN or ±inf.
    """
    where = at_step(label)
    try:
        values = fn(completions, **columns)
    except Exception as e:
        raise RewardError(f"{where}: reward '{name}' raised {type(e).__name__}: {e}") from e
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise RewardError(f"{where}: reward '{name}' returned {values!r:.60} ({type(values).__name__}), not a list "
                          f"of {len(completions)} numbers")
    values = list(values)
    if len(values) != len(completions):
        raise RewardError(f"{where}: reward '{name}' returned {len(values)} values for {len(completions)} "
                          "completions")
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real):
            raise RewardError(f"{where}: reward '{name}' returned {value!r:.60} ({type(value).__name__}) for "
                              f"completion {i}, not a number")
        check_finite(label, {f"reward '{name}' completion {i}": float(value)})
    return [float(v) for v in values]


def score(label: str, reward_fns: dict[str, RewardFn], weights: dict[str, float], completions: list[str],
          columns: dict[str, list[Any]]) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total Σ_k w_k r_k per completion, and each reward's values r_k (`call_reward`) by name."""
    components = {name: call_reward(label, name, fn, completions, columns) for name, fn in reward_fns.items()}
    total = [sum(weights[name] * values[i] for name, values in components.items()) for i in range(len(completions))]
    return total, components


def roll_out(policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], p: Params,
             reward_fns: dict[str, RewardFn], label: str, engine: RolloutEngine | None = None,
             step_source: StepSource | None = None, toolbox: ToolBox | None = None) -> list[dict[str, Any]]:
    """G scored samples for each row, group after group: {row, completion, response_ids, loss_mask (1 on the tokens
    the policy wrote, 0 on the tool text appended to a multi-turn response), reward, truncated, `reward_<name>` for
    each reward component, the engine's log-probs `engine_logprobs` when the rollout settings want them, with a
    `toolbox` the sample's tool counts `tools` and with a `step_source` the response's `steps` [(last token,
    reward)]}. `label` names the stage in errors."""
    repeated = [row for row in rows for _ in range(p.samples_per_prompt)]
    prompts = [row["prompt"] for row in repeated]
    if toolbox is None:
        logprobs = wants_logprobs(p.rollout)
        samples = sample(policy, tokenizer, prompts, p.max_new_tokens, p.temperature,
                         max_prompt_length=p.max_prompt_length, engine=engine, logprobs=logprobs)
        response_ids = [ids[:n] for ids, n in zip(samples.batch.response_ids.tolist(), samples.lengths)]
        engine_logprobs = [row[:len(ids)] for row, ids in zip(samples.engine_logprobs.tolist(), response_ids)] \
            if logprobs else [None] * len(response_ids)
        prompt_ids, masks, tools = samples.prompt_ids, [[1] * len(ids) for ids in response_ids], [None] * len(prompts)
        completions = samples.completions
    else:  # multi-turn: the tools' columns are the row's (not its row id)
        turns = multi_turn_sample(policy, tokenizer, prompts, [{k: v for k, v in row.items() if k != ROW_ID}
                                                               for row in repeated], toolbox, p.max_turns,
                                  p.max_new_tokens, p.temperature, engine, p.max_prompt_length)
        rollouts = turns.rollouts
        prompt_ids, response_ids = [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts]
        masks, tools, completions = [r.loss_mask for r in rollouts], rollouts, turns.completions
        engine_logprobs = [None] * len(response_ids)
    columns = {key: [row.get(key) for row in repeated] for key in repeated[0] if key != ROW_ID}
    columns["completion_length"] = [len(ids) for ids in response_ids]
    total, components = score(label, reward_fns, p.rewards, completions, columns)
    scored = [{"row": row, "completion": completion, "prompt_ids": prompt_ids[i], "response_ids": ids,
               "loss_mask": masks[i], "reward": total[i], "truncated": ids[-1:] != [tokenizer.eos_token_id],
               "engine_logprobs": engine_logprobs[i], "tools": tools[i],
               **{f"reward_{name}": values[i] for name, values in components.items()}}
              for i, (row, completion, ids) in enumerate(zip(repeated, completions, response_ids))]
    for s, steps in zip(scored, step_source(scored) if step_source else []):
        s["steps"] = steps
    return scored


def collect(ctx: StageContext, policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
            prompt_rows: list[dict[str, Any]], rng: random.Random, reward_fns: dict[str, RewardFn],
            step_source: StepSource | None = None, toolbox: ToolBox | None = None
            ) -> tuple[list[dict[str, Any]], int]:
    """One global rollout batch of up to `prompts_per_step` groups (every rank gets the same list), and the number
    of groups dropped.

    Each round draws the global prompts identically on every rank and each rank samples its share. With dynamic
    sampling (DAPO §3.2) groups whose rewards are all equal are dropped and fresh prompts are sampled until the
    global batch is full or `max_sampling_rounds` rounds have run. The batch keeps a multiple of the process count
    of groups, so the ranks' shares are equal.
    """
    p: Params = ctx.params
    acc, G = ctx.accelerator, p.samples_per_prompt
    kept: list[dict[str, Any]] = []
    dropped = 0
    with full_parameters(acc, policy) as model:
        for _ in range(p.max_sampling_rounds if p.dynamic_sampling else 1):
            rows = shard(rng.sample(prompt_rows, min(p.prompts_per_step, len(prompt_rows))), acc)
            samples = roll_out(model, tokenizer, rows, p, reward_fns, ctx.label, stage_engine(ctx), step_source,
                               toolbox)
            if p.dynamic_sampling:
                signal = groups_with_signal(torch.tensor([s["reward"] for s in samples]),
                                            torch.arange(len(samples)) // G)
                dropped += len(rows) - int(signal.sum()) // G
                samples = [s for s, keep in zip(samples, signal.tolist()) if keep]
            kept += samples
            if sum(gather_list([len(kept)], acc)) >= p.prompts_per_step * G:
                break
    groups = gather_list(kept, acc)[:p.prompts_per_step * G]
    usable = len(groups) // (G * acc.num_processes) * G * acc.num_processes
    return groups[:usable], sum(gather_list([dropped], acc))


def loss_mask(samples: list[dict[str, Any]], mask: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """The response mask [B, T], with truncated samples (no EOS within max_new_tokens) zeroed when `mask_truncated`
    (DAPO §3.4 overlong filtering: a cut-off answer is not judged on its reward)."""
    if not mask_truncated:
        return mask
    return mask * torch.tensor([not s["truncated"] for s in samples], dtype=mask.dtype, device=mask.device)[:, None]


def process_advantages(samples: list[dict[str, Any]], mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Process supervision (DeepSeekMath §4.1.3): each sample's `steps` [(last token, reward)] (a rule's or a PRM's),
    then a last step ending on its last token that scores its outcome `reward`, normalised over all steps of the
    group (`process_supervision_advantages`). Returns advantages [B, T]."""
    steps = [s["steps"] + [(len(s["response_ids"]) - 1, s["reward"])] for s in samples]
    shape = (len(steps), max(map(len, steps)))
    rewards, ends, valid = torch.zeros(shape), torch.zeros(shape, dtype=torch.long), torch.zeros(shape)
    for i, row in enumerate(steps):
        for j, (end, reward) in enumerate(row):
            rewards[i, j], ends[i, j], valid[i, j] = reward, end, 1.0
    device = mask.device
    return process_supervision_advantages(rewards.to(device), valid.to(device), ends.to(device), mask, group_ids)


def verifier(p: Params) -> str | None:
    """The reward whose values are the stage's `accuracy`: the first of its rewards that verifies answers."""
    return next((name for name in p.rewards if name in VERIFIER_REWARDS), None)


def rollout_metrics(samples: list[dict[str, Any]], p: Params) -> dict[str, float]:
    """Means over the batch: reward, each component (over the rows routed to it), truncation rate; `accuracy`
    (share scoring 1 by the stage's `verifier`, over its rows with an answer) and `format_rate` (the `format`
    reward) only when the stage uses such rewards."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    def routed_to(name: str) -> list[dict[str, Any]]:
        if not p.route_column:
            return samples
        return [s for s in samples if name in p.routes.get(s["row"].get(p.route_column), [])]

    metrics = {"reward": mean([s["reward"] for s in samples]),
               **{f"reward_{name}": mean([s[f"reward_{name}"] for s in routed_to(name)]) for name in p.rewards},
               "truncated": mean([s["truncated"] for s in samples])}
    judge = verifier(p)
    if judge:
        answered = [s for s in routed_to(judge) if s["row"].get("answer") is not None]
        metrics["accuracy"] = mean([float(s[f"reward_{judge}"] >= 1.0) for s in answered])
    if "format" in p.rewards:
        metrics["format_rate"] = metrics["reward_format"]
    return metrics


def tool_metrics(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Per sample, with tools: tool calls, the share calling one, invalid and failed calls, turns (none without)."""
    rollouts = [s["tools"] for s in samples if s["tools"] is not None]
    if not rollouts:
        return {}
    return MultiTurnSamples(rollouts, []).counts()


def check_reward_inputs(ctx: StageContext) -> None:
    """Each reward or step reward scored by an input, and that input, go together."""
    p: Params = ctx.params
    if (MODEL_REWARD in p.rewards) != ctx.has("reward"):
        raise ValueError(f"{ctx.stage}: the '{MODEL_REWARD}' reward and the `reward` input go together")
    if (p.step_reward == PRM_STEP_REWARD) != ctx.has("prm"):
        raise ValueError(f"{ctx.stage}: step_reward: {PRM_STEP_REWARD} and the `prm` input go together")
    if (JUDGE_REWARD in p.rewards) != (ctx.has("judge") or p.judge.url is not None):
        raise ValueError(f"{ctx.stage}: the '{JUDGE_REWARD}' reward and a judge (the `judge` input or judge.url) go "
                         "together")
    if ctx.has("judge") and p.judge.url is not None:
        raise ValueError(f"{ctx.stage}: the `judge` input and judge.url are two judges: give one")


def step_source(ctx: StageContext, tokenizer: PreTrainedTokenizerBase) -> tuple[StepSource | None, str]:
    """What scores each response's steps under `advantage: process` (None under outcome supervision), and the name
    its mean is logged under."""
    p: Params = ctx.params
    if p.step_reward == PRM_STEP_REWARD:
        prm = load_verifier(ctx.path("prm"), ctx.accelerator.device, p.micro_batch_size, expected="process")
        return prm_steps(prm, tokenizer), "prm_step_score"
    return (rule_steps(STEP_REWARDS.load(p.step_reward), tokenizer) if p.step_reward else None), "step_reward"


def judge_reward(ctx: StageContext) -> JudgeReward | None:
    """The `judge` reward, asking the `judge` input or the served judge at judge.url; None if not used."""
    p: Params = ctx.params
    if JUDGE_REWARD not in p.rewards:
        return None
    ask = served_judge(p.judge) if p.judge.url else model_judge(ctx.path("judge"), ctx.accelerator.device, p)
    return JudgeReward(ask, p.judge)


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    device = acc.device
    check_divisible("prompts_per_step", p.prompts_per_step, acc)
    check_reward_inputs(ctx)
    tools = stage_tools(ctx)
    toolbox = tools.toolbox if tools else None
    tokenizer = load_tokenizer(ctx.path("policy"))
    policy_model = load_policy(ctx.path("policy"), p)
    context = context_length(policy_model)
    prompt_rows = [{**row, ROW_ID: i} for i, row in enumerate(ctx.rows("prompts"))]
    # a prompt that leaves no room for the tokens sampled after it in the model's context is refused now
    check_prompts_fit(ctx, tokenizer, context, "prompts", "max_new_tokens", cut=True,
                      prompts={i: row["prompt"] for i, row in enumerate(prompt_rows)})
    check_evaluation_fits(ctx, tokenizer, context)
    keep_reference = p.kl_coef > 0 and p.lora is None  # with LoRA the reference is the policy with adapters off
    reference = load_policy(ctx.path("policy"), p).eval().requires_grad_(False).to(device) if keep_reference \
        else None
    scorer = reward_model_scorer(ctx.path("reward"), device, p.micro_batch_size) if ctx.has("reward") else None
    judge = judge_reward(ctx)
    reward_fns = build_rewards(p, scorer, judge)
    steps, step_metric = step_source(ctx, tokenizer)
    total_steps = rl_optimiser_steps(ctx, p.prompts_per_step // acc.num_processes * p.samples_per_prompt,
                                     p.minibatch_size, p.ppo_epochs, p.iterations)
    policy = prepare_optimization(ctx, policy_model, p.lr, total_steps)
    disable_dropout(policy.model)
    seed_sampling(ctx.seed, acc)

    initial = evaluate(ctx, policy.model, tokenizer, tools, p.eval_without_tools)
    truncated_prompts = count_long_prompts(tokenizer, [r["prompt"] for r in prompt_rows], p.max_prompt_length)
    rng = random.Random(ctx.seed)  # the same on every rank: it draws the global batch of prompts
    generator = torch.Generator().manual_seed(ctx.seed)
    loop = TrainingLoop(ctx, p.iterations, rngs=[rng, generator])
    loop.resume()
    for it in loop.steps():
        # 1-2. roll out and score (each rank its share), gathered: every rank holds the whole batch
        samples, dropped = collect(ctx, policy.model, tokenizer, prompt_rows, rng, reward_fns, steps, toolbox)
        judged = {"judge_unparsed": sum(gather_list([judge.take_unparsed()], acc))} if judge else {}
        if not samples:  # every sampled group was dropped: nothing to learn from
            loop.end_step(it, {"dropped_groups": dropped, **judged})
            continue
        metrics = {**rollout_metrics(samples, p), "dropped_groups": dropped, **judged, **tool_metrics(samples)}
        if steps:
            metrics |= step_metrics([s["steps"] for s in samples], step_metric)
        group_ids = torch.arange(len(samples), device=device) // p.samples_per_prompt
        # advantages are placed over whole responses; the loss then counts the policy's own tokens only
        full_mask = pair_batch([[]] * len(samples), [s["response_ids"] for s in samples],
                               tokenizer.pad_token_id).response_mask.float().to(device)
        model_mask = pair_batch([[]] * len(samples), [s["response_ids"] for s in samples], tokenizer.pad_token_id,
                                [s["loss_mask"] for s in samples]).response_mask.float()

        # 3. advantages, on the whole batch
        with torch.no_grad():
            if p.advantage == "process":
                advantages = process_advantages(samples, full_mask, group_ids)
            else:
                scores = torch.tensor([s["reward"] for s in samples], device=device)
                advantages, _ = ADVANTAGE_ESTIMATORS[p.advantage_estimator](
                    outcome_token_rewards(scores, full_mask), full_mask, group_ids=group_ids)

        # this rank's share of the groups: old and reference log-probs in eval mode, at the sampling temperature
        local = shard(samples, acc)
        loop.saw([s["row"][ROW_ID] for s in local[::p.samples_per_prompt]])
        batch = pair_batch([s["prompt_ids"] for s in local], [s["response_ids"] for s in local],
                           tokenizer.pad_token_id, [s["loss_mask"] for s in local]).to(device)
        mask = batch.response_mask.float()
        advantages = local_rows(acc, advantages, mask)
        response_loss_mask = loss_mask(local, mask, p.mask_truncated)
        # the engine's log-probs of the sampled tokens (another engine than the trainer: vLLM), if asked for
        engine_logp = None if local[0]["engine_logprobs"] is None else \
            logprob_rows([s["engine_logprobs"] for s in local], mask.shape[1]).to(device)
        # one optimiser step over the whole batch (μ = 1): π_old is the policy being differentiated, so its
        # log-probs are the step's own, detached (ratio 1), and need no forward pass of their own
        one_step = p.ppo_epochs == 1 and p.minibatch_size // acc.num_processes >= len(local)
        seen_old = torch.zeros_like(mask)  # with one_step: π_old's log-probs, as the update computes them
        with torch.no_grad():  # in micro-batches: memory is one micro-batch's
            policy.model.eval()
            old_logp = None if one_step else batched(
                lambda part: response_logprobs(policy.model, part, p.temperature), batch, p.micro_batch_size,
                "old log-probs")
            ref_logp = batched(lambda part: reference_logprobs(acc, policy.model, reference, part, p.temperature),
                               batch, p.micro_batch_size, "reference log-probs") if p.kl_coef > 0 else None
            policy.model.train()

        # 4. update: μ passes of clipped surrogate + β·KL to the reference, both aggregated by loss_agg_mode over a
        # micro-batch, which carries its share of the minibatch's tokens or sequences (`weigh`)
        def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            mb, mb_mask = batch.select(idx), response_loss_mask[idx]
            logp, entropy = response_logprobs_and_entropy(policy.model, mb, p.temperature)
            old = logp.detach() if old_logp is None else old_logp[idx]
            if engine_logp is not None and old_logp is None:
                seen_old[idx] = old
            tis = None if p.rollout.tis_cap is None or engine_logp is None else \
                truncated_importance_weights(old, engine_logp[idx], p.rollout.tis_cap)
            loss, pg_stats = ppo_policy_loss(logp, old, advantages[idx], mb_mask, p.clip_low,
                                             p.clip_high, p.agg_mode, p.max_new_tokens, tis)
            stats = {"pg_loss": loss.item(), **{k: v.item() for k, v in pg_stats.items()},
                     "entropy": masked_mean(entropy, mb_mask).item()}
            if ref_logp is not None:
                kl = kl_penalty(logp, ref_logp[idx], p.kl_estimator)
                loss = loss + p.kl_coef * aggregate_loss(kl, mb_mask, p.agg_mode, p.max_new_tokens)
                stats["kl"] = masked_mean(kl.detach(), mb_mask).item()
            return loss, stats

        def weigh(idx: torch.Tensor) -> float:
            return float(aggregation_size(response_loss_mask[idx], p.agg_mode))

        metrics |= update_on_buffer(ctx, len(local), p.minibatch_size, p.ppo_epochs, generator,
                                    [(policy, loss_fn, weigh)])
        if engine_logp is not None:  # how far the engine that sampled is from the trainer (π_old)
            metrics |= global_means(acc, logprob_gap(seen_old if old_logp is None else old_logp, engine_logp, mask))
        metrics["response_length"] = model_mask.sum(1).mean().item()  # the policy's tokens (no tool text)
        loop.end_step(it, metrics)

    final = {**evaluate(ctx, policy.model, tokenizer, tools, p.eval_without_tools),
             "truncated_prompts": truncated_prompts}
    save_model(ctx, policy.model, tokenizer)
    if toolbox and toolbox.first_failure:
        print(f"[{ctx.label}] {toolbox.failures} of {toolbox.calls} tool calls failed; first: {toolbox.first_failure}",
              flush=True)
    return {**final, **as_initial(initial)}
