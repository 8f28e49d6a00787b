"""Offline preference optimisation against a frozen reference: DPO, IPO, cDPO and KTO.

Declared here (what pipelines.yaml may set); how it works: stages/runs/dpo.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.kinds import Input
from stages.params import LoraTrainingParams, PolicyEvalParams


class Params(LoraTrainingParams, PolicyEvalParams):
    loss: Literal["sigmoid", "ipo", "cdpo", "kto"] = "sigmoid"  # DPO (sigmoid), IPO, conservative DPO or KTO
    beta: float = Field(0.1, gt=0)  # β of DPO / cDPO / KTO; τ of IPO
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # cDPO's label-noise rate ε
    desirable_weight: float = Field(1.0, gt=0)  # KTO λ_D
    undesirable_weight: float = Field(1.0, gt=0)  # KTO λ_U
    epochs: int = 3  # passes over the preference pairs
    batch_size: int = 16  # pairs (KTO: examples) per step, global across processes
    lr: float = 1e-4  # AdamW learning rate
    max_new_tokens: int = 12  # sampled response length for the final KL
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    max_length: int | None = None  # prompt + completion tokens kept (the end cut); None: all, up to the model's context
    eval_fraction: float = Field(0.1, ge=0, lt=1)  # held-out share of the comparisons' prompts (no eval_comparisons)

    @model_validator(mode="after")
    def smoothing_only_for_cdpo(self) -> "Params":
        if (self.loss == "cdpo") != (self.label_smoothing > 0):
            raise ValueError("loss 'cdpo' needs 0 < label_smoothing < 0.5, and only 'cdpo' takes label_smoothing")
        return self


INPUTS = {
    "policy": Input("initial policy, also the frozen reference π_ref (the SFT model)", model=True),
    "comparisons": Input("preferences: {prompt, responses, ranks}, {prompt, chosen, rejected} or "
                         "{prompt, completion, label} (label true = desirable), as text or chat messages; chosen / "
                         "rejected conversations without a prompt column too", columns=("prompt",),
                         or_columns=("chosen", "rejected")),
    "eval_comparisons": Input("held-out preferences, same formats (default: `eval_fraction` of the comparisons' "
                              "prompts)", required=False, columns=("prompt",), or_columns=("chosen", "rejected")),
    "eval": Input("held-out prompts for the evaluator and the KL (default for the KL: the held-out comparisons' "
                  "prompts)", required=False, columns=("prompt",)),
    "lm_eval": Input("held-out plain text for an LM loss", required=False, columns=("text",)),
}
OUTPUTS = {"model": "model", "reference_logps": "reference_logps"}  # the pairs, with their stored reference log-probs
KEY_METRICS = ("gold_score", "eval_accuracy", "eval_margin", "kl")  # `rl4llm compare` shows these

run = "stages.runs.dpo:run"  # what a stage of this kind does
