"""Real-layout models and data: a Qwen2 checkpoint with a byte-level BPE ChatML tokenizer, Hub-layout chat datasets,
LoRA with the reference as adapters-off, length budgets, and the README's real-model pipeline end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from flows import cli
from stages.context import StageContext
from stages.data import load_rows
from stages.kinds import get_kind
from stages.models import ADAPTER_CONFIG, LoraParams, load_policy, load_tokenizer, with_lora
from stages.spec import DataInput
from stages.text import encode_conversation, encode_row, fit_rows, response_logprobs, sample
from stages.training import reference_logprobs
from tests.conftest import REPO, Tracker, make_project
from tests.real_layout import build_hub_datasets, build_qwen2


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_layout")
    build_qwen2(root / "qwen2")
    build_hub_datasets(root)
    return root


def test_hub_layout_datasets_load_with_their_column_shapes(fixtures: Path):
    chat = load_rows(DataInput(path=str(fixtures / "chat"), split="train"))
    prefs = load_rows(DataInput(path=str(fixtures / "preferences"), split="test"))
    assert chat[0]["messages"][0]["role"] == "system" and prefs[0]["chosen"][0]["role"] == "assistant"
    assert {"prompt", "chosen", "rejected"} == set(prefs[0])


def test_assistant_only_loss_mask_on_a_multi_turn_row(fixtures: Path):
    tokenizer = load_tokenizer(str(fixtures / "qwen2"))
    messages = [{"role": "system", "content": "Answer with words only."},
                {"role": "user", "content": "name two colors"}, {"role": "assistant", "content": "red blue"},
                {"role": "user", "content": "name two fruits"}, {"role": "assistant", "content": "fig lime"}]
    prompt_ids, response_ids, mask = encode_conversation(tokenizer, messages)
    prompt = tokenizer.decode(prompt_ids)
    assert prompt.startswith("<|im_start|>system\nAnswer with words only.<|im_end|>")  # the system turn is kept
    assert prompt.endswith("<|im_start|>assistant\n")
    trained = tokenizer.decode([t for t, m in zip(response_ids, mask) if m])
    masked = tokenizer.decode([t for t, m in zip(response_ids, mask) if not m])
    assert trained == "red blue<|im_end|>fig lime<|im_end|>"
    assert masked == "\n<|im_start|>user\nname two fruits<|im_end|>\n<|im_start|>assistant\n\n"


def test_length_budgets_truncate_and_count_and_name_a_row_that_cannot_fit(fixtures: Path):
    tokenizer = load_tokenizer(str(fixtures / "qwen2"))
    rows = load_rows(DataInput(path=str(fixtures / "chat"), split="train"))
    encoded = [encode_row(tokenizer, r) for r in rows]
    longest = max(len(p) + len(r) for p, r, _ in encoded)
    fitted, truncated = fit_rows(encoded, "input 'data' (fixtures/chat)", None, 64)
    assert truncated == sum(len(p) + len(r) > 64 for p, r, _ in encoded) > 0
    assert all(len(p) + len(r) <= 64 for p, r, _ in fitted) and longest > 64
    fitted, _ = fit_rows(encoded, "x", 12, None)  # prompts keep their last 12 tokens (the assistant header)
    assert all(p == q[-12:] for (p, _, _), (q, _, _) in zip(fitted, encoded))
    with pytest.raises(ValueError, match=r"input 'data' \(fixtures/chat\): row 0 cannot fit"):
        fit_rows(encoded, "input 'data' (fixtures/chat)", None, 30)  # prompts are ~50 tokens


def stage_context(kind: str, params: dict, inputs: dict, out: Path) -> StageContext:
    spec = get_kind(kind)
    return StageContext("test", kind, 0, spec.params(**params), inputs,
                        {name: out / path for name, path in spec.outputs.items()}, out, None, Accelerator(cpu=True),
                        Tracker())


def test_lora_reference_is_the_base_and_only_adapters_train(fixtures: Path, tmp_path: Path):
    base_path = str(fixtures / "qwen2")
    tokenizer = load_tokenizer(base_path)
    base = load_policy(base_path).eval()
    policy = with_lora(load_policy(base_path), LoraParams(r=4, alpha=8)).eval()
    with torch.no_grad():  # adapters on but untrained (B = 0) and off: both the base model, exactly
        policy.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.normal_()
    batch = sample(base, tokenizer, ["name two colors", "name three tools"], 6).batch
    with torch.no_grad():
        ref = reference_logprobs(Accelerator(cpu=True), policy, None, batch)
        assert torch.equal(ref, response_logprobs(base, batch))
        assert not torch.equal(response_logprobs(policy, batch), ref)  # the adapters change the policy

    ctx = stage_context("sft", {"epochs": 1, "batch_size": 16, "lr": 1e-2, "lora": {"r": 4, "alpha": 8}},
                        {"base": DataInput(path=base_path), "data": DataInput(path=str(fixtures / "chat"), split="train")},
                        tmp_path)
    get_kind("sft").load_run()(ctx)
    saved = tmp_path / "model"
    assert (saved / ADAPTER_CONFIG).exists() and not (saved / "model.safetensors").exists()
    adapters = load_file(saved / "adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)
    assert any(w.abs().sum() > 0 for name, w in adapters.items() if "lora_B" in name)  # they trained
    # a downstream stage loads the adapter directory as a model: base + merged adapters, the base untouched
    merged, untouched = load_policy(str(saved)), load_file(fixtures / "qwen2" / "model.safetensors")
    merged_q = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged_q, untouched["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged.model.embed_tokens.weight, untouched["model.embed_tokens.weight"])


def test_lora_reward_model_trains_adapters_and_head_only(fixtures: Path, tmp_path: Path):
    ctx = stage_context("reward_model", {"epochs": 1, "batch_size": 16, "lr": 1e-2, "lora": {"r": 4, "alpha": 8}},
                        {"base": DataInput(path=str(fixtures / "qwen2")),
                         "comparisons": DataInput(path=str(fixtures / "preferences"), split="train"),
                         "demos": DataInput(path=str(fixtures / "chat"), split="train")},
                        tmp_path)
    kind = get_kind("reward_model")
    trainable: dict[str, torch.Tensor] = {}
    original_prepare = ctx.accelerator.prepare

    def record(*objects):  # the model as the optimiser sees it: which parameters are trainable
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                trainable.update({n: p for n, p in obj.named_parameters() if p.requires_grad})
        return original_prepare(*objects)

    ctx.accelerator.prepare = record
    metrics = kind.load_run()(ctx)
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)
    saved = load_file(tmp_path / "model" / "model.safetensors")  # merged: the bias and the head in one model
    assert "score.weight" in saved and not any("lora_" in n for n in saved)
    assert abs(metrics["demo_mean_reward"]) < 1e-5


@pytest.mark.e2e
def test_readme_real_model_pipeline_runs_end_to_end(fixtures: Path, tmp_path: Path, monkeypatch, prefect_server):
    make_project(tmp_path, REPO / "tests" / "pipelines" / "tiny_qwen.yaml")
    shutil.copytree(fixtures, tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli.execute(["-c", "pipelines.yaml", "run", "tiny-qwen"]) == \
        "tiny-qwen: ran sft, reward_model, ppo, grpo; up to date: none"
    metrics = {s: json.loads((tmp_path / f"artifacts/tiny-qwen/{s}/metrics.json").read_text())
               for s in ("sft", "reward_model", "ppo", "grpo")}
    assert metrics["sft"]["truncated_rows"] > 0  # max_length: 72 cuts the longest multi-turn rows
    assert metrics["grpo"]["truncated_prompts"] > 0  # max_prompt_length: 48 cuts the ~52-token prompts
    for stage in ("sft", "ppo", "grpo"):
        assert (tmp_path / f"artifacts/tiny-qwen/{stage}/model" / ADAPTER_CONFIG).exists()


def test_a_sequence_classification_reward_model_loads_as_the_scalar_head(fixtures: Path, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    from stages.models import last_token_scores, load_scalar_head_model

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(fixtures / "qwen2", num_labels=1).eval()
    rm.save_pretrained(tmp_path / "rm")  # what TRL's RewardTrainer writes: score.weight, no bias
    tokenizer = load_tokenizer(str(fixtures / "qwen2"))
    head = load_scalar_head_model(str(tmp_path / "rm"), tokenizer.pad_token_id).eval()
    assert head.score.bias is None and head.dropout.p == 0.0
    ids = torch.tensor([tokenizer("name two colors red blue")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(last_token_scores(head, ids, torch.ones_like(ids)), rm(input_ids=ids).logits[:, 0],
                              atol=1e-5)


def test_lora_dpo_takes_the_reference_from_the_adapters_off(fixtures: Path, tmp_path: Path):
    torch.manual_seed(0)  # the adapters' initialisation
    ctx = stage_context("dpo", {"epochs": 3, "batch_size": 16, "lr": 1e-2, "lora": {"r": 4, "alpha": 8}},
                        {"policy": DataInput(path=str(fixtures / "qwen2")),
                         "comparisons": DataInput(path=str(fixtures / "preferences"), split="train")}, tmp_path)
    metrics = get_kind("dpo").load_run()(ctx)
    losses = [m["loss"] for m in ctx.tracker.logged]
    assert losses[0] == pytest.approx(0.693147, abs=1e-5)  # untrained adapters: π = π_ref, h = 0, -log σ(0)
    third = len(losses) // 3
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third  # the last epoch fits better than the first
    assert "eval_accuracy" in metrics
    stored = [json.loads(line) for line in (tmp_path / "reference_logps/train.jsonl").read_text().splitlines()]
    assert stored and not any(key.startswith("ref_") for key in stored[0])  # nothing precomputed
