"""Sample N solutions per problem from a policy and label each correct or not by a verifier reward: the training
data of an outcome verifier (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems").

Declared here (what pipelines.yaml may set); how it works: stages/runs/label_outcomes.py.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from stages.kinds import Input
from stages.params import ModelParams, RolloutSettings
from stages.verifier_params import VerifierSettings


class Params(ModelParams, RolloutSettings, VerifierSettings):
    prompts: PositiveInt | None = None  # prompts sampled for (None: all; global: each process samples its share)
    samples_per_prompt: PositiveInt = 8  # N solutions sampled per prompt
    max_new_tokens: PositiveInt = 24  # response budget
    max_prompt_length: PositiveInt | None = None  # prompt tokens kept (cut from the left); None: all
    temperature: float = Field(1.0, gt=0)  # sampling temperature
    eval_fraction: float = Field(0.2, ge=0, lt=1)  # share of the prompts (with all their samples) written to `eval`


INPUTS = {
    "policy": Input("checkpoint to sample solutions from (Cobbe et al.: the generator, fine-tuned for 2 epochs)",
                    model=True),
    "prompts": Input("problems with their reference `answer`; every other column is passed to the verifier and "
                     "copied to the output rows", columns=("prompt", "answer")),
}
OUTPUTS = {"train": "train.jsonl", "eval": "eval.jsonl"}  # rows {prompt, completion, label, answer, …}
KEY_METRICS = ("correct_rate", "prompts_none_correct")  # `rl4llm compare` shows these

run = "stages.runs.label_outcomes:run"  # what a stage of this kind does
