"""The rollout layer without vLLM: the hf engine's samples and log-probs, truncated importance sampling, the weights
pushed to a server (LoRA merged, only what training changes), the guard that takes a server's processes down, and
the errors a `vllm` stage gives before it starts anything. (The vllm engine itself: tests/test_vllm.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from stages import algorithms as A
from stages.models import load_policy, load_tokenizer, with_lora
from stages.params import LoraParams, RolloutParams
from stages.rollout import HFEngine, logprob_gap, wants_logprobs
from stages.text import logprob_rows, response_logprobs, sample
from stages.vllm_engine import VLLM_PYTHON_ENV, check_head_size, fingerprint, policy_weights, vllm_python
from tests.conftest import session_processes

PROMPTS = ["name two colors", "name three animals"] * 4


def test_hf_engine_samples_as_sample_does_and_its_logprobs_are_the_trainers(tiny_model_dir: Path):
    model, tokenizer = load_policy(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(3)
    plain = sample(model, tokenizer, PROMPTS, 8, 0.7)
    torch.manual_seed(3)
    engined = sample(model, tokenizer, PROMPTS, 8, 0.7, engine=HFEngine(), logprobs=True)
    assert engined.completions == plain.completions and torch.equal(engined.batch.ids, plain.batch.ids)
    with torch.no_grad():
        trainer = response_logprobs(model.eval(), engined.batch, 0.7)
    mask = engined.batch.response_mask
    assert_close(engined.engine_logprobs * mask, trainer * mask)
    assert plain.engine_logprobs is None


def test_only_another_engine_or_tis_asks_for_logprobs():
    assert not wants_logprobs(RolloutParams())
    assert wants_logprobs(RolloutParams(engine="vllm"))
    assert wants_logprobs(RolloutParams(tis_cap=2.0))


def test_truncated_importance_weights_are_the_capped_ratio():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    # π_old / π_engine = 2, 0.5, 9 -> capped at 3
    assert_close(A.truncated_importance_weights(old, engine, 3.0), torch.tensor([[2.0, 0.5, 3.0]]))


def test_token_weights_scale_each_tokens_policy_loss():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.ones(2, 4)
    weights = torch.tensor([[1.0, 2.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    weighted, _ = A.ppo_policy_loss(logp, old, adv, mask, token_weights=weights)
    ratio = torch.exp(logp - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert_close(weighted, (per_token * weights).sum() / mask.sum())
    unweighted, _ = A.ppo_policy_loss(logp, old, adv, mask)
    assert_close(unweighted, per_token.mean())


def test_logprob_gap_counts_response_tokens_only():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    engine = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -0.75, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the -9 is past the first response's end
    gap = logprob_gap(trainer, engine, mask)
    assert gap == {"logprob_gap_mean": pytest.approx(0.75 / 4), "logprob_gap_max": pytest.approx(0.5)}
    assert_close(logprob_rows([[-1.0], [-2.0, -3.0]], 3), torch.tensor([[-1.0, 0.0, 0.0], [-2.0, -3.0, 0.0]]))


def test_pushed_weights_are_the_merged_model_and_only_what_training_changes(tiny_model_dir: Path):
    torch.manual_seed(0)
    model = with_lora(load_policy(str(tiny_model_dir)), LoraParams(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B = 0 at the start: make the adapters matter
    full = policy_weights(model, changed_only=False)
    changed = policy_weights(model, changed_only=True)
    reference = model.merge_and_unload().state_dict()
    assert full.keys() == reference.keys()
    for key, value in full.items():
        assert_close(value, reference[key])
    assert sorted(changed) == sorted(k for k in reference if k.endswith(("q_proj.weight", "v_proj.weight")))
    assert all("lora" not in k and "base_layer" not in k for k in full)


def test_tied_embeddings_are_pushed_under_both_names(tiny_model_dir: Path):
    model = load_policy(str(tiny_model_dir))
    assert model.config.tie_word_embeddings
    changed = policy_weights(model, changed_only=True)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed.keys()
    assert_close(changed["lm_head.weight"], changed["model.embed_tokens.weight"])
    model.get_input_embeddings().weight.requires_grad_(False)
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & policy_weights(model, changed_only=True).keys()


def test_pushing_leaves_a_lora_model_as_it_was(tiny_model_dir: Path):
    model = with_lora(load_policy(str(tiny_model_dir)), LoraParams(r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy_weights(model, changed_only=True)
    for key, value in model.state_dict().items():
        assert_close(value, before[key], atol=1e-6, rtol=0)


def test_fingerprint_changes_with_an_optimiser_step_only(tiny_model_dir: Path):
    model = load_policy(str(tiny_model_dir))
    start = fingerprint(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert fingerprint(model) == start
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimiser.step()
    assert fingerprint(model) != start


def test_a_head_size_without_a_cpu_kernel_is_refused_at_start(tiny_model_dir: Path):
    model = load_policy(str(tiny_model_dir))  # hidden 32, 2 heads: head size 16
    if torch.cuda.is_available():
        pytest.skip("the head-size limit is vLLM's CPU backend's")
    with pytest.raises(ValueError, match="head size is 16; vLLM on CPU supports 32, 64"):
        check_head_size(model)


def test_a_missing_vllm_environment_says_how_to_build_one(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(ValueError, match="run `make vllm`.*or give rollout.url"):
        vllm_python(tmp_path)


def test_the_guard_takes_every_process_of_its_command_down_when_the_stage_dies(tmp_path: Path):
    """A stage (here a shell) starts the guard; the guarded command starts a grandchild in the background (as
    vLLM's API server starts its engine core). SIGKILL of the stage: nothing of the guard's group survives."""
    started = tmp_path / "started"
    stage = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from stages.processes import die_with_parent\n"
        "g = subprocess.Popen([sys.executable, '-m', 'stages.guard', 'sh', '-c', "
        f"'sleep 300 & echo $$ > {started}; wait'], start_new_session=True, preexec_fn=die_with_parent)\n"
        "print(g.pid, flush=True)\n"
        "time.sleep(300)\n")], stdout=subprocess.PIPE, text=True)
    guard = int(stage.stdout.readline())
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(session_processes(guard)) >= 3  # the guard, the shell, its sleep
    os.kill(stage.pid, signal.SIGKILL)
    stage.wait()
    deadline = time.monotonic() + 30
    while session_processes(guard) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(guard) == set()
