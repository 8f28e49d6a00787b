"""Crash safety of single stages, by fault injection: a stage killed (SIGKILL) at any point, then run again, ends
bit-identical to a run that was never interrupted, and redoes only the steps after its last checkpoint; SIGINT stops
it after a checkpoint (exit 130, MLflow run KILLED); a diverging run stops at the first non-finite step.

Each case is a copy of a stage under another name (same spec, so the same seed and data order): the original runs
uninterrupted, the copy is killed at a fault point (`RL4LLM_FAULT=<point>:<step>`) and rerun. Every `rl4llm stage`
forks from one warm interpreter, as under `rl4llm run` (a killed stage is the warm process's child; the command
still ends by its signal): seconds of imports saved per run. tests/test_killed_stage.py kills stages started cold.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.checkpoint import CHECKPOINTS, complete_checkpoints
from stages.loop import FAULT_ENV
from tests.conftest import make_project, warm_stage_processes, write_instruct_data
from tests.test_multiturn import tool_policy

pytestmark = pytest.mark.e2e

SFT = {"kind": "sft", "inputs": {"data": "datasets.demos"},
       "params": {"epochs": 2, "batch_size": 8, "lr": 0.01, "holdout_fraction": 0.2, "checkpoint_every": 2,
                  "log_every": 1}}
PPO = {"kind": "ppo", "inputs": {"policy": "sft.model", "reward": "reward_model.model", "prompts": "datasets.prompts",
                                 "ptx": "datasets.corpus"},
       "params": {"iterations": 4, "checkpoint_every": 2, "rollout_prompts": 8, "minibatch_size": 4, "ppo_epochs": 1,
                  "max_new_tokens": 6, "temperature": 0.7, "adaptive_kl": True, "ptx_batch_size": 4}}
GRPO = {"kind": "grpo", "inputs": {"policy": "sft.model", "prompts": "datasets.prompts"},
        "params": {"iterations": 4, "checkpoint_every": 2, "prompts_per_step": 4, "samples_per_prompt": 4,
                   "minibatch_size": 8, "max_new_tokens": 6, "lr": 0.01, "rewards": {"overlong": 1.0},
                   "reward_params": {"overlong": {"max_length": 5, "buffer": 3}}, "dynamic_sampling": True}}
# multi-turn: a tiny policy over the tags calls a toy tool by chance (tests/test_multiturn.py)
GRPO_TOOLS = {"kind": "grpo", "inputs": {"policy": "datasets.tool_policy", "prompts": "datasets.prompts"},
              "params": {**GRPO["params"], "max_new_tokens": 16, "tools": {"search": "tests.test_multiturn:recall"},
                         "reward_params": {"overlong": {"max_length": 12, "buffer": 6}}, "dynamic_sampling": False}}
KINDS = {"sft": SFT, "ppo": PPO, "grpo": GRPO, "grpotools": GRPO_TOOLS}
TOTAL_STEPS = {"sft": 8, "ppo": 4, "grpo": 4, "grpotools": 4}  # sft: 32 training rows / 8 per batch × 2 epochs
FSDP = "infra/accelerate/fsdp_cpu_2proc.yaml"  # two CPU processes, parameters and optimiser state sharded
# (stage copy, the uninterrupted stage it copies, fault point, step of the checkpoint the rerun resumes from)
KILLS = [("ppo_before_first_checkpoint", "ppo", "step:1", 0), ("ppo_between_checkpoints", "ppo", "step:3", 2),
         ("ppo_while_saving", "ppo", "saving:2", 0), ("ppo_before_publishing", "ppo", "publish:0", 2),
         ("grpo_between_checkpoints", "grpo", "step:3", 2), ("sft_between_checkpoints", "sft", "step:5", 4),
         ("grpotools_between_checkpoints", "grpotools", "step:3", 2),
         ("sft_fsdp_between_checkpoints", "sft_fsdp", "step:5", 4)]
STAGES = [{"name": "sft", **SFT},
          {"name": "reward_model", "kind": "reward_model", "params": {"epochs": 1, "batch_size": 8},
           "inputs": {"comparisons": "datasets.comparisons", "demos": "datasets.demos"}},
          {"name": "ppo", **PPO}, {"name": "grpo", **GRPO}, {"name": "grpotools", **GRPO_TOOLS},
          {"name": "sft_fsdp", **SFT, "accelerate_config": FSDP},
          *({"name": name, **KINDS[baseline.split("_")[0]]} for name, baseline, _, _ in KILLS
            if not baseline.endswith("fsdp")),
          {"name": "sft_fsdp_between_checkpoints", **SFT, "accelerate_config": FSDP},
          {"name": "sft_diverging", **SFT, "params": {**SFT["params"], "lr": 1e6, "max_grad_norm": None}},
          {"name": "ppo_interrupted", **PPO, "params": {**PPO["params"], "iterations": 200}}]


def stage_command(name: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "stage", "crash", name]


@pytest.fixture(scope="module")
def warm() -> Iterator[None]:
    """One warm interpreter for the module's stages (each `env()` names it)."""
    with warm_stage_processes():
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir: Path, warm: None) -> Path:
    root = tmp_path_factory.mktemp("crash")
    datasets = write_instruct_data(root)
    tool_policy(root / "tool_policy")
    datasets["tool_policy"] = {"path": "tool_policy"}
    make_project(root)
    config = {"pipelines": {"crash": {"defaults": {"seed": 0, "model": str(tiny_model_dir)}, "datasets": datasets,
                                      "stages": STAGES}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([sys.executable, "-m", "flows.cli", "sync"], cwd=root, env=env(root), check=True, timeout=120)
    for stage in ("sft", "reward_model", "ppo", "grpo", "grpotools", "sft_fsdp"):
        run(root, stage)
    return root


def env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", **extra}


def run(root: Path, stage: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(stage_command(stage), cwd=root, env=env(root, **extra), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def output(root: Path, stage: str) -> Path:
    return root / "artifacts/crash" / stage


def newest_checkpoint(root: Path, stage: str) -> int:
    """The step of the stage's newest whole checkpoint (0: none)."""
    area = root / CHECKPOINTS / "crash" / stage
    keys = list(area.iterdir()) if area.exists() else []
    return max((step for key in keys for step, _ in complete_checkpoints(key)), default=0)


def stage_runs(root: Path, stage: str) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rl4llm")
    return client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time ASC"])


def test_the_multi_turn_stage_calls_its_tool(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run_id = stage_runs(project, "grpotools")[0].info.run_id
    calls = [m.value for m in client.get_metric_history(run_id, "tool_calls_per_sample")]
    assert len(calls) == 4 and sum(calls) > 0, calls


@pytest.mark.parametrize("stage, baseline, fault, resumes_from", KILLS, ids=[k[0] for k in KILLS])
def test_a_killed_stage_resumes_bit_identical(project: Path, stage: str, baseline: str, fault: str,
                                              resumes_from: int):
    killed = run(project, stage, check=False, **{FAULT_ENV: fault})
    assert killed.returncode == -signal.SIGKILL or baseline.endswith("fsdp")  # 2 processes: the launcher fails
    assert not output(project, stage).exists()  # nothing published
    assert newest_checkpoint(project, stage) == resumes_from

    rerun = run(project, stage)
    total = TOTAL_STEPS[baseline.split("_")[0]]
    assert (f"crash/{stage}: resuming from step {resumes_from}/{total}" in rerun.stderr) == (resumes_from > 0)
    uninterrupted = output(project, baseline)
    assert (output(project, stage) / "metrics.json").read_bytes() == (uninterrupted / "metrics.json").read_bytes()
    assert (output(project, stage) / "model/model.safetensors").read_bytes() == \
        (uninterrupted / "model/model.safetensors").read_bytes()
    assert not (project / CHECKPOINTS / "crash" / stage).exists()  # a finished stage removes its checkpoints
    killed_run, finished_run = stage_runs(project, stage)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(finished_run.info.run_id, "grad_norm")]
    assert steps == list(range(resumes_from + 1, total + 1))  # the rerun did only the remaining steps
    assert finished_run.info.status == "FINISHED"


def test_sigint_stops_after_a_checkpoint_and_the_run_resumes(project: Path):
    stage = "ppo_interrupted"
    process = subprocess.Popen(stage_command(stage), cwd=project, env=env(project), stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240
    while not newest_checkpoint(project, stage):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-2000:]
    assert "stopped by SIGINT after step" in stderr and "resume with `rl4llm run crash`" in stderr
    assert not output(project, stage).exists()
    assert stderr.count("checkpoint saved") == 1
    stopped_at = int(stderr.split("stopped by SIGINT after step ")[1].split("/")[0])
    assert newest_checkpoint(project, stage) == stopped_at  # the checkpoint of the step it stopped after
    assert [r.info.status for r in stage_runs(project, stage)] == ["KILLED"]


def test_a_diverging_stage_stops_at_the_first_non_finite_step(project: Path):
    result = run(project, "sft_diverging", check=False)
    assert result.returncode == 1
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "crash/sft_diverging step" in line[0] and "non-finite" in line[0]
    assert "nothing published" in line[0]
    assert not output(project, "sft_diverging").exists()
    assert [r.info.status for r in stage_runs(project, "sft_diverging")] == ["FAILED"]


def test_no_run_stays_running(project: Path):
    """The SIGKILLed stages left their MLflow runs RUNNING; `rl4llm list` finds their processes gone."""
    subprocess.run([sys.executable, "-m", "flows.cli", "list", "crash"], cwd=project, env=env(project), check=True,
                   capture_output=True, timeout=120)
    statuses = {r.info.run_id: r.info.status for stage in STAGES for r in stage_runs(project, stage["name"])}
    assert "RUNNING" not in statuses.values()
    assert sum(s == "FAILED" for s in statuses.values()) >= len(KILLS)
