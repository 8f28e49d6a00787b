"""Rejection sampling into an SFT dataset (DeepSeek-R1 §2.3.3).

Declared here (what pipelines.yaml may set); how it works: stages/runs/rejection_sampling.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from stages.kinds import Input
from stages.params import ModelParams
from stages.tool_params import INDEX_INPUT, ToolSettings
from stages.verifier_params import VerifierSettings

FilterName = Literal["correct", "formatted", "language_consistent", "not_repetitive", "dedup"]  # see stages/runs/

class Params(ModelParams, VerifierSettings, ToolSettings):
    prompts: int | None = None  # how many prompts to sample for (None: all; global: each process samples its share)
    samples_per_prompt: int = 4  # N samples per prompt
    max_per_prompt: int = 1  # accepted samples kept per prompt
    max_new_tokens: int = 24  # response budget
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    temperature: float = 1.0  # sampling temperature
    filters: list[FilterName] = list(FilterName.__args__)  # every one must pass
    min_language_consistency: float = 1.0  # `language_consistent` threshold
    max_repetition: float = 0.2  # `not_repetitive` threshold
    demonstrations: list[dict[str, str]] = []  # few-shot user/assistant turns shown when sampling, not kept (R1 2.3.1)

    @field_validator("demonstrations")
    @classmethod
    def alternating_turns(cls, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        for i, turn in enumerate(turns):
            role = ("user", "assistant")[i % 2]
            if set(turn) != {"role", "content"} or turn["role"] != role or not isinstance(turn["content"], str):
                raise ValueError(f"turn {i + 1} must be {{role: {role}, content: <text>}} (user and assistant "
                                 f"turns alternate, user first), got {turn}")
        if len(turns) % 2:
            raise ValueError("the last demonstration turn must be the assistant's")
        return turns


INPUTS = {
    "policy": Input("checkpoint to sample from", model=True),
    "prompts": Input("prompts with the columns the filters and the verifier read (answer, language, metadata…)",
                     columns=("prompt",)),
    "general": Input("general (non-reasoning) demonstrations merged into the output", required=False,
                     columns=("prompt", "response")),
    "index": INDEX_INPUT,
}
OUTPUTS = {"sft": "sft.jsonl"}
KEY_METRICS = ("acceptance_rate", "kept")  # `rl4llm compare` shows these

run = "stages.runs.rejection_sampling:run"  # what a stage of this kind does
