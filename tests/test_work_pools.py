"""Stages on Prefect work pools: a real Prefect server and one process worker per pool (`cpu`, `trainer`), each in
its own clone of the project, as on two machines; outputs move between them only through the DVC remote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows import cli
from flows.prefect_server import temporary_server
from flows.reproduce import PROJECT_ENV
from tests.conftest import REPO, commit_run, descendants, git, git_project_with_remote, make_project, stop_service

pytestmark = pytest.mark.e2e
POOLS = {"data": "cpu", "pretrain": "trainer"}


def write_pipeline(root: Path) -> None:
    config = yaml.safe_load((REPO / "tests/pipelines/tiny_instructgpt.yaml").read_text())
    tiny = config["pipelines"]["tiny"]
    tiny["stages"] = [{**stage, "work_pool": POOLS[stage["name"]]} for stage in tiny["stages"][:2]]
    tiny["defaults"].update(work_pool="cpu", retries=1, retry_delay_seconds=1)
    tiny["defaults"].pop("inputs")
    tiny["defaults"].pop("params")
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def start_worker(pool: str, project: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(project.parent / f"worker-{pool}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                 "process", "--name", f"worker-{pool}"], cwd=project,
                                env={**env, PROJECT_ENV: str(project)}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def worker_logs(root: Path) -> str:
    return "\n".join(log.read_text()[-4000:] for log in sorted(root.glob("worker-*.log")))


def test_each_stage_runs_on_a_worker_of_its_pool_and_outputs_move_through_the_remote(tmp_path, monkeypatch):
    origin = tmp_path / "origin"
    origin.mkdir()
    make_project(origin)
    write_pipeline(origin)
    git_project_with_remote(origin, tmp_path / "remote")
    clones = {pool: tmp_path / pool for pool in ("cpu", "trainer")}
    for pool, clone in clones.items():
        git(tmp_path, "clone", "-q", str(origin), str(clone))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the server's own database
    monkeypatch.chdir(origin)
    before = descendants(os.getpid())

    with temporary_server() as api:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1",
               "MLFLOW_TRACKING_URI": tracking}
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                for pool in clones:
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            assert cli.execute(["deploy", "tiny"]) == ("deployments: rl4llm-stage/tiny.data, "
                                                       "rl4llm-stage/tiny.pretrain, rl4llm-pipeline-deployment/tiny")
            workers = [start_worker(pool, clone, env) for pool, clone in clones.items()]
            try:
                pipeline_run = run_deployment("rl4llm-pipeline-deployment/tiny", timeout=600)
                with get_client(sync_client=True) as client:
                    flow_runs = client.read_flow_runs()
            finally:
                for worker in workers:
                    stop_service(worker)
    assert not descendants(os.getpid()) - before  # the server, the workers and their flow runs are gone
    assert pipeline_run.state.is_completed(), worker_logs(tmp_path)

    # the pipeline flow ran on the cpu pool; each stage as its own flow run on its stage's pool
    assert pipeline_run.work_pool_name == "cpu"
    stage_runs = {r.parameters["stage"]: r for r in flow_runs if "stage" in r.parameters and r.deployment_id}
    assert {stage: r.work_pool_name for stage, r in stage_runs.items()} == POOLS
    assert all(r.state.is_completed() for r in stage_runs.values())

    # which worker, in which clone, ran which stage (recorded on the MLflow stage runs)
    mlflow = MlflowClient(tracking)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("rl4llm").experiment_id], "tags.skipped = 'false'")
    assert {r.data.tags["stage"]: (r.data.tags["rl4llm.worker"], r.data.tags["rl4llm.project"]) for r in runs} == \
        {"data": ("worker-cpu", str(clones["cpu"])), "pretrain": ("worker-trainer", str(clones["trainer"]))}
    # pretrain's input came to the trainer's clone from the remote, and its model back to the pipeline's clone
    assert (clones["trainer"] / "artifacts/tiny/data/pretrain.jsonl").exists()
    assert (clones["cpu"] / "artifacts/tiny/pretrain/model/model.safetensors").read_bytes() == \
        (clones["trainer"] / "artifacts/tiny/pretrain/model/model.safetensors").read_bytes()
    commit_run(clones["cpu"])  # the pipeline's clone holds the dvc.lock of the whole run
    assert "up to date" in cli.execute(["-c", str(clones["cpu"] / "pipelines.yaml"), "list", "tiny"])
