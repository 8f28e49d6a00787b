"""Steps of a worked solution: what a process reward model (PRM) scores and Math-Shepherd labels.

A solution is split into steps at a separator: "\\n" by default, as in TRL's stepwise PRM datasets (PRM800K, Math-
Shepherd); the embedded reasoning task's steps are separated by " , ". A PRM reads a solution laid out as TRL's PRM
trainer lays it out: the prompt, then each step's tokens followed by the separator's, and the score of step k is the
model's output at the last token of the separator after it (`step_layout`). A policy's sampled tokens are mapped to
the same steps through the decoded text (`step_token_ends`), so a PRM with another tokenizer can still score them.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from stages.chat import Prompt
from stages.text import encode_prompt

DEFAULT_SEPARATOR = "\n"


def split_steps(text: str, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    """The steps of `text`: its pieces between separators, stripped, empty ones dropped."""
    return [step.strip() for step in text.split(separator) if step.strip()]


def step_char_ends(text: str, separator: str = DEFAULT_SEPARATOR) -> list[int]:
    """For each step of `split_steps(text, separator)`, the index in `text` just past its last non-space
    character."""
    ends, start = [], 0
    for piece in text.split(separator):
        if piece.strip():
            ends.append(start + len(piece.rstrip()))
        start += len(piece) + len(separator)
    return ends


def step_token_ends(tokenizer: PreTrainedTokenizerBase, response_ids: list[int],
                    separator: str = DEFAULT_SEPARATOR) -> list[int]:
    """For each step of the decoded response, the index in `response_ids` of the token that completes it: the
    first token whose decoded prefix reaches the step's last character; the last step ends at the last token (EOS
    included). Binary search over prefix decodes: O(steps · log T) decodes."""
    if not response_ids:
        return []
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    ends = []
    for char_end in step_char_ends(text, separator)[:-1]:
        low, high = 0, len(response_ids) - 1
        while low < high:  # the first i with len(decode(ids[:i + 1])) >= char_end
            middle = (low + high) // 2
            if len(tokenizer.decode(response_ids[:middle + 1], skip_special_tokens=True)) >= char_end:
                high = middle
            else:
                low = middle + 1
        ends.append(low)
    return ends + [len(response_ids) - 1] if text.strip() else []


def step_layout(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, steps: list[str],
                separator: str = DEFAULT_SEPARATOR) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, index in the response ids of each step's scored token): the prompt as the chat
    template renders it for generation, then each step's tokens followed by the separator's (TRL's PRM layout);
    step k is scored at the last token of the separator after it (at its own last token if the separator has
    no tokens)."""
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    response, positions = [], []
    for step in steps:
        response += tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        positions.append(len(response) - 1)
    return encode_prompt(tokenizer, prompt), response, positions


def math_shepherd_labels(continuations_correct: list[list[bool]]) -> tuple[list[float], list[bool]]:
    """Math-Shepherd (Wang et al. 2024, §3.3) labels of a solution's steps from the correctness of the
    continuations sampled after each step prefix: the soft label is the share that reach the right answer, the hard
    label whether any does. One list of continuations per step; an empty list labels the step 0.0 / False."""
    soft = [sum(outcomes) / len(outcomes) if outcomes else 0.0 for outcomes in continuations_correct]
    return soft, [any(outcomes) for outcomes in continuations_correct]


def first_error_step(correct_steps: list[bool]) -> int:
    """ProcessBench's label of a solution (Zheng et al. 2024): the index of its first incorrect step, -1 if every
    step is correct."""
    return next((i for i, ok in enumerate(correct_steps) if not ok), -1)
