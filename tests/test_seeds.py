"""`rl4llm run P --seeds`: each seed its own outputs and MLflow runs (tagged), skipped when unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.config import resolve
from flows.errors import ConfigError
from flows.seeds import add_seed_variants, parse_seeds
from tests.conftest import REPO, make_project

CLI = [sys.executable, "-m", "flows.cli"]


def test_a_seed_variant_moves_every_output_and_input_between_its_stages():
    resolved = resolve(REPO / "pipelines.yaml").stages
    names = add_seed_variants(resolved, "instructgpt", [0, 1], "pipelines.yaml")
    assert names == {0: "instructgpt", 1: "instructgpt-seed1"}  # seed 0 is the pipeline itself
    base, variant = resolved["instructgpt"], resolved["instructgpt-seed1"]
    assert {spec.seed for spec in variant.values()} == {1}
    assert variant["ppo"].output_dir == "artifacts/instructgpt-seed1/ppo"
    assert variant["ppo"].inputs["policy"].path == "artifacts/instructgpt-seed1/sft/model"
    assert variant["ppo"].params == base["ppo"].params
    assert base["ppo"].inputs["policy"].path == "artifacts/instructgpt/sft/model"  # unchanged


@pytest.mark.parametrize("text", ["0,x", "1,1", ""])
def test_bad_seeds_are_named(text: str):
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds(text, "pipelines.yaml")


@pytest.mark.e2e
def test_each_seed_runs_once_into_its_own_outputs_and_tagged_runs(tmp_path: Path):
    make_project(tmp_path)
    stage = {"name": "data", "kind": "synthetic_instructions",
             "params": {"demonstrations": 20, "rl_prompts": 5, "eval_prompts": 5, "pretrain_sentences": 20,
                        "pretrain_eval_sentences": 5}}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(
        {"pipelines": {"toy": {"defaults": {"seed": 0}, "stages": [stage]}}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def run() -> str:
        result = subprocess.run([*CLI, "run", "toy", "--seeds", "0,1,2"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert run().splitlines()[-3:] == ["seed 0: toy: ran data; up to date: none",
                                       "seed 1: toy-seed1: ran data; up to date: none",
                                       "seed 2: toy-seed2: ran data; up to date: none"]
    demos = {name: (tmp_path / "artifacts" / name / "data" / "sft.jsonl").read_text()
             for name in ("toy", "toy-seed1", "toy-seed2")}
    assert len(set(demos.values())) == 3  # each seed drew its own data
    assert all(line.startswith("seed ") and "nothing ran" in line for line in run().splitlines()[-3:])

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents = client.search_runs([client.get_experiment_by_name("rl4llm").experiment_id],
                                 "tags.`rl4llm.parent` = 'true'")
    tags = sorted((r.data.tags["pipeline"], r.data.tags["seed"], r.data.tags.get("seed_of", "")) for r in parents)
    assert tags == [("toy", "0", ""), ("toy-seed1", "1", "toy"), ("toy-seed2", "2", "toy")]  # the rerun: nothing new
    shown = json.loads(subprocess.run([*CLI, "compare", "toy", "--format", "json", "--last", "1"], cwd=tmp_path,
                                      env=env, capture_output=True, text=True, check=True).stdout)
    assert sorted(row["seed"] for row in shown) == ["0", "1", "2"]
