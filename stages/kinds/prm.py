"""Process reward model (PRM; Lightman et al. 2023, Math-Shepherd): a scalar head trained with binary cross-entropy
at the end of each step of a solution to predict whether the solution is still correct there.

Declared here (what pipelines.yaml may set); how it works: stages/runs/prm.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from stages.kinds import Input
from stages.params import LoraTrainingParams

STEPWISE = ("prompt", "completions", "labels")  # TRL's stepwise PRM format (e.g. trl-lib/math_shepherd, prm800k)


class Params(LoraTrainingParams):
    epochs: PositiveInt = 2  # passes over the labelled solutions
    batch_size: PositiveInt = 32  # solutions per optimiser step, global across processes
    lr: float = Field(5e-4, gt=0)  # AdamW learning rate
    step_separator: str = Field("\n", min_length=1)  # follows each step in the layout; saved with the model
    labels: Literal["hard", "soft"] = "hard"  # BCE targets: `labels` (bool) or Math-Shepherd's `soft_labels` (share)
    max_length: PositiveInt | None = None  # prompt + steps tokens kept (whole trailing steps dropped); None: context


INPUTS = {
    "base": Input("model to initialise from (a policy or SFT checkpoint; LoRA adapters on it: params.lora)",
                  required=False, model=True),
    "data": Input("stepwise solutions {prompt, completions: [steps], labels: [bool]} (+ soft_labels: [float] for "
                  "labels: soft), as label_steps writes them and TRL's PRM datasets hold them", columns=STEPWISE),
    "eval_data": Input("held-out stepwise solutions for the step and first-error metrics", required=False,
                       columns=STEPWISE),
}
OUTPUTS = {"model": "model"}  # loads with stages.verifiers.load_verifier(path, expected="process")
KEY_METRICS = ("eval_step_accuracy", "eval_first_error_f1", "eval_step_auc")  # `rl4llm compare` shows these

run = "stages.runs.prm:run"  # what a stage of this kind does
