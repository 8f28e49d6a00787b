"""Label each step of sampled solutions by Monte-Carlo continuations of its prefix (Math-Shepherd, Wang et al. 2024):
the training data of a process reward model.

Declared here (what pipelines.yaml may set); how it works: stages/runs/label_steps.py.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from stages.kinds import Input
from stages.params import ModelParams, RolloutSettings
from stages.verifier_params import VerifierSettings


class Params(ModelParams, RolloutSettings, VerifierSettings):
    prompts: PositiveInt | None = None  # prompts sampled for (None: all; global: each process samples its share)
    samples_per_prompt: PositiveInt = 4  # solutions sampled per prompt
    completions_per_step: PositiveInt = 4  # N continuations sampled after each step prefix (Math-Shepherd's N)
    step_separator: str = Field("\n", min_length=1)  # what separates steps ("\n"; the embedded task's: " , ")
    max_new_tokens: PositiveInt = 24  # solution budget; a continuation completes its solution within it
    max_prompt_length: PositiveInt | None = None  # prompt tokens kept (cut from the left); None: all
    temperature: float = Field(1.0, gt=0)  # sampling temperature, of solutions and continuations
    eval_fraction: float = Field(0.2, ge=0, lt=1)  # share of the prompts (with all their solutions) written to `eval`
    solutions_per_call: PositiveInt = 64  # solutions per process whose continuations are sampled in one engine call


INPUTS = {
    "policy": Input("checkpoint sampling the solutions (Math-Shepherd: the generator)", model=True),
    "completer": Input("checkpoint sampling the continuations of each step prefix (default: the policy)",
                       required=False, model=True),
    "prompts": Input("problems with their reference `answer`; every column is passed to the verifier",
                     columns=("prompt", "answer")),
}
OUTPUTS = {"train": "train.jsonl", "eval": "eval.jsonl"}  # TRL's stepwise format {prompt, completions, labels}
KEY_METRICS = ("step_positive_rate", "mean_steps", "solutions_with_error")  # `rl4llm compare` shows these

run = "stages.runs.label_steps:run"  # what a stage of this kind does
