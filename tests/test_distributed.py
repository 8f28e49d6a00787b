"""Every training kind on 2 CPU processes (gloo via accelerate launch), under FSDP2, and in bf16.

One pipeline holds a stage per case; the module fixture runs each stage once with `rl4llm stage`, as DVC does under
`rl4llm run` (forked from a warm interpreter), and every rank records the row ids it trained on (RL4LLM_TRACE_DIR).
Models come from the path real users take: `model:` points at a saved HF directory and the data are local files with
a column mapping.

A stage across machines (accelerate's multi-node launch) is proven with two "machines" on 127.0.0.1: machine 0 runs
`rl4llm stage` in the project, machine 1 at the same time in a copy of it (as a second machine runs in its own
checkout), each with its rank in RL4LLM_MACHINE_RANK and one process; they train the weights of the 2-process `sft`
stage, and only machine 0 publishes (tests/test_multinode.py: machine ranks and multi-machine configs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.distributed import TRACE_DIR_ENV
from stages.runner import MACHINE_RANK_ENV, MAIN_PORT_ENV
from tests.conftest import free_port, make_project, warm_stage_processes, write_instruct_data

pytestmark = pytest.mark.e2e

DDP, FSDP = "infra/accelerate/cpu_2proc.yaml", "infra/accelerate/fsdp_cpu_2proc.yaml"
MULTI_NODE = "infra/accelerate/multi_node_cpu.yaml"
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
    {"name": "sft_two_machines", **SFT, "accelerate_config": MULTI_NODE},  # launched by `machines`
]
TRAINED = ["sft", "pretrain", "reward_model", "dpo", "distill", "label_preferences", "rejection_sampling", "ppo",
           "grpo"]


@pytest.fixture(scope="module")
def warm() -> Iterator[dict[str, str]]:
    """The environment in which the module's `rl4llm stage` commands fork from one warm interpreter, as under
    `rl4llm run` (a 2-process stage launches from a forked child)."""
    with warm_stage_processes() as env:
        yield env


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir: Path, warm: dict[str, str]) -> Path:
    root = tmp_path_factory.mktemp("dist")
    datasets = write_instruct_data(root)
    make_project(root)
    (root / "infra/accelerate/single_bf16.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nmixed_precision: bf16\n")
    config = {"pipelines": {"dist": {"defaults": {"seed": 0, "model": str(tiny_model_dir)}, "datasets": datasets,
                                     "stages": STAGES}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = [sys.executable, "-m", "flows.cli"]
    env = {**warm, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", TRACE_DIR_ENV: str(root / "trace")}
    subprocess.run([*cli, "sync"], cwd=root, env=env, check=True, timeout=120)
    for stage in STAGES[:-1]:  # sft_two_machines: `machines`
        subprocess.run([*cli, "stage", "dist", stage["name"]], cwd=root, env=env, check=True, timeout=300)
    return root


def launch_machines(checkouts: list[Path], env: dict[str, str]) -> list[tuple[int, str, str]]:
    """`rl4llm stage dist sft_two_machines` at once in each checkout, machine rank r in checkouts[r]: each one's
    exit code, stdout and stderr."""
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "dist", "sft_two_machines"], cwd=cwd,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              env={**env, MACHINE_RANK_ENV: str(rank), MAIN_PORT_ENV: port})
             for rank, cwd in enumerate(checkouts)]
    try:
        outputs = [rank.communicate(timeout=240) for rank in ranks]
    finally:  # a machine that never joins leaves the other waiting at the rendezvous: end both, with their workers
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)
                rank.wait()
    return [(rank.returncode, out, err) for rank, (out, err) in zip(ranks, outputs)]


@pytest.fixture(scope="module")
def machines(project: Path, warm: dict[str, str], tmp_path_factory) -> dict:
    """The 2-machine stage, run once the project's other stages ran: machine 1's checkout, and what machine 1's
    command said."""
    other = tmp_path_factory.mktemp("machine1") / "checkout"
    shutil.copytree(project, other)  # machine 1's own checkout: the same files, inputs in place (as after a dvc pull)
    kept = other / "artifacts/dist/sft_two_machines"  # a machine of rank > 0 writes, claims and removes no output
    kept.mkdir(parents=True)
    (kept / "theirs.txt").write_text("untouched\n")
    env = {**warm, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    results = launch_machines([project, other], env)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"machine {rank}: {out}\n{err}"
    return {"other": other, "kept": kept, "env": env, "stdout": results[1][1], "stderr": results[1][2]}


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


def test_two_machines_train_the_weights_of_two_processes(project: Path, machines: dict, tiny_model_dir: Path):
    one, two = weights(project, "sft"), weights(project, "sft_two_machines")
    assert one.keys() == two.keys()
    for name in one:  # the same world size and collectives: bit for bit (measured)
        torch.testing.assert_close(two[name], one[name], atol=0, rtol=0, msg=name)
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(two[n], initial[n]) for n in initial if n in two)
    assert metrics(project, "sft_two_machines") == metrics(project, "sft")


def test_only_machine_0_publishes(machines: dict):
    assert [p.name for p in machines["kept"].iterdir()] == ["theirs.txt"]
    assert not (machines["other"] / "artifacts/dist/.sft_two_machines.partial").exists()
    assert "machine 1 of 2 done; machine 0 publishes" in machines["stderr"]
    assert json.loads(machines["stdout"].strip().splitlines()[-1]) == {}


def test_a_machine_with_other_inputs_is_refused(project: Path, machines: dict, tmp_path: Path):
    other = tmp_path / "checkout"
    shutil.copytree(machines["other"], other)
    with (other / "demos.jsonl").open("a") as demos:  # a machine that pulled another version of the data
        demos.write(json.dumps({"instruction": "name one animal", "output": "cat dog"}) + "\n")
    published = (project / "artifacts/dist/sft_two_machines/metrics.json").read_text()
    results = launch_machines([project, other], machines["env"])
    for rank, (code, out, err) in enumerate(results):
        assert code != 0, f"machine {rank}: {out}\n{err}"  # torchrun ends 1 whatever its ranks' codes (here 2)
        assert "bad input: ValueError: dist/sft_two_machines: rank(s) 1 read another spec or other inputs than " \
            "rank 0" in err, err
    assert (project / "artifacts/dist/sft_two_machines/metrics.json").read_text() == published
