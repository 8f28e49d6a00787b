"""A stage across machines: a machine's rank from the environment, and bad multi-machine accelerate configs refused.
Two "machines" on 127.0.0.1 training one stage: tests/test_distributed.py (beside the 2-process stage they match).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import resolve
from stages.runner import MACHINE_RANK_ENV, MAIN_PORT_ENV, machine_args, machine_rank
from tests.test_bad_input import config_with, error_of
from tests.test_config import write


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
