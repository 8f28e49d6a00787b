"""Supervised fine-tuning: next-token loss on the assistant's tokens only, chat template applied. Rows are
`{prompt, response}` or chat `{messages}` (multi-turn: every assistant turn is trained, the rest masked; a system
turn is kept as context).

Declared here (what pipelines.yaml may set); how it works: stages/runs/sft.py.
"""

from __future__ import annotations

from stages.kinds import Input
from stages.params import LoraTrainingParams, PolicyEvalParams


class Params(LoraTrainingParams, PolicyEvalParams):
    epochs: int = 3  # passes over the training rows
    batch_size: int = 32  # rows per optimiser step, global across processes
    lr: float = 1e-3  # AdamW learning rate
    holdout_fraction: float = 0.1  # share of the rows held out for `eval_loss`
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    max_length: int | None = None  # prompt + response tokens kept (the end cut); None: all, up to the model's context


INPUTS = {
    "base": Input("model to fine-tune (default: the pipeline's `model`)", required=False, model=True),
    "data": Input("demonstrations: {prompt, response} or chat {messages}", columns=("prompt", "response"),
                  or_columns=("messages",)),
    "eval": Input("held-out prompts for the evaluator", required=False, columns=("prompt",)),
    "lm_eval": Input("held-out plain text for an LM loss", required=False, columns=("text",)),
}
OUTPUTS = {"model": "model"}
KEY_METRICS = ("gold_score", "accuracy", "language_consistency", "eval_loss")  # `rl4llm compare` shows these

run = "stages.runs.sft:run"  # what a stage of this kind does
