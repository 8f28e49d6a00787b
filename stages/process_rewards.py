"""Process rewards on a policy's sampled tokens: each step of a response as (index of its last token, reward), from
a trained PRM (`prm_steps`) or a rule over the response's tokens (`rule_steps`); GRPO's process supervision
normalises them in the group (DeepSeekMath §4.1.3), PPO adds them to the token rewards at the step ends
(`step_token_rewards`; Math-Shepherd §4, step-by-step PPO).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from stages.chat import Prompt
from stages.steps import step_token_ends
from stages.verifiers import Verifier

Steps = list[tuple[int, float]]  # one response's steps: (index in its response ids of the step's last token, reward)
StepSource = Callable[[list[dict[str, Any]]], list[Steps]]  # samples {row, response_ids, …} -> each one's steps


def prm_step_rewards(verifier: Verifier, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt],
                     response_ids: list[list[int]]) -> list[Steps]:
    """The PRM's P(correct so far) of each step, at the policy token that ends the step.

    Each response is decoded once (special tokens skipped, `tokenizer` is the policy's) and that text is both what
    the PRM scores (`Verifier.step_scores`, split at the PRM's own separator, in its own tokenizer) and what
    `step_token_ends` maps back to the policy's tokens, so the two lists match step for step; a mismatch would be a
    bug in that pairing and raises RuntimeError rather than putting a score on another step's token."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    scores = verifier.step_scores(prompts, texts)
    steps = []
    for i, (ids, row) in enumerate(zip(response_ids, scores)):
        ends = step_token_ends(tokenizer, ids, verifier.separator)
        if len(ends) != len(row):
            raise RuntimeError(f"response {i}: the PRM scored {len(row)} steps but {len(ends)} end on the policy's "
                               f"tokens (separator {verifier.separator!r}): {texts[i][:200]!r}")
        steps.append(list(zip(ends, row)))
    return steps


def prm_steps(verifier: Verifier, tokenizer: PreTrainedTokenizerBase) -> StepSource:
    """Steps scored by a trained PRM (`prm_step_rewards`) for samples {row: {prompt}, response_ids}."""
    return lambda samples: prm_step_rewards(verifier, tokenizer, [s["row"]["prompt"] for s in samples],
                                            [s["response_ids"] for s in samples])


def rule_steps(rule: Callable[[list[str]], Steps], tokenizer: PreTrainedTokenizerBase) -> StepSource:
    """Steps scored by a rule over each response's tokens (a STEP_REWARDS entry, e.g. `arithmetic_steps`)."""
    return lambda samples: [rule(tokenizer.convert_ids_to_tokens(s["response_ids"])) for s in samples]


def step_token_rewards(steps: list[Steps], width: int) -> torch.Tensor:
    """Each response's step rewards at their last tokens (summed where two steps end on one token), 0 elsewhere:
    [B, width]."""
    rewards = torch.zeros(len(steps), width)
    for i, row in enumerate(steps):
        for end, reward in row:
            rewards[i, end] += reward
    return rewards


def step_metrics(steps: list[Steps], prefix: str) -> dict[str, float]:
    """`steps_per_sample` and `<prefix>_mean`, the mean step reward (0 with no step)."""
    rewards = [reward for row in steps for _, reward in row]
    return {"steps_per_sample": len(rewards) / max(len(steps), 1),
            f"{prefix}_mean": sum(rewards) / len(rewards) if rewards else 0.0}
