"""End to end, through Prefect, DVC, the stage subprocesses and MLflow, on the test-size InstructGPT pipeline.

One project is shared by the tests of this module, which run in order: first run, no-op rerun, a param change,
a forced single-stage rerun, listing and comparing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows import cli
from tests.conftest import REPO, make_project

pytestmark = pytest.mark.e2e
STAGES = ["data", "pretrain", "sft", "comparisons", "reward_model", "ppo"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_server) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    make_project(root, REPO / "tests" / "pipelines" / "tiny_instructgpt.yaml")
    return root


@pytest.fixture
def in_workspace(workspace, monkeypatch) -> Path:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    return workspace


def run(*args: str) -> str:
    """The command's report (no capsys: Prefect's log handler would keep a closed capture stream)."""
    return cli.execute(["-c", "pipelines.yaml", *args])


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "artifacts" / "tiny" / stage / "metrics.json").read_text())


def parent_runs(root: Path):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rl4llm").experiment_id],
                              "tags.`rl4llm.parent` = 'true'", order_by=["attributes.start_time ASC"])
    return client, runs


def children(client, parent):
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def test_first_run_runs_every_stage(in_workspace):
    assert run("run", "tiny") == f"tiny: ran {', '.join(STAGES)}; up to date: none"
    assert {"eval_accuracy", "normalization_bias"} <= set(metrics(in_workspace, "reward_model"))
    assert {"gold_score", "kl", "ptx_lm_loss"} <= set(metrics(in_workspace, "ppo"))
    assert "gold_score" in metrics(in_workspace, "sft")
    client, (parent,) = parent_runs(in_workspace)
    assert parent.data.tags["pipeline"] == "tiny" and parent.data.tags["config_hash"]
    kids = children(client, parent)
    assert sorted(k.data.tags["stage"] for k in kids) == sorted(STAGES)
    ppo = next(k for k in kids if k.data.tags["stage"] == "ppo")
    assert ppo.data.tags["skipped"] == "false" and ppo.data.tags["stage_kind"] == "ppo"
    assert ppo.data.params["kl_estimator"] == "k1"
    assert len(client.get_metric_history(ppo.info.run_id, "reward")) == 2  # a per-step curve


def test_rerun_with_nothing_changed_runs_nothing(in_workspace):
    assert run("run", "tiny") == f"tiny: nothing ran; up to date: {', '.join(STAGES)}"
    client, runs = parent_runs(in_workspace)
    assert all(k.data.tags["skipped"] == "true" for k in children(client, runs[-1]))


def test_reward_model_param_change_reruns_reward_model_and_ppo_only(in_workspace):
    config = yaml.safe_load(Path("pipelines.yaml").read_text())
    config["pipelines"]["tiny"]["stages"][4]["params"]["lr"] = 1e-3
    Path("pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    listing = run("list", "tiny")
    states = {line.split()[0]: line.split(None, 2)[2] for line in listing.splitlines()[1:]}
    assert states["reward_model"] == "stale (changed deps: params.yaml)"
    assert states["ppo"] == "stale (upstream: reward_model)"
    assert states["sft"] == "up to date"
    assert run("run", "tiny") == "tiny: ran reward_model, ppo; up to date: data, pretrain, sft, comparisons"


def test_forced_single_stage_rerun_reproduces_its_metrics(in_workspace):
    before = metrics(in_workspace, "ppo")
    assert run("run", "tiny", "--stage", "ppo", "--force") == "tiny: ran ppo; up to date: none"
    assert metrics(in_workspace, "ppo") == pytest.approx(before, rel=1e-5)


def test_list_and_compare(in_workspace):
    listing = run("list")
    assert listing.count("up to date") == len(STAGES)
    table = run("compare", "tiny", "--last", "2", "--metrics", "gold_score,eval_accuracy")
    assert "gold_score" in table and table.count("ppo") == 2
    assert (in_workspace / "compare.png").stat().st_size > 0


def test_r1_pipeline_runs_every_stage_kind(tmp_path, monkeypatch, prefect_server):
    """The DeepSeek-R1 wiring end to end at test size: cold start, GRPO with rule rewards and a routed RM, rejection
    sampling with general data, distillation."""
    make_project(tmp_path, REPO / "tests" / "pipelines" / "tiny_r1.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    specs = yaml.safe_load((tmp_path / "pipelines.yaml").read_text())["pipelines"]["tiny-r1"]["stages"]
    assert run("run", "tiny-r1") == f"tiny-r1: ran {', '.join(s['name'] for s in specs)}; up to date: none"
    final = json.loads((tmp_path / "artifacts/tiny-r1/distill/metrics.json").read_text())
    assert {"accuracy", "format_rate", "language_consistency", "mean_response_length"} <= set(final)
    kept = json.loads((tmp_path / "artifacts/tiny-r1/rejection_sampling/metrics.json").read_text())
    assert kept["kept"] > 0 and 0 < kept["acceptance_rate"] <= 1
