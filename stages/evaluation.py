"""Held-out evaluation of a policy, by evaluator name (the `evaluator` param in pipelines.yaml).

An evaluator maps (eval rows, sampled completions) to metrics; every policy-producing stage runs the same one so
stages are comparable in MLflow and metrics.json.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages import instruct_task, rewards
from stages.text import encode_text, prompt_text, sample, text_lm_loss

Evaluator = Callable[[list[dict[str, Any]], list[str]], dict[str, float]]


def instruct_gold(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """Mean hidden gold score of the embedded instruction task, and mean response length in words."""
    scores = [instruct_task.gold_score(prompt_text(r["prompt"]), c) for r, c in zip(rows, completions)]
    return {"gold_score": sum(scores) / len(scores),
            "mean_response_length": sum(len(c.split()) for c in completions) / len(completions)}


def reasoning(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """DeepSeek-R1 metrics on held-out problems (rows with `answer` and `language`): accuracy of the final answer,
    share following the `<think>…</think> <answer>…</answer>` template, language consistency of the chain of thought,
    and mean response length in words."""
    columns = {"answer": [r["answer"] for r in rows], "language": [r.get("language") for r in rows],
               "prompt": [r["prompt"] for r in rows]}
    metrics = {"accuracy": rewards.accuracy_reward(completions, **columns),
               "format_rate": rewards.format_reward(completions),
               "language_consistency": rewards.language_consistency_reward(completions, **columns),
               "mean_response_length": [len(c.split()) for c in completions]}
    return {name: sum(values) / len(values) for name, values in metrics.items()}


EVALUATORS: dict[str, Evaluator] = {"instruct_gold": instruct_gold, "reasoning": reasoning}


def evaluate_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                    evaluator: str, max_new_tokens: int, samples_per_prompt: int = 2,
                    temperature: float = 1.0) -> dict[str, float]:
    """Sample `samples_per_prompt` completions per held-out prompt and score them with the named evaluator."""
    repeated = [r for r in rows for _ in range(samples_per_prompt)]
    samples = sample(model, tokenizer, [r["prompt"] for r in repeated], max_new_tokens, temperature)
    return EVALUATORS[evaluator](repeated, samples.completions)


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
