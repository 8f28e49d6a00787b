"""Pretrain the embedded tiny base model: build a word-level tokenizer (with chat template) and a small Llama from
a config, then train next-token prediction on a plain-text corpus. Real pipelines skip this and set `model:`.

Params, inputs and outputs: stages/kinds/pretrain.py.
"""

from __future__ import annotations

import torch

from stages.context import StageContext
from stages.evaluation import lm_loss
from stages.kinds.pretrain import Params
from stages.models import DTYPES, build_tiny_llama, build_word_tokenizer
from stages.text import encode_text, text_lm_loss
from stages.training import prepare_optimization, save_model, steps_per_epoch, train_epochs


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    texts = [r["text"] for r in ctx.rows("corpus")]
    extra = [v for r in ctx.rows("vocab") for v in r.values() if isinstance(v, str)] if ctx.has("vocab") else []
    tokenizer = build_word_tokenizer(texts + extra)
    model = build_tiny_llama(len(tokenizer), p.hidden_size, p.layers, p.heads, p.max_positions,
                             tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if p.dtype == "bfloat16":
        model = model.to(DTYPES[p.dtype])
    n_parameters = sum(t.numel() for t in model.parameters())  # before FSDP shards them
    opt = prepare_optimization(ctx, model, p.lr, p.epochs * steps_per_epoch(ctx, len(texts), p.batch_size))

    predicted = [len(encode_text(tokenizer, t)) - 1 for t in texts]

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = text_lm_loss(opt.model, tokenizer, [texts[i] for i in ids.tolist()])
        return loss, {"loss": loss.item()}

    def weigh(ids: torch.Tensor) -> float:  # the loss is a mean over the predicted tokens
        return sum(predicted[i] for i in ids.tolist())

    train_epochs(ctx, opt, len(texts), p.batch_size, p.epochs, loss_fn, weigh)
    save_model(ctx, opt.model, tokenizer)
    metrics = {"parameters": n_parameters, "vocab_size": len(tokenizer)}
    if ctx.has("lm_eval"):
        eval_texts = [r["text"] for r in ctx.rows("lm_eval")]
        with torch.no_grad():
            metrics["lm_eval_loss"] = lm_loss(opt.model, tokenizer, eval_texts, p.micro_batch_size)
    return metrics
