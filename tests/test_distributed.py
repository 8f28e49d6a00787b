"""Every training kind on 2 CPU processes (gloo via accelerate launch), under FSDP2, and in bf16.

One pipeline holds a stage per case; the module fixture runs each stage once with `rl4llm stage`, as DVC does under
`rl4llm run` (forked from a warm interpreter), and every rank records the row ids it trained on (RL4LLM_TRACE_DIR).
Models come from the path real users take: `model:` points at a saved HF directory and the data are local files with
a column mapping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.distributed import TRACE_DIR_ENV
from tests.conftest import make_project, warm_stage_processes, write_instruct_data

pytestmark = pytest.mark.e2e

DDP, FSDP = "infra/accelerate/cpu_2proc.yaml", "infra/accelerate/fsdp_cpu_2proc.yaml"
SFT = {"kind": "sft", "inputs": {"data": "datasets.demos"},
       "params": {"epochs": 2, "batch_size": 8, "lr": 0.01, "holdout_fraction": 0.2}}
REWARD_MODEL = {"kind": "reward_model", "inputs": {"comparisons": "datasets.comparisons", "demos": "datasets.demos"},
                "params": {"epochs": 1, "batch_size": 8}}
DPO = {"kind": "dpo", "inputs": {"policy": "sft.model", "comparisons": "datasets.comparisons"},
       "params": {"epochs": 1, "batch_size": 8, "eval_fraction": 0.2}}
GRPO = {"kind": "grpo",
        "inputs": {"policy": "sft.model", "prompts": "datasets.prompts", "eval": "datasets.prompts"},
        "params": {"evaluator": "instruct_gold", "eval_samples_per_prompt": 1, "iterations": 3, "prompts_per_step": 4,
                   "samples_per_prompt": 4, "minibatch_size": 8, "max_new_tokens": 6, "lr": 0.01,
                   "rewards": {"overlong": 1.0}, "reward_params": {"overlong": {"max_length": 5, "buffer": 3}},
                   "temperature": 0.7}}
STAGES = [
    {"name": "sft", **SFT, "accelerate_config": DDP},
    {"name": "sft_one", **SFT},
    {"name": "sft_fsdp", **SFT, "accelerate_config": FSDP},
    {"name": "sft_mixed_bf16", **SFT, "accelerate_config": "infra/accelerate/single_bf16.yaml"},
    {"name": "sft_bf16", **SFT, "params": {**SFT["params"], "dtype": "bfloat16"}},
    {"name": "sft_accumulated", **SFT, "params": {**SFT["params"], "micro_batch_size": 2}},
    {"name": "sft_cosine", **SFT, "params": {**SFT["params"], "lr_scheduler": "cosine", "warmup_ratio": 0.5}},
    {"name": "pretrain", "kind": "pretrain", "inputs": {"corpus": "datasets.corpus"}, "accelerate_config": DDP,
     "params": {"hidden_size": 16, "layers": 1, "epochs": 1, "batch_size": 16}},
    {"name": "reward_model", **REWARD_MODEL, "accelerate_config": DDP},
    {"name": "reward_model_one", **REWARD_MODEL},
    {"name": "dpo", **DPO, "accelerate_config": DDP},
    {"name": "dpo_one", **DPO},
    {"name": "distill", "kind": "distill", "inputs": {"data": "datasets.demos"}, "accelerate_config": DDP,
     "params": {"epochs": 1, "batch_size": 8}},
    {"name": "label_preferences", "kind": "label_preferences", "accelerate_config": DDP,
     "inputs": {"policy": "sft.model", "prompts": "datasets.prompts"}, "params": {"prompts": 10,
                                                                                 "responses_per_prompt": 2}},
    {"name": "rejection_sampling", "kind": "rejection_sampling", "accelerate_config": DDP,
     "inputs": {"policy": "sft.model", "prompts": "datasets.prompts"}, "params": {"prompts": 10,
                                                                                 "filters": ["dedup"]}},
    {"name": "ppo", "kind": "ppo", "accelerate_config": DDP,
     "inputs": {"policy": "sft.model", "reward": "reward_model.model", "prompts": "datasets.prompts"},
     "params": {"iterations": 2, "rollout_prompts": 8, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6,
                "temperature": 0.7}},
    {"name": "grpo", **GRPO, "accelerate_config": DDP},
    {"name": "grpo_fsdp", **GRPO, "accelerate_config": FSDP},
]
TRAINED = ["sft", "pretrain", "reward_model", "dpo", "distill", "label_preferences", "rejection_sampling", "ppo",
           "grpo"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("dist")
    datasets = write_instruct_data(root)
    make_project(root)
    (root / "infra/accelerate/single_bf16.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nmixed_precision: bf16\n")
    config = {"pipelines": {"dist": {"defaults": {"seed": 0, "model": str(tiny_model_dir)}, "datasets": datasets,
                                     "stages": STAGES}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = [sys.executable, "-m", "flows.cli"]
    with warm_stage_processes() as warm:  # as under `rl4llm run`: a 2-process stage launches from a forked child
        env = {**warm, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", TRACE_DIR_ENV: str(root / "trace")}
        subprocess.run([*cli, "sync"], cwd=root, env=env, check=True, timeout=120)
        for stage in STAGES:
            subprocess.run([*cli, "stage", "dist", stage["name"]], cwd=root, env=env, check=True, timeout=300)
    return root


def metrics(project: Path, stage: str) -> dict[str, float]:
    return json.loads((project / f"artifacts/dist/{stage}/metrics.json").read_text())


def weights(project: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(project / f"artifacts/dist/{stage}/model/model.safetensors")


def assert_same_weights(project: Path, a: str, b: str, atol: float) -> None:
    wa, wb = weights(project, a), weights(project, b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=1e-3, msg=f"{a} vs {b}: {name}")


@pytest.mark.parametrize("stage", TRAINED)
def test_each_rank_sees_a_disjoint_share_covering_the_global_batches(project: Path, stage: str):
    ranks = [json.loads((project / f"trace/dist.{stage}.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] and ranks[1]
    assert len(ranks[0]) == len(ranks[1])
    if stage in ("ppo", "grpo"):  # per iteration: a disjoint share of the globally drawn prompts
        per_iteration = len(ranks[0]) // STAGES_BY_NAME[stage]["params"]["iterations"]
        for start in range(0, len(ranks[0]), per_iteration):
            assert not set(ranks[0][start:start + per_iteration]) & set(ranks[1][start:start + per_iteration])
    elif stage in ("label_preferences", "rejection_sampling"):  # 10 prompts, 5 each
        assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 10
    else:  # every epoch covers the training rows once, half on each rank
        seen = sorted(ranks[0] + ranks[1])
        epochs = STAGES_BY_NAME[stage]["params"]["epochs"]
        assert seen == sorted(list(range(len(seen) // epochs)) * epochs)


STAGES_BY_NAME = {s["name"]: s for s in STAGES}


@pytest.mark.parametrize("stage", ["sft", "reward_model", "dpo"])
def test_two_processes_match_one_process(project: Path, stage: str, tiny_model_dir: Path):
    assert_same_weights(project, f"{stage}_one", stage, atol=1e-4)
    initial, trained = load_file(tiny_model_dir / "model.safetensors"), weights(project, stage)
    assert any(not torch.equal(trained[n], initial[n]) for n in initial if n in trained)
    for key, value in metrics(project, f"{stage}_one").items():
        assert metrics(project, stage)[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_fsdp_saves_a_plain_model_matching_ddp(project: Path, stage: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(project / f"artifacts/dist/{stage}_fsdp/model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert_same_weights(project, stage, f"{stage}_fsdp", atol=1e-3)
    for key, value in metrics(project, stage).items():
        assert metrics(project, f"{stage}_fsdp")[key] == pytest.approx(value, abs=0.05), key


def test_bf16_mixed_precision_and_bf16_weights(project: Path):
    assert torch.isfinite(torch.tensor(metrics(project, "sft_mixed_bf16")["eval_loss"]))
    assert metrics(project, "sft_mixed_bf16")["eval_loss"] < 10
    assert all(w.dtype == torch.float32 for w in weights(project, "sft_mixed_bf16").values())
    assert all(w.dtype == torch.bfloat16 for w in weights(project, "sft_bf16").values())
    assert torch.isfinite(torch.tensor(metrics(project, "sft_bf16")["eval_loss"]))


def test_gradient_accumulation_keeps_the_global_batch(project: Path):
    assert_same_weights(project, "sft_one", "sft_accumulated", atol=1e-5)


def test_lr_schedule_changes_the_run(project: Path):
    runs = [weights(project, s) for s in ("sft_one", "sft_cosine")]
    assert any(not torch.allclose(runs[0][n], runs[1][n], atol=1e-4) for n in runs[0])
