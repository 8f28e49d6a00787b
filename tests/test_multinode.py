"""A stage across machines: accelerate's multi-node launch, proven with two "machines" on 127.0.0.1.

Machine 0 runs `rl4llm stage` in the project, machine 1 at the same time in a copy of it (as a second machine runs
in its own checkout), each with its rank in RL4LLM_MACHINE_RANK and one process; they train the same weights as one
2-process launch on one machine, and only machine 0 publishes. Bad multi-machine accelerate configs are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flows.config import resolve
from stages.runner import MACHINE_RANK_ENV, MAIN_PORT_ENV, machine_args, machine_rank
from tests.conftest import free_port, make_project, write_instruct_data
from tests.test_bad_input import config_with, error_of
from tests.test_config import write

MULTI_NODE = "infra/accelerate/multi_node_cpu.yaml"
SFT = {"kind": "sft", "inputs": {"data": "datasets.demos"},
       "params": {"epochs": 2, "batch_size": 8, "lr": 0.01, "holdout_fraction": 0.2}}
STAGES = [{"name": "sft_two_processes", **SFT, "accelerate_config": "infra/accelerate/cpu_2proc.yaml"},
          {"name": "sft_two_machines", **SFT, "accelerate_config": MULTI_NODE}]
CLI = [sys.executable, "-m", "flows.cli"]


def launch_machines(checkouts: list[Path], env: dict[str, str]) -> list[tuple[int, str, str]]:
    """`rl4llm stage dist sft_two_machines` at once in each checkout, machine rank r in checkouts[r]: each one's
    exit code, stdout and stderr."""
    port = str(free_port())
    ranks = [subprocess.Popen([*CLI, "stage", "dist", "sft_two_machines"], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
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
def machines(tmp_path_factory, tiny_model_dir: Path) -> dict:
    """Machine 0's project after the 2-process stage and the 2-machine stage ran, machine 1's checkout, and what
    machine 1's command said."""
    root = tmp_path_factory.mktemp("machine0")
    datasets = write_instruct_data(root)
    make_project(root)
    config = {"pipelines": {"dist": {"defaults": {"seed": 0, "model": str(tiny_model_dir)}, "datasets": datasets,
                                     "stages": STAGES}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    subprocess.run([*CLI, "sync"], cwd=root, env=env, check=True, timeout=120)
    other = tmp_path_factory.mktemp("machine1") / "checkout"
    shutil.copytree(root, other)  # machine 1's own checkout: the same files, inputs in place (as after a dvc pull)
    kept = other / "artifacts/dist/sft_two_machines"  # a machine of rank > 0 writes, claims and removes no output
    kept.mkdir(parents=True)
    (kept / "theirs.txt").write_text("untouched\n")
    subprocess.run([*CLI, "stage", "dist", "sft_two_processes"], cwd=root, env=env, check=True, timeout=300)
    results = launch_machines([root, other], env)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"machine {rank}: {out}\n{err}"
    return {"root": root, "other": other, "kept": kept, "env": env, "stdout": results[1][1], "stderr": results[1][2]}


def weights(root: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(root / f"artifacts/dist/{stage}/model/model.safetensors")


@pytest.mark.e2e
def test_two_machines_train_the_weights_of_two_processes(machines: dict, tiny_model_dir: Path):
    root = machines["root"]
    one, two = weights(root, "sft_two_processes"), weights(root, "sft_two_machines")
    assert one.keys() == two.keys()
    for name in one:  # the same world size and collectives: bit for bit (measured)
        torch.testing.assert_close(two[name], one[name], atol=0, rtol=0, msg=name)
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(two[n], initial[n]) for n in initial if n in two)
    metrics = [json.loads((root / f"artifacts/dist/{s}/metrics.json").read_text()) for s in
               ("sft_two_processes", "sft_two_machines")]
    assert metrics[1] == metrics[0]


@pytest.mark.e2e
def test_only_machine_0_publishes(machines: dict):
    assert [p.name for p in machines["kept"].iterdir()] == ["theirs.txt"]
    assert not (machines["other"] / "artifacts/dist/.sft_two_machines.partial").exists()
    assert "machine 1 of 2 done; machine 0 publishes" in machines["stderr"]
    assert json.loads(machines["stdout"].strip().splitlines()[-1]) == {}


@pytest.mark.e2e
def test_a_machine_with_other_inputs_is_refused(machines: dict, tmp_path: Path):
    root, other = machines["root"], tmp_path / "checkout"
    shutil.copytree(machines["other"], other)
    with (other / "demos.jsonl").open("a") as demos:  # a machine that pulled another version of the data
        demos.write(json.dumps({"instruction": "name one animal", "output": "cat dog"}) + "\n")
    published = (root / "artifacts/dist/sft_two_machines/metrics.json").read_text()
    results = launch_machines([root, other], machines["env"])
    for rank, (code, out, err) in enumerate(results):
        assert code != 0, f"machine {rank}: {out}\n{err}"  # torchrun ends 1 whatever its ranks' codes (here 2)
        assert "bad input: ValueError: dist/sft_two_machines: rank(s) 1 read another spec or other inputs than " \
            "rank 0" in err, err
    assert (root / "artifacts/dist/sft_two_machines/metrics.json").read_text() == published


def test_machine_rank_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(MACHINE_RANK_ENV, "1")
    monkeypatch.setenv(MAIN_PORT_ENV, "29600")
    assert machine_args(2) == ["--machine_rank", "1", "--main_process_port", "29600"]
    assert machine_rank(1) == 0 and machine_args(1) == []  # a one-machine stage ignores it
    for bad in ("2", "-1", "one"):
        monkeypatch.setenv(MACHINE_RANK_ENV, bad)
        with pytest.raises(ValueError, match=f"{MACHINE_RANK_ENV}='{bad}': a machine rank must be an integer from 0 "
                                             "to 1"):
            machine_rank(2)


BAD_MACHINES = {
    "num_machines 0": ("num_machines: 0\n", "num_machines must be a positive integer, got 0"),
    "indivisible": ("num_processes: 3\nnum_machines: 2\nmain_process_ip: 10.0.0.1\nmain_process_port: 29500\n",
                    "num_processes (3, the total across machines) must divide by num_machines (2)"),
    "machine_rank 1": ("num_processes: 2\nnum_machines: 2\nmachine_rank: 1\n",
                       "machine_rank must be 0, got 1: the file is the same on every machine"),
    "no ip": ("num_processes: 2\nnum_machines: 2\nmain_process_port: 29500\n",
              "num_machines is 2: main_process_ip must name machine 0's address, got None"),
    "bad port": ("num_processes: 2\nnum_machines: 2\nmain_process_ip: 10.0.0.1\nmain_process_port: 70000\n",
                 "main_process_port must be a TCP port (1-65535), got 70000"),
}


@pytest.mark.parametrize("case", BAD_MACHINES, ids=list(BAD_MACHINES))
def test_bad_multi_machine_config(project: Path, case: str):
    content, expected = BAD_MACHINES[case]
    (project / "infra/bad").write_text(content)
    error = error_of(project, config_with(lambda p: p["stages"][0].update(accelerate_config="infra/bad")))
    assert expected in str(error), str(error)
    assert (error.pipeline, error.stage, error.key) == ("demo", "sft", "accelerate_config")


@pytest.mark.parametrize("config", ["multi_node_cpu.yaml", "multi_node_gpu.yaml"])
def test_the_multi_machine_templates_resolve_with_their_total_process_count(project: Path, config: str):
    resolved = resolve(write(project, config_with(lambda p: p["stages"][0].update(
        accelerate_config=f"infra/accelerate/{config}"))))
    total = yaml.safe_load((project / "infra/accelerate" / config).read_text())["num_processes"]
    assert resolved.stages["demo"]["sft"].num_processes == total
