"""Steps of a solution (stages/steps.py): splitting, mapping steps to the policy's tokens, the PRM layout, and
Math-Shepherd's labels — each against hand-computed answers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stages.models import build_word_tokenizer
from stages.steps import (first_error_step, math_shepherd_labels, split_steps, step_char_ends, step_layout,
                          step_token_ends)

SOLUTION = "<think> 5 plus 3 is 8 , 8 minus 2 is 6 </think> <answer> 6 </answer>"


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    return build_word_tokenizer([SOLUTION, "ana has 5 apples"])


@pytest.fixture(scope="module")
def subwords() -> PreTrainedTokenizerFast:
    """A byte-level BPE with a small vocabulary: words split into several tokens, so steps end mid-token-run."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["First, add 12 and 30.\nThen halve it: 21.\nSo the answer is 21."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("text, separator, steps", [
    ("a\nb\n\n c \n", "\n", ["a", "b", "c"]),
    (SOLUTION, " , ", ["<think> 5 plus 3 is 8", "8 minus 2 is 6 </think> <answer> 6 </answer>"]),
    ("no separator here", "\n", ["no separator here"]),
    ("  \n \n", "\n", []),
])
def test_split_steps(text, separator, steps):
    assert split_steps(text, separator) == steps


def test_step_char_ends_point_just_past_each_step():
    text = " one \n\ntwo  \nthree"
    ends = step_char_ends(text, "\n")
    assert [text[:end].rstrip().rsplit("\n", 1)[-1].strip() for end in ends] == ["one", "two", "three"]
    assert ends == [4, 10, 18]


def test_step_token_ends_on_a_word_tokenizer(words):
    ids = words(SOLUTION, add_special_tokens=False)["input_ids"] + [words.eos_token_id]
    ends = step_token_ends(words, ids, " , ")
    # the first step ends at "8" before the comma; the last step ends at the last token (EOS)
    assert words.convert_ids_to_tokens([ids[i] for i in ends]) == ["8", "<eos>"]
    assert ends == [5, len(ids) - 1]
    assert step_token_ends(words, [], " , ") == []


def test_step_token_ends_on_subword_tokens(subwords):
    text = "First, add 12 and 30.\nThen halve it: 21.\nSo the answer is 21."
    ids = subwords(text, add_special_tokens=False)["input_ids"]
    ends = step_token_ends(subwords, ids, "\n")
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    for end, step in zip(ends[:-1], split_steps(text)):
        decoded = subwords.decode(ids[:end + 1])
        assert decoded.rstrip().endswith(step)  # the step is complete at its end token …
        assert not subwords.decode(ids[:end]).rstrip().endswith(step)  # … and not one token earlier


def test_step_layout_scores_each_step_at_its_separator(words):
    steps = split_steps(SOLUTION, " , ")
    prompt_ids, response, positions = step_layout(words, "ana has 5 apples", steps, " , ")
    tokens = words.convert_ids_to_tokens(response)
    assert [tokens[i] for i in positions] == [",", ","]
    assert tokens[:positions[0]] == steps[0].split()
    assert prompt_ids[-1] == words.convert_tokens_to_ids("<|assistant|>")


def test_step_layout_without_separator_tokens_scores_each_steps_last_token(words):
    _, response, positions = step_layout(words, "ana", ["5 plus 3", "is 8"], "\n")  # "\n" has no word token
    assert words.convert_ids_to_tokens([response[i] for i in positions]) == ["3", "8"]


def test_math_shepherd_labels():
    soft, hard = math_shepherd_labels([[True, False, False, False], [False, False], [True, True], []])
    assert soft == [0.25, 0.0, 1.0, 0.0]
    assert hard == [True, False, True, False]


@pytest.mark.parametrize("steps, first", [([True, True], -1), ([True, False, True], 1), ([False], 0), ([], -1)])
def test_first_error_step(steps, first):
    assert first_error_step(steps) == first
