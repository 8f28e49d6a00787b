"""Sample K responses per prompt from a policy and rank them with a scripted labeler (InstructGPT's comparison data).

Declared here (what pipelines.yaml may set); how it works: stages/runs/label_preferences.py.
"""

from __future__ import annotations

from stages.kinds import Input
from stages.params import ModelParams, RolloutSettings
from stages.registry import LABELERS

Labeler = LABELERS.checked_name()


class Params(ModelParams, RolloutSettings):
    prompts: int = 600  # prompts to collect comparisons on (global: each process samples its share)
    responses_per_prompt: int = 4  # K responses ranked per prompt
    eval_fraction: float = 0.2  # share of the prompts written to `eval`
    max_new_tokens: int = 12  # response budget
    temperature: float = 1.0  # sampling temperature
    labeler: Labeler = "instruct_gold"  # the scripted ranker


INPUTS = {
    "policy": Input("model to sample responses from (InstructGPT: the SFT model)", model=True),
    "prompts": Input("prompts to collect comparisons on", columns=("prompt",)),
}
OUTPUTS = {"train": "train.jsonl", "eval": "eval.jsonl"}
KEY_METRICS = ("comparisons", "all_tied_fraction")  # `rl4llm compare` shows these

run = "stages.runs.label_preferences:run"  # what a stage of this kind does
