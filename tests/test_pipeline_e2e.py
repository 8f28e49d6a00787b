"""End to end, through Prefect, DVC, the stage subprocesses and a real MLflow tracking server, on the test-size
InstructGPT pipeline.

One project (a git repository with a local-directory DVC remote) is shared by the tests of this module, which run
in order: first run with push, a fresh clone restoring every stage from the remote, no-op rerun, a param change,
a forced single-stage rerun, listing and comparing, stage versions and restore.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows import cli
from flows import dvc
from stages.tracking import EXPERIMENT_ENV
from tests.conftest import REPO, commit_run, git, git_project_with_remote, make_project

pytestmark = pytest.mark.e2e
STAGES = ["data", "pretrain", "sft", "comparisons", "reward_model", "ppo"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_server) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    make_project(root, REPO / "tests" / "pipelines" / "tiny_instructgpt.yaml")
    git_project_with_remote(root, root.parent / f"{root.name}-remote")
    return root


@pytest.fixture
def in_workspace(workspace, monkeypatch, mlflow_server) -> Path:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return workspace


def run(*args: str) -> str:
    """The command's report (no capsys: Prefect's log handler would keep a closed capture stream)."""
    return cli.execute(["-c", "pipelines.yaml", *args])


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "artifacts" / "tiny" / stage / "metrics.json").read_text())


def parent_runs(experiment: str = "rl4llm"):
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              "tags.`rl4llm.parent` = 'true'", order_by=["attributes.start_time ASC"])
    return client, runs


def children(client, parent):
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def test_first_run_runs_every_stage_logs_lineage_and_registers_the_policy(in_workspace):
    assert run("run", "tiny", "--push") == f"tiny: ran {', '.join(STAGES)}; up to date: none"
    assert {"eval_accuracy", "normalization_bias"} <= set(metrics(in_workspace, "reward_model"))
    assert {"gold_score", "kl", "ptx_lm_loss", "initial_gold_score", "initial_ptx_lm_loss"} <= set(
        metrics(in_workspace, "ppo"))
    sft = metrics(in_workspace, "sft")  # each policy stage's held-out metrics before and after it trained
    assert sft["gold_score"] != sft["initial_gold_score"]
    commit_run(in_workspace)
    shutil.copytree(in_workspace / "artifacts/tiny/reward_model", in_workspace.parent / "reward_model-v1")
    client, (parent,) = parent_runs()
    assert parent.data.tags["pipeline"] == "tiny" and parent.data.tags["config_hash"]
    kids = children(client, parent)
    assert sorted(k.data.tags["stage"] for k in kids) == sorted(STAGES)
    ppo = next(k for k in kids if k.data.tags["stage"] == "ppo")
    assert ppo.data.tags["skipped"] == "false" and ppo.data.tags["stage_kind"] == "ppo"
    assert ppo.data.params["kl_estimator"] == "k1"
    assert len(client.get_metric_history(ppo.info.run_id, "reward")) == 2  # a per-step curve

    # lineage: each input an MLflow dataset whose digest is its DVC hash; each output's DVC hash a tag
    lock = dvc.lock_entry(in_workspace, "tiny", "ppo")
    dep_hashes = {d["path"]: d["md5"] for d in lock["deps"]}
    specs = yaml.safe_load((in_workspace / "params.yaml").read_text())["tiny"]
    logged = {d.tags[0].value: d.dataset.digest for d in client.get_run(ppo.info.run_id).inputs.dataset_inputs}
    assert logged == {name: dep_hashes[i["path"]] for name, i in specs["ppo"]["inputs"].items()}
    model_hash = next(o["md5"] for o in lock["outs"] if o["path"] == "artifacts/tiny/ppo/model")
    assert ppo.data.tags["dvc.model"] == model_hash
    (registered,) = client.search_model_versions("name = 'tiny-policy'")
    assert registered.run_id == ppo.info.run_id and registered.tags["dvc.md5"] == model_hash
    assert registered.source.startswith("dvc://") and registered.source.endswith(model_hash[2:])
    assert registered.tags["input.reward"] == dep_hashes["artifacts/tiny/reward_model/model"]

    # each stage's own output reached the Prefect logs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterName
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    with get_client(sync_client=True) as prefect:
        logged = [log.message for log in prefect.read_logs(LogFilter(name=LogFilterName(any_=["rl4llm.stage"])),
                                                           sort=LogSort.TIMESTAMP_DESC)]
    assert any(message.startswith("[tiny/ppo] step 2/2") for message in logged)


def test_a_clone_restores_every_stage_from_the_remote_and_reruns_only_what_changed(workspace, tmp_path, monkeypatch,
                                                                                   mlflow_server):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(workspace), str(clone))
    monkeypatch.chdir(clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv(EXPERIMENT_ENV, "teammate")
    assert "not pulled (`rl4llm pull tiny`)" in run("list", "tiny")
    assert run("pull", "tiny", "--stage", "reward_model") == "tiny: pulled reward_model"
    shown = json.loads(subprocess.run(["dvc", "metrics", "show", "--json"], cwd=clone, check=True,
                                      capture_output=True, text=True).stdout)
    assert shown[""]["data"]["artifacts/tiny/reward_model/metrics.json"]["data"] == metrics(workspace, "reward_model")

    restored = [s for s in STAGES if s != "reward_model"]
    assert run("run", "tiny") == f"tiny: nothing ran; restored {', '.join(restored)}; up to date: reward_model"
    for stage in STAGES:
        assert metrics(clone, stage) == metrics(workspace, stage)

    config = yaml.safe_load(Path("pipelines.yaml").read_text())
    config["pipelines"]["tiny"]["stages"][5]["params"]["kl_coef"] = 0.2
    Path("pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert run("run", "tiny") == "tiny: ran ppo; up to date: data, pretrain, sft, comparisons, reward_model"


def test_rerun_with_nothing_changed_runs_nothing_and_needs_no_prefect(in_workspace, monkeypatch):
    from flows import flow, prefect_server
    from flows import run as runs

    monkeypatch.setattr(flow, "pipeline_flow", lambda *args: pytest.fail("a Prefect flow ran with nothing to do"))
    monkeypatch.setattr(prefect_server, "prefect_api", lambda: pytest.fail("a Prefect server was asked for"))
    _, before = parent_runs()
    with monkeypatch.context() as no_mlflow:  # what the last recorded run saw is unchanged: nothing to record
        no_mlflow.setattr(runs, "tracking", lambda: pytest.fail("MLflow was loaded with nothing new to record"))
        assert run("run", "tiny") == f"tiny: nothing ran; up to date: {', '.join(STAGES)}"
    assert len(parent_runs()[1]) == len(before)

    shutil.rmtree(".rl4llm/recorded")  # no record of what the last run saw: the skipped stages are recorded
    assert run("run", "tiny") == f"tiny: nothing ran; up to date: {', '.join(STAGES)}"
    client, runs_after = parent_runs()
    assert len(runs_after) == len(before) + 1
    assert all(k.data.tags["skipped"] == "true" for k in children(client, runs_after[-1]))


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
    lines = run("compare", "tiny", "--last", "2").splitlines()
    assert max(len(line) for line in lines) <= 100
    shown = {tuple(line.split()[:2]) for line in lines}
    assert {("reward_model", "eval_accuracy"), ("ppo", "gold_score"), ("ppo", "kl"), ("sft", "gold_score")} <= shown
    assert ("reward_model", "normalization_bias") not in shown  # not a key metric
    assert ("reward_model", "normalization_bias") in {tuple(line.split()[:2]) for line in run(
        "compare", "tiny", "--last", "2", "--metrics", "normalization_bias").splitlines()}
    records = json.loads(run("compare", "tiny", "--last", "2", "--format", "json"))
    assert {r["stage"] for r in records} == set(STAGES) and len({r["run"] for r in records}) == 2
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


def test_verifiers_pipeline_labels_trains_reranks_and_supervises_grpo_with_the_prm(tmp_path, monkeypatch,
                                                                                   prefect_server):
    """The verifier recipe end to end at test size: outcome and Math-Shepherd step labels, an ORM and a PRM trained
    on them, best-of-N by every selection method, and GRPO whose step rewards come from the trained PRM."""
    make_project(tmp_path, REPO / "tests" / "pipelines" / "tiny_verifiers.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    specs = yaml.safe_load((tmp_path / "pipelines.yaml").read_text())["pipelines"]["tiny-verifiers"]["stages"]
    assert run("run", "tiny-verifiers") == \
        f"tiny-verifiers: ran {', '.join(s['name'] for s in specs)}; up to date: none"
    artifacts = tmp_path / "artifacts/tiny-verifiers"
    steps = [json.loads(line) for line in (artifacts / "steps/train.jsonl").read_text().splitlines()]
    assert steps and all(len(r["completions"]) == len(r["labels"]) == len(r["soft_labels"]) for r in steps)
    best = json.loads((artifacts / "best_of_n/metrics.json").read_text())
    for scorer in ("pass1", "majority", "orm", "prm_min", "prm_prod", "prm_last", "oracle"):
        assert 0 <= best[f"{scorer}_n1"] <= 1 and f"{scorer}_n4" in best
        assert best[f"{scorer}_n1"] == pytest.approx(best["pass1_n1"])  # choosing among one is that one
    assert best["oracle_n4"] >= best["pass1_n4"]
    grpo = json.loads((artifacts / "grpo_prm/metrics.json").read_text())
    assert {"accuracy", "initial_accuracy"} <= set(grpo)
    assert run("compare", "tiny-verifiers") and (tmp_path / "compare.png").stat().st_size > 0


def test_search_r1_pipeline_indexes_the_corpus_and_trains_with_the_search_tool(tmp_path, monkeypatch, prefect_server):
    """Search-R1 end to end at test size: the synthetic world and its corpus, the BM25 index, a cold start on traces
    that search, GRPO whose rollouts call the search tool, evaluated with the tool and without it."""
    make_project(tmp_path, REPO / "tests" / "pipelines" / "tiny_search_r1.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run("run", "tiny-search-r1") == \
        "tiny-search-r1: ran data, index, pretrain, cold_start_sft, grpo; up to date: none"
    final = json.loads((tmp_path / "artifacts/tiny-search-r1/grpo/metrics.json").read_text())
    for prefix in ("", "initial_", "notool_", "initial_notool_"):
        assert {f"{prefix}accuracy", f"{prefix}search_rate"} <= set(final)
    assert final["notool_search_rate"] == 0 and {"tool_calls_per_sample", "turns_per_sample"} <= set(final)


def test_versions_are_listed_and_a_restored_version_makes_downstream_stale(in_workspace):
    listing = run("versions", "tiny", "reward_model")
    newest, first = [line.split()[1] if line.startswith("*") else line.split()[0]
                     for line in listing.splitlines()[1:] if not line.startswith("    ")]
    assert "changed: lr " in listing.splitlines()[2] and "→ 0.001" in listing.splitlines()[2]
    assert listing.splitlines()[4] == "    changed: first version"
    assert run("restore", "tiny", "reward_model", first[:6]).startswith(f"tiny/reward_model: restored version {first}")
    saved = in_workspace.parent / "reward_model-v1"
    for file in saved.rglob("*"):
        if file.is_file():
            assert (in_workspace / "artifacts/tiny/reward_model" / file.relative_to(saved)).read_bytes() == \
                file.read_bytes()
    states = {line.split()[0]: line.split(None, 2)[2] for line in run("list", "tiny").splitlines()[1:]}
    assert states["ppo"].startswith("stale") and states["sft"] == "up to date"
    assert "* " + first in run("versions", "tiny", "reward_model")
