"""Log-probs for the PPO/GRPO ratio and KL are those of the policy that sampled: the sampling temperature, eval mode,
no dropout."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from stages.models import load_tokenizer
from stages.text import encode_prompt, pad, pair_batch, response_logprobs, sample
from stages.training import disable_dropout


def test_training_logprobs_equal_generate_scores_at_temperature(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [encode_prompt(tokenizer, p) for p in ("say red", "name two fruits please")]
    ids, mask = pad(prompts, tokenizer.pad_token_id, "left")
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.7,
                         top_k=0, top_p=1.0, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    responses = out.sequences[:, ids.shape[1]:]
    scores = torch.stack(out.scores, 1).log_softmax(-1)  # generate's scores are the logits divided by T
    generated = scores.gather(-1, responses[..., None]).squeeze(-1)
    rows = [r.tolist()[:r.tolist().index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in r.tolist()
            else r.tolist() for r in responses]
    batch = pair_batch(prompts, rows, tokenizer.pad_token_id)
    with torch.no_grad():
        trained = response_logprobs(model, batch, temperature=0.7)
        untempered = response_logprobs(model, batch)
    keep = batch.response_mask.bool()
    torch.testing.assert_close(trained[keep], generated[:, :keep.shape[1]][keep], atol=1e-5, rtol=0)
    assert not torch.allclose(untempered[keep], generated[:, :keep.shape[1]][keep], atol=1e-3)


def test_rollout_scoring_sees_the_training_policy_with_dropout(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    model.train()
    torch.manual_seed(0)
    samples = sample(model, tokenizer, ["say red", "say blue"] * 2, 6)
    assert model.training  # sampling leaves the mode as it was
    with torch.no_grad():
        model.eval()
        old_logp = response_logprobs(model, samples.batch)  # rollout scoring: eval mode
        model.train()
        noisy = response_logprobs(model, samples.batch)
        disable_dropout(model)
        new_logp = response_logprobs(model, samples.batch)  # the first minibatch of the update
    keep = samples.batch.response_mask.bool()
    assert not torch.equal(noisy[keep], old_logp[keep])  # with dropout on, the ratio would start away from 1
    assert torch.equal((new_logp - old_logp)[keep].exp(), torch.ones(int(keep.sum())))
