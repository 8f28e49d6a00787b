"""Tokenizer, tiny model, batch layout and the embedded task's gold labeler."""

from __future__ import annotations

import json

import pytest
import torch

from stages import instruct_task
from stages.chat import held_out_prompts, prompt_key
from stages.models import REWARD_BIAS_KEY, last_token_scores, load_policy, load_scalar_head_model, load_tokenizer, \
    reward_bias
from stages.text import encode_prompt, encode_response, pair_batch, response_logprobs, sample


def test_chat_template_and_response_encoding(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = tokenizer.convert_ids_to_tokens(encode_prompt(tokenizer, "name two animals"))
    assert prompt == ["<|user|>", "name", "two", "animals", "<|assistant|>"]
    assert tokenizer.convert_ids_to_tokens(encode_response(tokenizer, "cat dog")) == ["cat", "dog", "<eos>"]


def test_pair_batch_layout():
    batch = pair_batch([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    assert batch.prompt_len == 2
    assert batch.ids.tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_sampled_logprobs_match_recomputed_under_padding(tiny_model_dir):
    """Left-padded rows get mask-aware positions: a row's log-probs don't depend on its batch mates."""
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_policy(str(tiny_model_dir))
    torch.manual_seed(0)
    samples = sample(model, tokenizer, ["name two animals", "name five tools"], max_new_tokens=4)
    together = response_logprobs(model, samples.batch)
    alone = response_logprobs(model, pair_batch([encode_prompt(tokenizer, "name five tools")],
                                                [samples.batch.response_ids[1][samples.batch.response_mask[1].bool()]
                                                 .tolist()], tokenizer.pad_token_id))
    n = int(samples.batch.response_mask[1].sum())
    torch.testing.assert_close(together[1, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_reward_model_bias_is_stored_and_applied(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_scalar_head_model(str(tiny_model_dir), tokenizer.pad_token_id)
    model.config.update({REWARD_BIAS_KEY: 0.25})
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[REWARD_BIAS_KEY] == 0.25
    assert reward_bias(tmp_path) == 0.25
    batch = pair_batch([encode_prompt(tokenizer, "name two animals")], [encode_response(tokenizer, "cat")], 0)
    raw = last_token_scores(model, batch.ids, batch.attention_mask)
    torch.testing.assert_close(last_token_scores(model, batch.ids, batch.attention_mask, reward_bias(tmp_path)),
                               raw + 0.25)


@pytest.mark.parametrize("response, expected", [
    ("cat dog fox", 1.0),        # three distinct animals
    ("cat cat fox", 2 / 3),      # a repeat
    ("cat dog", 2 / 3),          # one short
    ("cat dog red fox", 0.75 * (2 / 3)),  # one off-topic word and one too many
    ("", 0.0),
])
def test_gold_score(response, expected):
    assert instruct_task.gold_score("name three animals", response) == pytest.approx(expected)


def test_scripted_labeler_ranks_by_gold_with_ties():
    assert instruct_task.rank_by_gold("name two colors", ["red blue", "red", "red cat", "blue pink"]) == [0, 1, 1, 0]


def test_held_out_prompts_are_the_first_share_of_the_distinct_prompts_messages_included():
    chat = [{"role": "user", "content": "c"}]
    rows = [{"prompt": p} for p in ["a", "a", "b", chat, "d", list(chat), "e"]]  # 5 distinct prompts
    assert held_out_prompts(rows, 0.4) == {"a", "b"}
    assert held_out_prompts(rows, 0.6) == {"a", "b", prompt_key(chat)}
    assert held_out_prompts(rows, 0.0) == set()
