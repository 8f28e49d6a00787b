"""Keep the prompts a rule ranks highest: here the shortest, as a curriculum's first round would.

A stage kind is a module that declares `Params` (a `StageParams`; each field's comment is its description),
`INPUTS`, `OUTPUTS` (paths inside the stage's directory) and `run(ctx)`, which writes the outputs and returns the
stage's metrics. `KEY_METRICS` (optional) is what `rl4llm compare` shows of it.
"""

from __future__ import annotations

from pydantic import Field

from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import Input, StageParams


class Params(StageParams):
    keep: float = Field(0.5, gt=0, le=1)  # share of the rows kept
    column: str = "prompt"  # the text whose length ranks a row (shorter first)


INPUTS = {"rows": Input("rows to filter", columns=("prompt",))}
OUTPUTS = {"rows": "rows.jsonl"}
KEY_METRICS = ("kept", "mean_words")


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    rows = ctx.rows("rows")
    ranked = sorted(rows, key=lambda row: len(str(row[p.column]).split()))
    kept = ranked[:max(1, round(p.keep * len(rows)))]
    write_jsonl(kept, ctx.outputs["rows"])
    return {"kept": len(kept), "mean_words": sum(len(str(r[p.column]).split()) for r in kept) / len(kept)}
