"""Supervised fine-tuning: next-token loss on the assistant's tokens only, chat template applied. Rows are
`{prompt, response}` or chat `{messages}` (multi-turn: every assistant turn is trained, the rest masked; a system
turn is kept as context).

`batch_size` is global: with N processes each rank takes a disjoint `batch_size / N` share of every global batch
(split again into micro-batches of at most `micro_batch_size` rows, each weighted by its share of the batch's
response tokens), so an N-process run takes the 1-process run's steps.

Params, inputs and outputs: stages/kinds/sft.py.
"""

from __future__ import annotations


from stages.context import StageContext
from stages.kinds.sft import Params
from stages.models import load_policy, load_tokenizer
from stages.training import fine_tune


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    return fine_tune(ctx, load_policy(ctx.model_path("base"), p), load_tokenizer(ctx.model_path("base")),
                     ctx.rows("data"))
