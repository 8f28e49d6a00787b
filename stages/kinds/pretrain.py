"""Pretrain the embedded tiny base model: build a word-level tokenizer (with chat template) and a small Llama from
a config, then train next-token prediction on a plain-text corpus. Real pipelines skip this and set `model:`."""

from __future__ import annotations

import torch

from stages.context import StageContext
from stages.evaluation import lm_loss
from stages.kinds import Input, StageParams
from stages.models import build_tiny_llama, build_word_tokenizer
from stages.text import text_lm_loss
from stages.training import minibatches, save_model


class Params(StageParams):
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    max_positions: int = 128
    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3


INPUTS = {
    "corpus": Input("plain-text pretraining corpus", columns=("text",)),
    "lm_eval": Input("held-out corpus for the final LM loss", required=False, columns=("text",)),
    "vocab": Input("extra texts whose words join the vocabulary (every string column)", required=False),
}
OUTPUTS = {"model": "model"}


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    texts = [r["text"] for r in ctx.rows("corpus")]
    extra = [v for r in ctx.rows("vocab") for v in r.values() if isinstance(v, str)] if ctx.has("vocab") else []
    tokenizer = build_word_tokenizer(texts + extra)
    model = build_tiny_llama(len(tokenizer), p.hidden_size, p.layers, p.heads, p.max_positions,
                             tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr)
    model, optimizer = ctx.accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(ctx.seed)
    steps_per_epoch = -(-len(texts) // p.batch_size)
    total, step = p.epochs * steps_per_epoch, 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
    for _ in range(p.epochs):
        for idx in minibatches(len(texts), p.batch_size, generator):
            loss = text_lm_loss(model, tokenizer, [texts[i] for i in idx])
            ctx.accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            ctx.tracker.log(step, {"loss": loss.item()}, total)
    save_model(ctx, model, tokenizer)
    metrics = {"parameters": sum(t.numel() for t in model.parameters()), "vocab_size": len(tokenizer)}
    if ctx.has("lm_eval"):
        eval_texts = [r["text"] for r in ctx.rows("lm_eval")]
        metrics["lm_eval_loss"] = lm_loss(ctx.accelerator.unwrap_model(model), tokenizer, eval_texts)
    return metrics
