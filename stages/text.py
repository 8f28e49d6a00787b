"""Chat-template encoding, padded batches, sampling and per-token log-probs, shared by every stage kind.

Text columns come in the two shapes of Hub datasets: plain strings (`prompt: "name two colors"`) and chat messages
(`prompt: [{role: system, …}, {role: user, …}]`, `chosen: [{role: assistant, …}]`, `messages: [...]`, as TRL's
conversational datasets have them). Every encoder here takes either.

Layout of a batch: each row is `prompt + response`, the prompt left-padded and the response right-padded, so all
responses start at column `prompt_len`. Position ids are computed from the attention mask, as `generate` does, so
log-probs recomputed for training match the ones seen while sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList

from stages import data
from stages.algorithms import entropy_by_rows, masked_sum, selective_log_softmax
from stages.chat import Message, Prompt, as_messages, completion_text
from stages.progress import DecodeProgress, Progress

if TYPE_CHECKING:
    from stages.context import StageContext


def _template(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the prompt's turns followed by the assistant header (chat template, generation prompt)."""
    return _template(tokenizer, as_messages(prompt), True)


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str | list[Message]) -> list[int]:
    """Token ids of an assistant reply, terminated by EOS."""
    return tokenizer(completion_text(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_conversation(tokenizer: PreTrainedTokenizerBase,
                        messages: list[Message]) -> tuple[list[int], list[int], list[int]]:
    """A multi-turn conversation as (prompt ids, response ids, response loss mask): the prompt runs up to the first
    assistant reply (system turn included), and the mask is 1 on every assistant reply's tokens up to and including
    its EOS, 0 on the turns between them. Each reply's span is where the template renders it after the turns before
    it with the generation prompt (so the mask is the template's own, for any chat template)."""
    full = _template(tokenizer, messages, False)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], True)
        start, end = len(before), len(_template(tokenizer, messages[:i + 1], False))
        if full[:start] != before:
            raise ValueError("the chat template does not render a conversation's turns as prefixes of it")
        span = full[start:end]
        end = start + (span.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in span else len(span))
        mask[start:end] = [1] * (end - start)
    if 1 not in mask:
        raise ValueError("a conversation without an assistant turn")
    first = mask.index(1)
    return full[:first], full[first:], mask[first:]


def count_long_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_prompt_length: int | None
                       ) -> int:
    """How many prompts `max_prompt_length` cuts (from the left)."""
    return sum(len(encode_prompt(tokenizer, p)) > max_prompt_length for p in prompts) if max_prompt_length else 0


def fit(prompt_ids: list[int], response_ids: list[int], max_prompt_length: int | None,
        max_length: int | None) -> tuple[list[int], list[int], bool]:
    """Truncate a row to the length budgets: the prompt from the left (its latest turns stay), then the response
    from the right. Returns (prompt ids, response ids, whether anything was cut); raises when no response token
    fits."""
    cut_prompt = prompt_ids[-max_prompt_length:] if max_prompt_length else prompt_ids
    room = max_length - len(cut_prompt) if max_length else len(response_ids)
    if room < 1:
        raise ValueError(f"the prompt alone ({len(cut_prompt)} tokens) fills max_length={max_length}")
    cut_response = response_ids[:room]
    return cut_prompt, cut_response, (len(cut_prompt), len(cut_response)) != (len(prompt_ids), len(response_ids))


def encode_row(tokenizer: PreTrainedTokenizerBase, row: dict) -> tuple[list[int], list[int], list[int] | None]:
    """A demonstration row, `{messages}` (any number of turns) or `{prompt, response}`, as (prompt ids, response ids,
    loss mask or None for all response tokens)."""
    if "messages" in row:
        return encode_conversation(tokenizer, row["messages"])
    return encode_prompt(tokenizer, row["prompt"]), encode_response(tokenizer, row["response"]), None


def context_length(model: PreTrainedModel) -> int | None:
    """The most positions `model` was built for (its config's `max_position_embeddings`; None if it has none)."""
    return getattr(model.config, "max_position_embeddings", None)


def fit_rows(encoded: list[tuple[list[int], list[int], list[int] | None]], source: str,
             max_prompt_length: int | None, max_length: int | None, context: int | None = None,
             row_name: Callable[[int], str] | None = None
             ) -> tuple[list[tuple[list[int], list[int], list[int] | None]], int]:
    """`fit` over encoded rows: the fitted rows and how many were truncated. A row that cannot fit at all, or is
    still longer than the model's `context` (attention over it would not fit in memory, or index past the model's
    positions), is named in the error by `row_name(index)` (e.g. `demos.jsonl line 3`), else by `source` (the
    dataset) and its index."""
    name = row_name or (lambda i: f"{source}: row {i}")
    fitted, truncated = [], 0
    for i, (prompt_ids, response_ids, loss_mask) in enumerate(encoded):
        try:
            prompt_ids, cut_response, cut = fit(prompt_ids, response_ids, max_prompt_length, max_length)
        except ValueError as e:
            raise ValueError(f"{name(i)} cannot fit: {e}; raise max_length or set max_prompt_length") from None
        length = len(prompt_ids) + len(cut_response)
        if context and length > context:
            cause = "max_length is not set" if max_length is None else f"max_length={max_length} is larger"
            raise ValueError(f"{name(i)}: {length} tokens, more than the model's context (max_position_embeddings="
                             f"{context}), and {cause}; set params.max_length (at most {context}) to truncate rows")
        fitted.append((prompt_ids, cut_response, loss_mask[:len(cut_response)] if loss_mask else None))
        truncated += cut
    return fitted, truncated


def fit_comparisons(tokenizer: PreTrainedTokenizerBase, comparisons: list[tuple[Prompt, list[str | list[Message]]]],
                    source: str, max_prompt_length: int | None, max_length: int | None, context: int | None = None,
                    row_name: Callable[[int], str] | None = None
                    ) -> tuple[list[tuple[list[int], list[list[int]]]], int]:
    """Comparisons (a prompt and its completions) tokenized and fitted as `fit_rows` fits rows, each completion after
    its prompt, a row that cannot fit named as its comparison `row_name(index)` (else `source` and the index): the
    (prompt ids, each completion's ids) of every comparison, and how many comparisons were truncated."""
    name = row_name or (lambda i: f"{source}: row {i}")
    fitted, truncated = [], 0
    for i, (prompt, completions) in enumerate(comparisons):
        prompt_ids = encode_prompt(tokenizer, prompt)
        rows, cut = fit_rows([(prompt_ids, encode_response(tokenizer, c), None) for c in completions], source,
                             max_prompt_length, max_length, context, lambda _, i=i: name(i))
        fitted.append((rows[0][0], [response for _, response, _ in rows]))
        truncated += cut > 0
    return fitted, truncated


def check_prompts_fit(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, context: int | None, name: str,
                      budget: str, cut: bool = False, prompts: dict[int, Prompt] | None = None) -> None:
    """Refuse at stage start, so that sampling cannot fail after training, a prompt of input `name` that is longer
    than the model's `context` with the `params.<budget>` tokens sampled after it (the prompt first cut to
    `params.max_prompt_length` when `cut`): a ValueError naming its file and 1-based line and the params to change.
    `prompts`: the prompts the stage samples by their 0-based row (default: every row's `prompt`)."""
    if not context:
        return
    new_tokens, keep = getattr(ctx.params, budget), ctx.params.max_prompt_length if cut else None
    if prompts is None:
        prompts = dict(enumerate(row["prompt"] for row in ctx.rows(name)))
    for i, prompt in prompts.items():
        length = len(encode_prompt(tokenizer, prompt))
        if min(length, keep or length) + new_tokens > context:
            room = context - new_tokens
            fix = (f"lower {budget} (below {context})" if room < 1 else
                   f"set max_prompt_length (at most {room}) or lower {budget}" if cut else
                   f"shorten it or lower {budget}")
            kept = f" (cut to max_prompt_length={keep})" if keep and length > keep else ""
            raise ValueError(f"{data.row_name(ctx.inputs[name], i)}: a prompt of {length} tokens{kept}, with "
                             f"{budget}={new_tokens}, is more than the model's context (max_position_embeddings="
                             f"{context}); {fix}")


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

    def split(self, rows: int) -> list["PairBatch"]:
        """Consecutive micro-batches of at most `rows` rows."""
        return [self.select(torch.arange(start, min(start + rows, len(self.ids)), device=self.ids.device))
                for start in range(0, len(self.ids), rows)]

    def to(self, device: torch.device, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(self.ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                         self.prompt_len)


def pair_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
               loss_masks: list[list[int]] | None = None) -> PairBatch:
    """Rows prompt + response; `loss_masks` (one 0/1 list per response) narrows `response_mask` to the tokens a
    loss counts (e.g. the assistant turns of a multi-turn response)."""
    prompts, prompt_mask = pad(prompt_ids, pad_id, "left")
    responses, attended = pad(response_ids, pad_id, "right")
    response_mask = attended if loss_masks is None else attended * pad(loss_masks, 0, "right")[0]
    return PairBatch(torch.cat([prompts, responses], 1), torch.cat([prompt_mask, attended], 1), response_mask,
                     prompts.shape[1])


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def logits(model: PreTrainedModel, ids: torch.Tensor, attention_mask: torch.Tensor,
           keep: int = 0) -> torch.Tensor:
    """Next-token logits [B, T, V] in the model's dtype, with mask-aware positions; `keep` > 0: of the last `keep`
    positions only, [B, keep, V] (transformers' `logits_to_keep`: the LM head runs on those hidden states alone).
    The call goes through the model's own `forward` (a PEFT, DDP or FSDP wrapper's hooks run)."""
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                 logits_to_keep=keep).logits


def response_logits(model: PreTrainedModel, batch: PairBatch) -> torch.Tensor:
    """The logits predicting each response token, [B, R, V] in the model's dtype: the LM head runs on the response
    positions only (no full-vocabulary tensor for prompt positions). A view of the last R + 1 positions' logits."""
    width = batch.ids.shape[1] - batch.prompt_len
    return logits(model, batch.ids, batch.attention_mask, keep=width + 1)[:, :-1]


def _scale(temperature: float) -> float:
    # temperature 0 (greedy sampling) has no softmax of its own: log-probs are then those of the logits
    return temperature if temperature > 0 else 1.0


def response_logprobs(model: PreTrainedModel, batch: PairBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [B, R] (float32) of the response tokens under softmax(logits / temperature), chosen-token only
    (`selective_log_softmax`). Pass the sampling temperature so the log-probs are those of the policy that sampled
    (as TRL and verl do): the PPO ratio and the KL then refer to the sampling distribution."""
    return selective_log_softmax(response_logits(model, batch), batch.response_ids, _scale(temperature))


def response_logprobs_and_entropy(model: PreTrainedModel, batch: PairBatch, temperature: float = 1.0
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs` [B, R] and, from the same forward, the entropy [B, R] of softmax(logits / temperature)
    at each response position (detached, for logging; computed a sequence at a time)."""
    out = response_logits(model, batch)
    return (selective_log_softmax(out, batch.response_ids, _scale(temperature)),
            entropy_by_rows(out.detach(), _scale(temperature)))


def batched(fn: Callable[[PairBatch], torch.Tensor], batch: PairBatch, rows: int, what: str = "scoring"
            ) -> torch.Tensor:
    """`fn` over `batch` in micro-batches of at most `rows` rows, results concatenated: [B, ...] (for no-grad
    forwards, whose memory is then one micro-batch's). Progress lines say `what` is done (`stages.progress`)."""
    results = []
    with Progress(what, total=len(batch.ids)) as progress:
        for part in batch.split(rows):
            results.append(fn(part))
            progress.advance(len(part.ids), tokens=int(part.attention_mask.sum()))
    return torch.cat(results)


def text_lm_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                 reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over plain texts encoded by `encode_text` (no chat template): the mean over their
    predicted tokens, or the sum (`reduction="sum"`)."""
    device = next(model.parameters()).device
    ids, mask = pad([encode_text(tokenizer, t) for t in texts], tokenizer.pad_token_id, "left")
    ids, mask = ids.to(device), mask.to(device)
    target = mask[:, 1:]
    nll = -masked_sum(selective_log_softmax(logits(model, ids, mask)[:, :-1], ids[:, 1:]), target)
    return nll if reduction == "sum" else nll / target.sum().clamp(min=1)


@dataclass
class Generation:
    """One sampled response: its token ids (ending with EOS unless cut at max_new_tokens) and, when asked, each
    token's log-prob under softmax(logits / T) as the engine that sampled computed it."""

    response_ids: list[int]
    logprobs: list[float] | None = None


class RolloutEngine(Protocol):
    """What generates a stage's samples (stages/rollout.py): `hf` (transformers' `generate` on the stage's model) or
    `vllm` (servers holding a copy of its weights)."""

    name: str

    def generate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                 max_new_tokens: int, temperature: float, logprobs: bool = False, what: str = "sampling"
                 ) -> list[Generation]:
        """One response per prompt (token ids; repeat a prompt for several) from `model`'s current weights."""

    def describe(self) -> dict[str, str]:
        """The engine and its version, recorded with the stage's run."""

    def close(self) -> None:
        """Release what the engine holds (a started server stops)."""


@dataclass
class Samples:
    prompts: list[Prompt]
    completions: list[str]
    batch: PairBatch
    prompt_ids: list[list[int]]  # each prompt's encoded (and cut) ids
    engine_logprobs: torch.Tensor | None = None  # [B, R] the engine's log-probs of the response tokens, if asked

    @property
    def lengths(self) -> list[int]:
        return self.batch.response_mask.sum(1).tolist()


def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_new_tokens: int,
           temperature: float = 1.0, batch_size: int = 64, max_prompt_length: int | None = None,
           what: str = "sampling", engine: RolloutEngine | None = None, logprobs: bool = False) -> Samples:
    """Sample one completion per prompt (repeat prompts for several) with `engine` (None: `hf_generate` on `model`).
    Prompts longer than `max_prompt_length` tokens keep their end. Responses end at EOS or max_new_tokens. With
    `logprobs`, the engine's log-probs of the sampled tokens come along (`Samples.engine_logprobs`)."""
    prompt_rows = [encode_prompt(tokenizer, p) for p in prompts]
    if max_prompt_length:
        prompt_rows = [row[-max_prompt_length:] for row in prompt_rows]
    return sample_ids(model, tokenizer, prompt_rows, max_new_tokens, temperature, batch_size, what, engine, logprobs,
                      list(prompts))


def sample_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_rows: list[list[int]],
               max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64, what: str = "sampling",
               engine: RolloutEngine | None = None, logprobs: bool = False,
               prompts: list[Prompt] | None = None) -> Samples:
    """`sample` from prompts already encoded (e.g. a prompt and the start of a response, to continue it);
    `prompts` (default: the decoded ids) is what `Samples.prompts` records."""
    if engine is None:
        generations = [Generation(row) for row in hf_generate(model, tokenizer, prompt_rows, max_new_tokens,
                                                              temperature, batch_size, what)]
    else:
        generations = engine.generate(model, tokenizer, prompt_rows, max_new_tokens, temperature, logprobs, what)
    response_rows = [g.response_ids for g in generations]
    completions = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in response_rows]
    engine_logprobs = logprob_rows([g.logprobs for g in generations], max(map(len, response_rows), default=0)) \
        if logprobs else None
    if prompts is None:
        prompts = [tokenizer.decode(row, skip_special_tokens=True) for row in prompt_rows]
    return Samples(prompts, completions, pair_batch(prompt_rows, response_rows, tokenizer.pad_token_id),
                   prompt_rows, engine_logprobs)


def logprob_rows(values: list[list[float]], width: int) -> torch.Tensor:
    """Per-token log-probs of several responses as [B, width], zeros after each response's end."""
    out = torch.zeros(len(values), width)
    for i, row in enumerate(values):
        out[i, :len(row)] = torch.tensor(row[:width])
    return out


@torch.no_grad()
def hf_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_rows: list[list[int]],
                max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64, what: str = "sampling"
                ) -> list[list[int]]:
    """Response token ids for each prompt's ids, sampled by transformers' `generate` in eval mode (the model's mode
    is restored after).

    Each token is drawn from softmax(logits / temperature) exactly (greedy at temperature 0), as the RL log-probs
    assume: none of the checkpoint's `generation_config` defaults (top-k, top-p, repetition penalty, …) applies.
    Progress lines (`what`: samples done / total, tokens/s) come from inside each `generate` call
    (`DecodeProgress`). A LoRA model generates with its adapters merged into the base weights, as TRL and verl sync
    merged weights to their generation engines (one matmul per layer instead of three: ~11% faster on SmolLM2-135M),
    and unmerged after, which leaves the base weights within float rounding of where they were."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pure = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, **pure,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's base generates
    checkpoint_config, inner.generation_config = inner.generation_config, GenerationConfig()
    merged = hasattr(model, "merge_adapter")
    response_rows: list[list[int]] = []
    try:
        if merged:
            model.merge_adapter()
        with Progress(what, len(prompt_rows)) as progress:  # its ticker speaks during a long prefill too
            for start in range(0, len(prompt_rows), batch_size):
                ids, mask = pad(prompt_rows[start:start + batch_size], tokenizer.pad_token_id, "left")
                counter = DecodeProgress(progress, tokenizer.eos_token_id)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config,
                                     stopping_criteria=StoppingCriteriaList([counter]))[:, ids.shape[1]:].tolist()
                progress.advance(len(out) - counter.finished)  # the rows cut at max_new_tokens
                for row in out:
                    end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                    response_rows.append(row[:end])
    finally:
        if merged:
            model.unmerge_adapter()
        inner.generation_config = checkpoint_config
        model.train(was_training)
    return response_rows
