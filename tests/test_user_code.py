"""A user's own reward and stage kind, from modules outside the package (examples/custom), run in a pipeline and
tracked by DVC as code; bookkeeping modules are no stage's dependency."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

CLI = [sys.executable, "-m", "flows.cli"]


@pytest.fixture(scope="module")
def custom(tmp_path_factory) -> Path:
    """examples/custom as a project that also holds a copy of the `stages` package (imported from there), so that
    DVC tracks the package's files like the user's."""
    root = tmp_path_factory.mktemp("custom")
    shutil.copytree(REPO / "examples" / "custom", root, dirs_exist_ok=True)
    shutil.copytree(REPO / "infra", root / "infra")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    return subprocess.run([*CLI, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def states(root: Path) -> dict[str, str]:
    listing = cli(root, "list", "r1-zero-short")
    assert listing.returncode == 0, listing.stderr
    return {line.split()[0]: " ".join(line.split()[2:]) for line in listing.stdout.splitlines()[1:]}


def test_kinds_lists_a_users_kind_with_its_params(custom: Path):
    shown = cli(custom, "kinds", "my_kinds.rank_filter")
    assert shown.returncode == 0, shown.stderr
    assert "rows         rows to filter [prompt]" in shown.stdout
    assert "keep    float  0.5       share of the rows kept" in shown.stdout


@pytest.mark.e2e
def test_a_users_reward_and_kind_run_and_are_tracked_as_code(custom: Path):
    assert cli(custom, "sync").returncode == 0
    deps = {name.split(".")[1]: stage["deps"] for name, stage in
            yaml.safe_load((custom / "dvc.yaml").read_text())["stages"].items()}
    assert {"my_kinds/__init__.py", "my_kinds/rank_filter.py"} <= set(deps["short_prompts"])
    assert "my_rewards.py" in deps["grpo"] and "my_rewards.py" not in deps["short_prompts"]
    assert all("stages/tracking.py" not in files and "stages/instruct_task.py" not in files for files in deps.values())

    run = cli(custom, "run", "r1-zero-short")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reward_my_rewards:brevity=" in run.stderr  # the user's reward scored every rollout
    assert "starting cold" not in run.stderr  # forked from the run's warm process, importing the user's code anew
    kept = yaml.safe_load((custom / "artifacts/r1-zero-short/short_prompts/metrics.json").read_text())
    assert kept["kept"] == 32  # half of the 64 RL prompts
    assert len((custom / "artifacts/r1-zero-short/short_prompts/rows.jsonl").read_text().splitlines()) == 32

    with open(custom / "stages" / "tracking.py", "a") as tracking:  # a cosmetic edit of logging code
        tracking.write("\n# a comment\n")
    assert set(states(custom).values()) == {"up to date"}

    with open(custom / "my_rewards.py", "a") as rewards:  # the reward's code changed: grpo is stale, nothing else
        rewards.write("\n# a comment\n")
    after = states(custom)
    assert after.pop("grpo").startswith("stale")
    assert set(after.values()) == {"up to date"}


def test_a_broken_users_kind_and_reward_are_named_together(custom: Path):
    config = yaml.safe_load((custom / "pipelines.yaml").read_text())
    stages = config["pipelines"]["r1-zero-short"]["stages"]
    stages[1]["kind"] = "my_kinds.no_such_kind"
    stages[3]["params"]["rewards"]["my_rewards:no_such_reward"] = 1.0
    broken = custom / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    result = cli(custom, "validate", "-c", "broken.yaml")
    assert result.returncode == 2
    assert "2 problems" in result.stderr
    assert "stage 'short_prompts', key 'kind': cannot import 'my_kinds.no_such_kind'" in result.stderr
    assert "stage 'grpo', key 'params.rewards': " in result.stderr
    assert "module 'my_rewards' has no 'no_such_reward'" in result.stderr
