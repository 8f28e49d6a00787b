"""Reward model: a scalar head on the last token, trained with the K-wise Bradley–Terry loss, then normalized.

Declared here (what pipelines.yaml may set); how it works: stages/runs/reward_model.py.
"""

from __future__ import annotations

from stages.kinds import Input
from stages.params import LoraTrainingParams


class Params(LoraTrainingParams):
    epochs: int = 4  # passes over the comparisons
    batch_size: int = 16  # prompts per optimiser step (each with all its K responses), global across processes
    lr: float = 5e-4  # AdamW learning rate
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    max_length: int | None = None  # prompt + response tokens kept (the end cut); None: all, up to the model's context


INPUTS = {
    "base": Input("model to initialise from (InstructGPT: the SFT model)", required=False, model=True),
    "comparisons": Input("ranked responses: {prompt, responses, ranks} or {prompt, chosen, rejected}, as text or "
                         "chat messages (TRL's preference formats, implicit prompt too)", columns=("prompt",),
                         or_columns=("chosen", "rejected")),
    "eval_comparisons": Input("held-out comparisons for eval_accuracy", required=False, columns=("prompt",),
                              or_columns=("chosen", "rejected")),
    "demos": Input("SFT demonstrations ({prompt, response} or chat {messages}); normalization makes their mean "
                   "reward 0", columns=("prompt", "response"), or_columns=("messages",)),
}
OUTPUTS = {"model": "model"}
KEY_METRICS = ("eval_accuracy", "train_accuracy")  # `rl4llm compare` shows these

run = "stages.runs.reward_model:run"  # what a stage of this kind does
