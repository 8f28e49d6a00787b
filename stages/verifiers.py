"""Trained verifiers: an outcome verifier (ORM, Cobbe et al. 2021) scores a whole solution, a process reward model
(PRM; Lightman et al. 2023, Math-Shepherd) each of its steps.

Both are scalar-head models (`load_scalar_head_model`) whose output at a position is the log-odds that the solution
(so far) is correct, trained with `algorithms.masked_bce_loss`. The ORM is read at a response's last token (its
EOS), the PRM at the end of each step in `steps.step_layout`. A saved verifier's config records which it is and the
step separator it was trained with (`VERIFIER_KEY`), so every consumer lays solutions out as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.chat import Prompt
from stages.models import load_scalar_head_model, load_tokenizer, token_values
from stages.steps import DEFAULT_SEPARATOR, split_steps, step_layout
from stages.text import PairBatch, encode_prompt, encode_response, pair_batch

VERIFIER_KEY = "rl4llm_verifier"  # config.json: {"type": "outcome" | "process", "step_separator": str}
VerifierType = Literal["outcome", "process"]


def verifier_config(kind: VerifierType, separator: str = DEFAULT_SEPARATOR) -> dict[str, Any]:
    """What a saved verifier's config.json records under `VERIFIER_KEY`."""
    return {VERIFIER_KEY: {"type": kind, "step_separator": separator}}


def response_values(model: PreTrainedModel, batch: PairBatch) -> torch.Tensor:
    """The scalar head's output (log-odds) at each response position: [B, R]."""
    return token_values(model, batch.ids, batch.attention_mask)[:, batch.prompt_len:]


def outcome_batch(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], completions: list[str]) -> PairBatch:
    """Prompt + completion rows as an outcome verifier reads them (the completion ends with EOS)."""
    return pair_batch([encode_prompt(tokenizer, q) for q in prompts],
                      [encode_response(tokenizer, c) for c in completions], tokenizer.pad_token_id)


def step_batch(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], step_lists: list[list[str]],
               separator: str) -> tuple[PairBatch, list[list[int]]]:
    """Prompt + steps rows in the PRM layout (`step_layout`), and each row's scored positions in its response."""
    layouts = [step_layout(tokenizer, q, steps, separator) for q, steps in zip(prompts, step_lists)]
    # a solution with no steps still gets a row (one pad token) so that rows stay aligned with their solutions
    batch = pair_batch([prompt for prompt, _, _ in layouts], [response or [tokenizer.pad_token_id]
                                                             for _, response, _ in layouts], tokenizer.pad_token_id)
    return batch, [positions for _, _, positions in layouts]


@dataclass
class Verifier:
    """A loaded verifier, scoring in micro-batches of `micro_batch_size` rows. Scores are probabilities."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    type: VerifierType
    separator: str
    micro_batch_size: int = 16

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def outcome_scores(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        """P(correct) of each whole solution, read at its last token."""
        scores: list[float] = []
        for start in range(0, len(prompts), self.micro_batch_size):
            end = start + self.micro_batch_size
            batch = outcome_batch(self.tokenizer, prompts[start:end], completions[start:end]).to(self.device)
            values = response_values(self.model, batch)
            last = batch.response_mask.sum(1) - 1
            scores += torch.sigmoid(values.gather(1, last[:, None]).squeeze(1)).tolist()
        return scores

    @torch.no_grad()
    def step_scores(self, prompts: list[Prompt], completions: list[str]) -> list[list[float]]:
        """P(correct so far) at the end of each step of each solution (split at the verifier's separator); an
        empty solution has no steps."""
        step_lists = [split_steps(c, self.separator) for c in completions]
        scores: list[list[float]] = []
        for start in range(0, len(prompts), self.micro_batch_size):
            end = start + self.micro_batch_size
            batch, positions = step_batch(self.tokenizer, prompts[start:end], step_lists[start:end], self.separator)
            probabilities = torch.sigmoid(response_values(self.model, batch.to(self.device))).cpu()
            scores += [probabilities[i, row].tolist() for i, row in enumerate(positions)]
        return scores


def verifier_settings(path: str | Path) -> dict[str, Any]:
    """The `VERIFIER_KEY` record of a saved verifier; ValueError naming the path if it is not one."""
    config = json.loads((Path(path) / "config.json").read_text())
    if VERIFIER_KEY not in config:
        raise ValueError(f"{path} is not a verifier or PRM (its config.json has no '{VERIFIER_KEY}': train it with "
                         "a `verifier` or `prm` stage)")
    return config[VERIFIER_KEY]


def load_verifier(path: str, device: torch.device, micro_batch_size: int = 16,
                  expected: VerifierType | None = None) -> Verifier:
    """The verifier saved at `path`, frozen on `device`; `expected` checks it is an outcome verifier or a PRM."""
    settings = verifier_settings(path)
    if expected and settings["type"] != expected:
        raise ValueError(f"{path} is a{'n' if settings['type'] == 'outcome' else ''} {settings['type']} verifier, "
                         f"not a{'n' if expected == 'outcome' else ''} {expected} one")
    tokenizer = load_tokenizer(path)
    model = load_scalar_head_model(path, tokenizer.pad_token_id).eval().requires_grad_(False).to(device)
    return Verifier(model, tokenizer, settings["type"], settings["step_separator"], micro_batch_size)
