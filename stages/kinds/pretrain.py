"""Pretrain the embedded tiny base model: build a word-level tokenizer (with chat template) and a small Llama from
a config, then train next-token prediction on a plain-text corpus. Real pipelines skip this and set `model:`.

Declared here (what pipelines.yaml may set); how it works: stages/runs/pretrain.py.
"""

from __future__ import annotations

from stages.kinds import Input
from stages.params import LRScheduler, OptimParams


class Params(OptimParams):
    hidden_size: int = 64  # width of the tiny Llama
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads
    max_positions: int = 128  # context length
    epochs: int = 2  # passes over the corpus
    batch_size: int = 64  # texts per optimiser step, global across processes
    lr: float = 3e-3  # AdamW peak learning rate
    lr_scheduler: LRScheduler = "linear"  # decays to 0 over the run


INPUTS = {
    "corpus": Input("plain-text pretraining corpus", columns=("text",)),
    "lm_eval": Input("held-out corpus for the final LM loss", required=False, columns=("text",)),
    "vocab": Input("extra texts whose words join the vocabulary (every string column)", required=False),
}
OUTPUTS = {"model": "model"}
KEY_METRICS = ("lm_eval_loss",)  # `rl4llm compare` shows these

run = "stages.runs.pretrain:run"  # what a stage of this kind does
