"""A stage across machines on Prefect work pools: a real Prefect server, a worker of pool `trainer` in one clone
(machine 0) and a worker of pool `trainer-rank1` in another (machine 1, whose rank `infra/team/worker.sh` takes from
the pool's name), both on 127.0.0.1; `rl4llm run` from a third clone starts both machines' flow runs at once, they
meet at the accelerate rendezvous, machine 0 publishes and pushes, and the run restores the outputs from the remote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
import yaml
from safetensors.torch import load_file

from flows import cli, flow
from flows.errors import ConfigError
from flows.prefect_server import temporary_server
from flows.reproduce import PROJECT_ENV
from stages.runner import MACHINE_RANK_ENV, MAIN_PORT_ENV
from tests.conftest import (REPO, descendants, free_port, git, git_project_with_remote, make_project, stop_service,
                            write_instruct_data)

STAGE = {"name": "sft", "kind": "sft", "inputs": {"data": "datasets.demos"}, "work_pool": "trainer",
         "accelerate_config": "infra/accelerate/multi_node_cpu.yaml",
         "params": {"epochs": 1, "batch_size": 8, "lr": 0.01, "holdout_fraction": 0.2}}
POOLS = {"machine0": "trainer", "machine1": "trainer-rank1"}


def write_project(root: Path, model: Path) -> None:
    make_project(root)
    datasets = write_instruct_data(root)
    config = {"pipelines": {"dist": {"defaults": {"seed": 0, "model": str(model)}, "datasets": datasets,
                                     "stages": [STAGE]}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def start_worker(pool: str, clone: Path, env: dict[str, str]) -> subprocess.Popen:
    """`infra/team/worker.sh <pool> 1` in `clone`, logging to worker-<pool>.log beside it."""
    with open(clone.parent / f"worker-{pool}.log", "w") as log:
        return subprocess.Popen([str(REPO / "infra/team/worker.sh"), pool, "1"], cwd=clone, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def worker_logs(root: Path) -> str:
    return "\n".join(log.read_text()[-6000:] for log in sorted(root.glob("worker-*.log")))


@pytest.mark.e2e
def test_a_stage_spans_two_machines_through_their_work_pools(tmp_path, monkeypatch, tiny_model_dir):
    origin = tmp_path / "origin"
    origin.mkdir()
    write_project(origin, tiny_model_dir)
    git_project_with_remote(origin, tmp_path / "remote")
    clones = {machine: tmp_path / machine for machine in POOLS}
    for clone in clones.values():
        git(tmp_path, "clone", "-q", str(origin), str(clone))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv(MACHINE_RANK_ENV, raising=False)
    monkeypatch.chdir(origin)
    before = descendants(os.getpid())

    with temporary_server() as api:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.settings import PREFECT_API_URL, temporary_settings

        monkeypatch.setenv("PREFECT_API_URL", api)
        env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", MAIN_PORT_ENV: str(free_port()),
               "PATH": f"{Path(shutil.which('prefect') or '').parent}:{os.environ['PATH']}"}
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                for pool in POOLS.values():
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            assert cli.execute(["deploy", "dist", "--pool", "trainer"]) == (
                "deployments: rl4llm-stage/dist.sft, rl4llm-stage-rank/dist.sft.rank1, "
                "rl4llm-pipeline-deployment/dist")
            workers = [start_worker(pool, clones[machine], {**env, PROJECT_ENV: str(clones[machine])})
                       for machine, pool in POOLS.items()]
            try:
                outcome = cli.execute(["run", "dist"])
                with get_client(sync_client=True) as client:
                    flow_runs = client.read_flow_runs()
            except BaseException:
                print(worker_logs(tmp_path))
                raise
            finally:
                for worker in workers:
                    stop_service(worker)
    assert not descendants(os.getpid()) - before  # the server, the workers and their flow runs are gone
    logs = worker_logs(tmp_path)
    assert outcome == "dist: nothing ran; restored sft; up to date: none", outcome  # here: from machine 0's push

    # machine 0's stage flow run on the stage's pool, machine 1's rank flow run on its rank's pool, both completed
    runs = {(r.work_pool_name, r.parameters.get("rank")): r for r in flow_runs if r.deployment_id}
    assert set(runs) == {("trainer", None), ("trainer-rank1", 1)}, logs
    assert all(r.state.is_completed() for r in runs.values()), logs
    # machine 1 trained with machine 0 (its rank from the pool's name) and published nothing
    assert "dist/sft: machine 1 of 2 done; machine 0 publishes" in logs
    assert not (clones["machine1"] / "artifacts/dist/sft/model").exists()
    # machine 0 published and pushed; the run restored its model from the remote
    model = "artifacts/dist/sft/model/model.safetensors"
    assert load_file(origin / model).keys() == load_file(clones["machine0"] / model).keys()
    assert (origin / model).read_bytes() == (clones["machine0"] / model).read_bytes()


class FakeClient:
    """Prefect's client as `wait_for_machines` uses it: each flow run's states in turn (the last one stays)."""

    def __init__(self, states: dict[int, list]):
        self.runs = {rank: SimpleNamespace(id=uuid4(), name=f"run-{rank}") for rank in states}
        self.states = {self.runs[rank].id: list(seq) for rank, seq in states.items()}
        self.set: dict[int, str] = {}

    def read_flow_run(self, run_id):
        seq = self.states[run_id]
        return SimpleNamespace(state=seq.pop(0) if len(seq) > 1 else seq[0])

    def set_flow_run_state(self, run_id, state, force: bool):
        self.states[run_id] = [state]
        self.set[next(r for r, run in self.runs.items() if run.id == run_id)] = state.name


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setattr(flow, "POLL_S", 0.0)
    monkeypatch.setattr(flow, "RANK_GRACE_S", 0.0)


def test_a_failed_machine_fails_the_stage_naming_its_pool(fast_polls):
    from prefect.states import Completed, Failed, Running, Scheduled

    client = FakeClient({0: [Running()], 1: [Scheduled(), Running(), Failed(message="boom")], 2: [Scheduled()]})
    with pytest.raises(RuntimeError, match="dist/sft: machine 1's flow run 'run-1' on work pool 'trainer-rank1' "
                                           "ended Failed: boom"):
        flow.wait_for_machines(client, client.runs, "trainer", "dist/sft", print)
    flow.cancel_unfinished(client, client.runs)  # what run_on_machines does then: the others would wait for it
    assert client.set == {0: "Cancelling", 2: "Cancelled"}  # a running one through its worker, a scheduled at once
    client = FakeClient({0: [Running(), Completed()], 1: [Running(), Running(), Completed()]})
    flow.wait_for_machines(client, client.runs, "trainer", "dist/sft", print)  # all completed: the stage ran
    assert client.set == {}


def test_machines_still_waiting_after_machine_0_completed_are_cancelled(fast_polls):
    from prefect.states import Completed, Scheduled

    lines: list[str] = []
    client = FakeClient({0: [Completed()], 1: [Scheduled()]})  # machine 0's outputs restored: nobody trains
    flow.wait_for_machines(client, client.runs, "trainer", "dist/sft", lines.append)
    assert client.set == {1: "Cancelled"}
    assert lines == ["dist/sft: machine 0 completed; cancelling the machines still waiting (its outputs were "
                     "restored without training)"]


def test_a_rank_flow_runs_only_on_a_worker_of_its_rank(tmp_path: Path, monkeypatch, tiny_model_dir: Path):
    from flows.config import resolve
    from stages.spec import digest

    project = tmp_path
    write_project(project, tiny_model_dir)
    specs = resolve(project / "pipelines.yaml").stages["dist"]
    monkeypatch.setenv(PROJECT_ENV, str(project))
    for worker_rank in (None, "0", "2"):
        if worker_rank is None:
            monkeypatch.delenv(MACHINE_RANK_ENV, raising=False)
        else:
            monkeypatch.setenv(MACHINE_RANK_ENV, worker_rank)
        with pytest.raises(ConfigError, match=f"this worker's RL4LLM_MACHINE_RANK is {worker_rank!r}, not 1"):
            flow.rank_flow.fn("dist", "sft", 1, {}, digest(specs), {})
    with pytest.raises(ConfigError, match="this worker's project differs from the run's"):
        flow.rank_flow.fn("dist", "sft", 1, {}, "another pipeline", {})
    assert flow.num_machines(project, specs["sft"]) == 2
    assert not (project / "dvc.yaml").exists()  # refused before touching the project


def test_worker_sh_takes_the_rank_from_the_pool_name(tmp_path: Path):
    script = str(REPO / "infra/team/worker.sh")
    refused = subprocess.run([script, "trainer-rank1"], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, MACHINE_RANK_ENV: "0"})
    assert refused.returncode == 2
    assert "pool trainer-rank1 serves machine rank 1, but RL4LLM_MACHINE_RANK=0" in refused.stderr


def test_a_missing_rank_deployment_names_the_command_that_creates_it(prefect_server):
    with pytest.raises(RuntimeError, match=r"dist/sft: no deployment rl4llm-stage/dist.sft \(the stage spans 2 "
                                           r"machines\): run `rl4llm deploy dist`"):
        flow.run_on_machines("dist", "sft", {"pipeline": "dist", "stage": "sft", "force": False, "env": {},
                                             "pipeline_hash": "", "locked": {}}, 2, "trainer", print)
