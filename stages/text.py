"""Chat-template encoding, padded batches, sampling and per-token log-probs, shared by every stage kind.

Layout of a batch: each row is `prompt + response`, the prompt left-padded and the response right-padded, so all
responses start at column `prompt_len`. Position ids are computed from the attention mask, as `generate` does, so
log-probs recomputed for training match the ones seen while sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.algorithms import token_logprobs


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a user turn followed by the assistant header (chat template, generation prompt)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of an assistant reply, terminated by EOS."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of plain text (pretraining corpus): BOS (if the tokenizer has one) + text + EOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length. Returns ids [B, T] and attention mask [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@dataclass
class PairBatch:
    """Prompt + response rows. ids, attention_mask: [B, P + R]; response_mask: [B, R] (1 on real response tokens)."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int

    @property
    def response_ids(self) -> torch.Tensor:
        return self.ids[:, self.prompt_len:]

    def select(self, rows: torch.Tensor) -> "PairBatch":
        return PairBatch(self.ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_len)

    def to(self, device: torch.device, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(self.ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                         self.prompt_len)


def pair_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> PairBatch:
    prompts, prompt_mask = pad(prompt_ids, pad_id, "left")
    responses, response_mask = pad(response_ids, pad_id, "right")
    return PairBatch(torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1),
                     response_mask, prompts.shape[1])


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def logits(model: PreTrainedModel, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, T, V] in float32, with mask-aware positions."""
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    return out.float()


def response_logprobs(model: PreTrainedModel, batch: PairBatch, return_logits: bool = False,
                      temperature: float = 1.0):
    """Log-probs of the response tokens under softmax(logits / temperature): [B, R] (and those scaled response
    logits [B, R, V] if asked). Pass the sampling temperature so the log-probs are those of the policy that sampled
    (as TRL and verl do): the PPO ratio and the KL then refer to the sampling distribution."""
    out = logits(model, batch.ids, batch.attention_mask)[:, batch.prompt_len - 1:-1]
    if temperature > 0 and temperature != 1.0:
        out = out / temperature
    logp = token_logprobs(out, batch.response_ids)
    return (logp, out) if return_logits else logp


def text_lm_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                 reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over plain texts encoded by `encode_text` (no chat template)."""
    device = next(model.parameters()).device
    ids, mask = pad([encode_text(tokenizer, t) for t in texts], tokenizer.pad_token_id, "left")
    ids, mask = ids.to(device), mask.to(device)
    target = mask[:, 1:].bool()
    out = logits(model, ids, mask)[:, :-1]
    return torch.nn.functional.cross_entropy(out[target], ids[:, 1:][target], reduction=reduction)


@dataclass
class Samples:
    prompts: list[str]
    completions: list[str]
    batch: PairBatch

    @property
    def lengths(self) -> list[int]:
        return self.batch.response_mask.sum(1).tolist()


@torch.no_grad()
def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
           temperature: float = 1.0, batch_size: int = 64) -> Samples:
    """Sample one completion per prompt (repeat prompts for several) in eval mode, leaving the model's mode as it
    was. Responses end at EOS or max_new_tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_rows = [encode_prompt(tokenizer, p) for p in prompts]
    response_rows: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad(prompt_rows[start:start + batch_size], tokenizer.pad_token_id, "left")
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )[:, ids.shape[1]:].tolist()
        for row in out:
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            response_rows.append(row[:end])
    completions = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in response_rows]
    model.train(was_training)
    return Samples(list(prompts), completions, pair_batch(prompt_rows, response_rows, tokenizer.pad_token_id))
