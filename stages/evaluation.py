"""Held-out evaluation of a policy, by evaluator name (the `evaluator` param in pipelines.yaml).

An evaluator maps (eval rows, sampled completions) to metrics (a built-in of `EVALUATORS`, or a user's own
function named by import path); every policy-producing stage runs the same one so
stages are comparable in MLflow and metrics.json.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.multiturn import ToolUse, multi_turn_sample
from stages.registry import EVALUATORS
from stages.text import RolloutEngine, encode_text, sample, text_lm_loss


def evaluate_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                    evaluator: str, max_new_tokens: int, samples_per_prompt: int = 2,
                    temperature: float = 1.0, engine: RolloutEngine | None = None,
                    tools: ToolUse | None = None) -> dict[str, float]:
    """Sample `samples_per_prompt` completions per held-out prompt (with `engine`, default hf; with `tools`,
    multi-turn, the tools answering each call, `max_new_tokens` counting their text too) and score them with the
    named evaluator; with tools, the tool counts per sample (`tool_calls_per_sample`, …) come along."""
    repeated = [r for r in rows for _ in range(samples_per_prompt)]
    prompts = [r["prompt"] for r in repeated]
    if tools is None:
        completions = sample(model, tokenizer, prompts, max_new_tokens, temperature, what="evaluating",
                             engine=engine).completions
        return EVALUATORS.load(evaluator)(repeated, completions)
    turns = multi_turn_sample(model, tokenizer, prompts, repeated, tools.toolbox, tools.max_turns, max_new_tokens,
                              temperature, engine, what="evaluating")
    return {**EVALUATORS.load(evaluator)(repeated, turns.completions), **turns.counts()}


@torch.no_grad()
def lm_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
            batch_size: int = 64) -> float:
    """Mean next-token cross-entropy per token over plain texts (see `text_lm_loss`)."""
    was_training = model.training
    model.eval()
    total = sum(text_lm_loss(model, tokenizer, texts[s:s + batch_size], reduction="sum").item()
                for s in range(0, len(texts), batch_size))
    model.train(was_training)
    return total / max(sum(len(encode_text(tokenizer, t)) - 1 for t in texts), 1)
