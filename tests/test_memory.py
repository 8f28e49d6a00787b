"""Memory-lean log-probs and micro-batched updates: results equal to the straightforward full-softmax computation,
and gradients accumulated over micro-batches equal to the whole minibatch's for every loss aggregation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from stages import algorithms as A
from stages.models import load_policy, load_tokenizer, with_lora
from stages.params import LoraParams
from stages.text import (encode_prompt, encode_response, encode_text, pad, pair_batch, position_ids, response_logprobs,
                         response_logprobs_and_entropy, text_lm_loss)
from stages.training import Optimization, micro_batches, sft_loss

PROMPTS = ["name two animals", "name five tools please", "hi"]  # different lengths: left padding
RESPONSES = ["cat dog", "hammer saw drill", "fox"]  # different lengths: right padding


def full_softmax_reference(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy [B, R] the plain way: logits at every position, full log_softmax in float32."""
    out = model(input_ids=batch.ids, attention_mask=batch.attention_mask,
                position_ids=position_ids(batch.attention_mask)).logits.float()
    scaled = out[:, batch.prompt_len - 1:-1] / temperature
    logp = F.log_softmax(scaled, -1)
    return (logp.gather(-1, batch.response_ids[..., None]).squeeze(-1),
            -(logp.exp() * logp).sum(-1))


def batch_of(tokenizer, prompts=PROMPTS, responses=RESPONSES):
    return pair_batch([encode_prompt(tokenizer, q) for q in prompts], [encode_response(tokenizer, r) for r in responses],
                      tokenizer.pad_token_id)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_the_full_softmax(tiny_model_dir, lora, temperature):
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_policy(str(tiny_model_dir))
    if lora:
        model = with_lora(model, LoraParams(r=4))
        torch.manual_seed(0)
        for name, w in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(w, std=0.5)  # B = 0 at init would make the adapters a no-op
    batch = batch_of(tokenizer)
    assert batch.attention_mask[:, 0].tolist().count(0) == 2  # left-padded prompts
    ref_logp, ref_entropy = full_softmax_reference(model, batch, temperature)
    logp, entropy = response_logprobs_and_entropy(model, batch, temperature)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logp[mask], ref_logp[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask], atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad
    torch.testing.assert_close(response_logprobs(model, batch, temperature), logp)

    # the gradient of the selective log-softmax equals the full log-softmax's
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)) * mask
    trainable = [w for w in model.parameters() if w.requires_grad]
    grads = torch.autograd.grad((response_logprobs(model, batch, temperature) * weights).sum(), trainable)
    ref_grads = torch.autograd.grad((full_softmax_reference(model, batch, temperature)[0] * weights).sum(), trainable)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_selective_log_softmax_in_bfloat16_upcasts_and_differentiates():
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    logp = A.selective_log_softmax(logits, labels, 0.5)
    assert logp.dtype == torch.float32
    ref = F.log_softmax(logits.float() / 0.5, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref)
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad)
    assert torch.autograd.gradcheck(lambda z: A.selective_log_softmax(z, labels, 0.7),
                                     torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True))


def test_text_lm_loss_equals_cross_entropy(tiny_model_dir):
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_policy(str(tiny_model_dir))
    texts = ["cat dog fox", "hammer saw"]
    ids, mask = pad([encode_text(tokenizer, t) for t in texts], tokenizer.pad_token_id, "left")
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
    target = mask[:, 1:].bool()
    expected = F.cross_entropy(out[target], ids[:, 1:][target])
    torch.testing.assert_close(text_lm_loss(model, tokenizer, texts), expected)
    torch.testing.assert_close(text_lm_loss(model, tokenizer, texts, reduction="sum"), expected * target.sum())


# ---------------------------------------------------------------------------------------------------------------
# Gradients over micro-batches equal the whole minibatch's
# ---------------------------------------------------------------------------------------------------------------

RL_PROMPTS = ["name two animals", "hi", "name five tools please", "name a color", "hi there", "name two tools"]
RL_RESPONSES = ["cat", "dog fox cat dog fox", "hammer saw", "red blue green yellow", "fox", "saw drill hammer"]


def one_sgd_step(model, micro: list[torch.Tensor], loss_fn, weigh) -> list[torch.Tensor]:
    """The parameters' change in one `Optimization.update` with SGD(lr=1), no clipping: minus the gradient."""
    trainable = [w for w in model.parameters() if w.requires_grad]
    before = [w.detach().clone() for w in trainable]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    opt = Optimization(SimpleNamespace(accelerator=Accelerator(cpu=True), label="test"), model, optimizer,
                       torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), max_grad_norm=None)
    opt.update(micro, loss_fn, weigh)
    step = [w.detach() - b for w, b in zip(trainable, before)]
    with torch.no_grad():
        for w, b in zip(trainable, before):
            w.copy_(b)
    return step


def assert_same_steps(model, loss_fn, weigh, n_rows: int) -> None:
    rows = torch.arange(n_rows)
    whole = one_sgd_step(model, micro_batches(rows, n_rows), loss_fn, weigh)
    for size in (1, 2, 4):
        split = one_sgd_step(model, micro_batches(rows, size), loss_fn, weigh)
        for a, b in zip(split, whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def assert_different_steps(model, loss_fn, weigh, n_rows: int) -> None:
    rows = torch.arange(n_rows)
    whole = one_sgd_step(model, micro_batches(rows, n_rows), loss_fn, weigh)
    split = one_sgd_step(model, micro_batches(rows, 2), loss_fn, weigh)
    assert max((a - b).abs().max() for a, b in zip(split, whole)) > 1e-4


@pytest.mark.parametrize("mode", A.LOSS_AGG_MODES)
def test_micro_batched_policy_gradient_equals_the_whole_minibatch(tiny_model_dir, mode):
    """The GRPO loss (clipped surrogate + β·KL, aggregated by `mode`) over micro-batches of 1, 2 and 4 rows of
    responses of different lengths, one of them masked out entirely (overlong filtering): the same step as one
    forward over the 6 rows. Weighting micro-batches by rows instead (what 1/n accumulation does) differs."""
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_policy(str(tiny_model_dir))
    batch = batch_of(tokenizer, RL_PROMPTS, RL_RESPONSES)
    mask = batch.response_mask.float()
    mask[3] = 0  # a truncated sample: no loss
    g = torch.Generator().manual_seed(0)
    advantages = torch.randn(len(RL_PROMPTS), 1, generator=g) * mask
    with torch.no_grad():
        old = response_logprobs(model, batch, 0.7) + 0.3 * torch.randn(mask.shape, generator=g)  # some clipped
        ref = response_logprobs(model, batch, 0.7) + 0.3 * torch.randn(mask.shape, generator=g)

    def loss_fn(idx):
        logp = response_logprobs(model, batch.select(idx), 0.7)
        loss, _ = A.ppo_policy_loss(logp, old[idx], advantages[idx], mask[idx], 0.2, 0.28, mode, 8)
        kl = A.aggregate_loss(A.kl_penalty(logp, ref[idx], "k3"), mask[idx], mode, 8)
        return loss + 0.1 * kl, {"loss": loss.item()}

    def weigh(idx):
        return float(A.aggregation_size(mask[idx], mode))

    assert_same_steps(model, loss_fn, weigh, len(RL_PROMPTS))
    assert_different_steps(model, loss_fn, len, len(RL_PROMPTS))


def test_micro_batched_sft_gradient_equals_the_whole_batch(tiny_model_dir):
    """SFT (a mean over response tokens) weighs micro-batches by response tokens, as `fine_tune` does."""
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_policy(str(tiny_model_dir))
    batch = batch_of(tokenizer, RL_PROMPTS, RL_RESPONSES)

    def loss_fn(idx):
        loss = sft_loss(model, batch.select(idx))
        return loss, {"loss": loss.item()}

    def tokens(idx):
        return float(batch.response_mask[idx].sum())

    assert_same_steps(model, loss_fn, tokens, len(RL_PROMPTS))
    assert_different_steps(model, loss_fn, len, len(RL_PROMPTS))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_micro_batched_dpo_gradient_equals_the_whole_batch(tiny_model_dir, loss):
    """DPO's loss is a mean over pairs (chosen and rejected in one forward): micro-batches weigh their pairs."""
    from stages.kinds.dpo import Params
    from stages.runs.dpo import pairwise_step, sequence_logps

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_policy(str(tiny_model_dir))
    chosen = batch_of(tokenizer, RL_PROMPTS[:5], RL_RESPONSES[:5])
    rejected = batch_of(tokenizer, RL_PROMPTS[:5], RL_RESPONSES[1:6])
    ref = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    p = Params(loss=loss, beta=0.5)

    def loss_fn(idx):
        logps = torch.cat([sequence_logps(model, chosen.select(idx)), sequence_logps(model, rejected.select(idx))])
        return pairwise_step(p, logps, torch.cat([ref[0, idx], ref[1, idx]]))

    assert_same_steps(model, loss_fn, len, 5)
    assert_different_steps(model, loss_fn, lambda idx: 1.0, 5)  # equal shares: what 1/n accumulation did


def test_aggregation_sizes_recover_the_whole_loss():
    loss_mat = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(7)[None] < torch.tensor([7, 2, 0, 5, 1])[:, None]).float()
    for mode in A.LOSS_AGG_MODES:
        whole = A.aggregate_loss(loss_mat, mask, mode, 9)
        chunks = [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3, 4])]
        total = A.aggregation_size(mask, mode)
        split = sum(A.aggregate_loss(loss_mat[c], mask[c], mode, 9) * A.aggregation_size(mask[c], mode) / total
                    for c in chunks)
        torch.testing.assert_close(split, whole)


def test_gradient_accumulation_steps_is_refused_with_its_replacement():
    from pydantic import ValidationError

    from stages.kinds.sft import Params
    with pytest.raises(ValidationError, match="gradient_accumulation_steps: replaced by micro_batch_size"):
        Params(gradient_accumulation_steps=2)
    assert Params().micro_batch_size == 4
