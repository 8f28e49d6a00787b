"""Distillation into a smaller student (DeepSeek-R1 §2.4): supervised fine-tuning on the teacher's reasoning traces,
as R1 does for its Qwen/Llama students, optionally plus token-level knowledge distillation (Hinton et al. 2015):
kd_coef · τ² · KL(p_teacher ‖ p_student) of the next-token distributions at temperature τ on the response tokens.
Token-level KD needs teacher and student to share a vocabulary.

Declared here (what pipelines.yaml may set); how it works: stages/runs/distill.py.
"""

from __future__ import annotations

from stages.kinds import Input, sft


class Params(sft.Params):
    kd_coef: float = 0.0  # weight of the token-level KD term; 0: plain SFT on the traces
    kd_temperature: float = 1.0  # τ of the softened teacher and student distributions


INPUTS = {
    "student": Input("small base model to train (default: the pipeline's `model`)", required=False, model=True),
    "data": Input("teacher traces: {prompt, response} or chat {messages}", columns=("prompt", "response"),
                  or_columns=("messages",)),
    "teacher": Input("teacher model for token-level KD (kd_coef > 0)", required=False, model=True),
    "eval": Input("held-out prompts for the evaluator", required=False, columns=("prompt",)),
    "lm_eval": Input("held-out plain text for an LM loss", required=False, columns=("text",)),
}
OUTPUTS = {"model": "model"}
KEY_METRICS = ("accuracy", "format_rate", "language_consistency", "gold_score")  # `rl4llm compare` shows these

run = "stages.runs.distill:run"  # what a stage of this kind does
