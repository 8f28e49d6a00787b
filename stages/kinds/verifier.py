"""Outcome verifier (ORM, Cobbe et al. 2021): a scalar head trained with binary cross-entropy to predict whether a
solution is correct, at every token of it or at its last.

Declared here (what pipelines.yaml may set); how it works: stages/runs/verifier.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from stages.kinds import Input
from stages.params import LoraTrainingParams


class Params(LoraTrainingParams):
    epochs: PositiveInt = 2  # passes over the labelled solutions
    batch_size: PositiveInt = 32  # solutions per optimiser step, global across processes
    lr: float = Field(5e-4, gt=0)  # AdamW learning rate
    max_prompt_length: PositiveInt | None = None  # prompt tokens kept (cut from the left); None: all
    max_length: PositiveInt | None = None  # prompt + solution tokens kept (the end cut); None: all, up to the context
    loss_on: Literal["all_tokens", "last_token"] = "all_tokens"  # BCE at every solution token (Cobbe §4) or its EOS


INPUTS = {
    "base": Input("model to initialise from (a policy or SFT checkpoint; LoRA adapters on it: params.lora)",
                  required=False, model=True),
    "data": Input("labelled solutions {prompt, completion, label: bool} (label_outcomes; TRL's unpaired format)",
                  columns=("prompt", "completion", "label")),
    "eval_data": Input("held-out labelled solutions for eval_accuracy and eval_auc", required=False,
                       columns=("prompt", "completion", "label")),
}
OUTPUTS = {"model": "model"}  # loads with stages.verifiers.load_verifier(path, expected="outcome")
KEY_METRICS = ("eval_auc", "eval_accuracy")  # `rl4llm compare` shows these

run = "stages.runs.verifier:run"  # what a stage of this kind does
