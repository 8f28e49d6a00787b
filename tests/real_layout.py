"""A real-layout model and dataset, built offline: what a user's `Qwen/Qwen2.5-0.5B` and Hub dataset look like.

`build_qwen2` saves a small `Qwen2ForCausalLM` with a byte-level BPE tokenizer (trained by `tokenizers` on the
embedded instruction task's words) and a ChatML chat template with a system turn, via `save_pretrained`.
`build_hub_datasets` writes Hub-layout dataset folders (`data/train-00000-of-00001.parquet`, `data/test-…`) in the
common column shapes: `messages` (SFT), conversational `prompt` / `chosen` / `rejected` (TRL's preference format),
`prompt` as messages (RL), and plain `text` (pretraining).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from stages import instruct_task

SYSTEM = "You are a helpful assistant."
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(rng: random.Random, n: int = 400) -> list[str]:
    """Sentences, prompts and answers over the embedded task's words, the tokenizer's training text."""
    texts = [instruct_task.pretraining_sentence(rng) for _ in range(n)]
    texts += [instruct_task.make_prompt(rng) for _ in range(n)]
    return texts + [SYSTEM, "user assistant system", " ".join(instruct_task.ALL_WORDS)]


def build_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_qwen2(out: Path, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate_size: int | None = None, vocab_size: int = 400, seed: int = 0) -> Path:
    """A Qwen2-architecture causal LM + byte-level BPE ChatML tokenizer, saved with save_pretrained to `out`."""
    tokenizer = build_tokenizer(corpus(random.Random(seed)), vocab_size)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 3 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _split_write(rows: list[dict], folder: Path, test_share: float = 0.2) -> Path:
    n_test = int(len(rows) * test_share)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows[n_test:]).to_parquet(folder / "data/train-00000-of-00001.parquet")
    Dataset.from_list(rows[:n_test]).to_parquet(folder / "data/test-00000-of-00001.parquet")
    return folder


def build_hub_datasets(root: Path, n: int = 120, seed: int = 0) -> dict[str, Path]:
    """Hub-layout dataset folders under `root`: chat (`messages`, multi-turn, some with a system prompt),
    preferences (conversational prompt/chosen/rejected), prompts (`prompt` as messages), pretrain (`text`)."""
    rng = random.Random(seed)
    chat, prefs, prompts = [], [], []
    for i in range(n):
        first, second = instruct_task.make_prompt(rng), instruct_task.make_prompt(rng)
        turns = [("user", first), ("assistant", instruct_task.demonstration(first, rng, slip=0.0))]
        if i % 3 == 0:  # multi-turn
            turns += [("user", second), ("assistant", instruct_task.demonstration(second, rng, slip=0.0))]
        if i % 4 == 0:
            turns = [("system", "Answer with words only."), *turns]
        chat.append({"messages": _messages(*turns)})
        good, bad = instruct_task.demonstration(first, rng, slip=0.0), instruct_task.demonstration(first, rng, slip=1.0)
        prefs.append({"prompt": _messages(("user", first)), "chosen": _messages(("assistant", good)),
                      "rejected": _messages(("assistant", bad))})
        prompts.append({"prompt": _messages(("user", first))})
    text = [{"text": instruct_task.pretraining_sentence(rng)} for _ in range(2 * n)]
    return {name: _split_write(rows, root / name)
            for name, rows in (("chat", chat), ("preferences", prefs), ("prompts", prompts), ("pretrain", text))}
