"""Distillation into a smaller student (DeepSeek-R1 §2.4): supervised fine-tuning on the teacher's reasoning traces,
as R1 does for its Qwen/Llama students, optionally plus token-level knowledge distillation (Hinton et al. 2015):
kd_coef · τ² · KL(p_teacher ‖ p_student) of the next-token distributions at temperature τ on the response tokens.
Token-level KD needs teacher and student to share a vocabulary.

Params, inputs and outputs: stages/kinds/distill.py.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.algorithms import distillation_loss
from stages.context import StageContext
from stages.kinds.distill import Params
from stages.models import load_policy, load_tokenizer
from stages.text import PairBatch, response_logits
from stages.training import fine_tune


def check_same_vocabulary(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    if student.get_vocab() != teacher.get_vocab():
        raise ValueError(f"token-level KD needs the teacher and student to share a vocabulary (student: "
                         f"{len(student)} tokens, teacher: {len(teacher)}, different maps); set kd_coef: 0 to "
                         f"distill by SFT on the traces alone")


def kd_loss(student: PreTrainedModel, teacher: PreTrainedModel, batch: PairBatch, temperature: float) -> torch.Tensor:
    """`distillation_loss` of the student's next-token logits towards the teacher's, on the response tokens (a
    mean over them, as the SFT loss it is added to)."""
    with torch.no_grad():
        teacher_logits = response_logits(teacher, batch)
    return distillation_loss(response_logits(student, batch), teacher_logits, batch.response_mask, temperature)


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    tokenizer = load_tokenizer(ctx.model_path("student"))
    student = load_policy(ctx.model_path("student"), p)
    teacher = None
    if p.kd_coef > 0:
        if not ctx.has("teacher"):
            raise ValueError(f"{ctx.stage}: kd_coef > 0 needs the `teacher` input")
        check_same_vocabulary(tokenizer, load_tokenizer(ctx.path("teacher")))
        teacher = load_policy(ctx.path("teacher"), p).eval().requires_grad_(False).to(acc.device)

    def kd_term(model: PreTrainedModel, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        kd = kd_loss(model, teacher, batch, p.kd_temperature)
        return p.kd_coef * kd, {"kd_loss": kd.item()}

    return fine_tune(ctx, student, tokenizer, ctx.rows("data"), kd_term if teacher is not None else None)
