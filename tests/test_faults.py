"""Faults around a stage that lose nothing and say what and where: symbolic links where outputs go, an input
changed under a running stage, a broken DVC remote, a garbled dvc.lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.paths import LinkedPath, claim
from tests.conftest import make_project

CLI = [sys.executable, "-m", "flows.cli"]
DATA = {"name": "data", "kind": "synthetic_instructions",
        "params": {"demonstrations": 8, "rl_prompts": 8, "eval_prompts": 4, "pretrain_sentences": 8,
                   "pretrain_eval_sentences": 4}}
REWRITING_KIND = '''"""Reads its rows, then rewrites the file it read (as a writer would, while a stage runs)."""
from pathlib import Path

from stages.data import write_jsonl
from stages.kinds import Input, StageParams


class Params(StageParams):
    pass


INPUTS = {"rows": Input("rows", columns=("prompt",))}
OUTPUTS = {"rows": "rows.jsonl"}


def run(ctx):
    rows = ctx.rows("rows")
    path = Path(ctx.path("rows"))
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # one row fewer, each time
    write_jsonl(rows, ctx.outputs["rows"])
    return {"rows": len(rows)}
'''


def write_pipeline(root: Path, *stages: dict, datasets: dict | None = None) -> Path:
    make_project(root)
    config = {"pipelines": {"faults": {"defaults": {"seed": 0}, "datasets": datasets or {}, "stages": list(stages)}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def env(root: Path) -> dict[str, str]:
    """The project's own tracking store; its user kinds importable; this environment's tools (dvc, rl4llm) first."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=root, env=env(root), capture_output=True, text=True, timeout=600)


def session_prefect_api() -> dict[str, str]:
    """Inside the `prefect_server` fixture: the environment that has `rl4llm run` report to it instead of starting a
    temporary server of its own (seconds per run; tests/test_run_safety.py keeps runs with their own server)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture
def shared_prefect(prefect_server, monkeypatch) -> None:
    """This test's runs report to the session's Prefect API (`session_prefect_api`)."""
    for name, value in session_prefect_api().items():
        monkeypatch.setenv(name, value)


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env(root), capture_output=True,
                          text=True, timeout=600)


def victim(root: Path) -> Path:
    """Files outside the project that a link will point to."""
    outside = root.parent / f"{root.name}-victim"
    (outside / "model").mkdir(parents=True)
    (outside / "canary.txt").write_text("keep me")
    (outside / "model" / "important.bin").write_bytes(b"\x00" * 64)
    return outside


def intact(outside: Path) -> bool:
    kept = outside / "canary.txt", outside / "model" / "important.bin"
    return kept[0].read_text() == "keep me" and kept[1].read_bytes() == b"\x00" * 64


def locked_stages(root: Path) -> set[str]:
    lock = root / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


# --- symbolic links where a stage writes ---------------------------------------------------------------------------

def test_claim_removes_a_link_at_the_folder_only_and_refuses_one_above(tmp_path: Path):
    root, outside = tmp_path / "project", victim(tmp_path)
    (root / "artifacts" / "p").mkdir(parents=True)
    (root / "artifacts" / "p" / "s").symlink_to(outside)
    assert claim(root, Path("artifacts/p/s")) == root / "artifacts" / "p" / "s"
    assert not (root / "artifacts" / "p" / "s").exists() and intact(outside)

    (root / "artifacts" / "p").rmdir()
    (root / "artifacts" / "p").symlink_to(outside)
    with pytest.raises(LinkedPath, match=f"artifacts/p is a symbolic link to {outside}"):
        claim(root, Path("artifacts/p/s"))
    with pytest.raises(LinkedPath, match="artifacts/p is a symbolic link"):
        claim(root, Path("artifacts/p"), replaceable=False)
    assert intact(outside)


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_prefect")
def test_a_rerun_replaces_a_symlinked_output_directory_and_never_touches_its_target(tmp_path: Path):
    root = write_pipeline(tmp_path / "project", DATA)
    assert cli(root, "run", "faults").returncode == 0
    outside = victim(tmp_path)
    output = root / "artifacts" / "faults" / "data"
    subprocess.run(["rm", "-rf", str(output)], check=True)
    output.symlink_to(outside)

    rerun = cli(root, "run", "faults", "--stage", "data", "--force")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert intact(outside) and sorted(p.name for p in outside.iterdir()) == ["canary.txt", "model"]
    assert not output.is_symlink() and (output / "prompts.jsonl").exists()
    assert f"artifacts/faults/data was a symbolic link to {outside}: removed the link" in rerun.stderr


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_prefect")
def test_a_symlinked_pipeline_folder_is_refused_naming_the_link_and_its_target(tmp_path: Path):
    root = write_pipeline(tmp_path / "project", DATA)
    outside = victim(tmp_path)
    (root / "artifacts").mkdir()
    (root / "artifacts" / "faults").symlink_to(outside)

    run = cli(root, "run", "faults")
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.splitlines()[-1] == (
        f"error: faults/data bad input: artifacts/faults is a symbolic link to {outside}: a stage writes, renames "
        "and deletes nothing through a link (in artifacts/faults/data); replace the link with a directory")
    assert "Traceback" not in run.stderr
    assert intact(outside) and sorted(p.name for p in outside.iterdir()) == ["canary.txt", "model"]


# --- an input that changes under a running stage -------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("source", ["datasets.prompts", "data.prompts"])
@pytest.mark.usefixtures("shared_prefect")
def test_an_input_changed_under_a_running_stage_fails_it_before_anything_is_published(tmp_path: Path, source: str):
    """A local dataset or an earlier stage's output, rewritten while the stage reads it: exit 2 naming the file,
    nothing published, dvc.lock without the stage (so it stays stale), under `rl4llm run` and under plain DVC."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(100)))
    (root / "user_kinds").mkdir()
    (root / "user_kinds" / "__init__.py").write_text("")
    (root / "user_kinds" / "rewrite_rows.py").write_text(REWRITING_KIND)
    write_pipeline(root, DATA, {"name": "rewrite", "kind": "user_kinds.rewrite_rows", "inputs": {"rows": source}},
                   datasets={"prompts": {"path": "prompts.jsonl"}})
    changed = "prompts.jsonl" if source.startswith("datasets.") else "artifacts/faults/data/prompts.jsonl"

    run = cli(root, "run", "faults")
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.splitlines()[-1].startswith(
        f"error: faults/rewrite bad input: InputChanged: faults/rewrite: input {changed} changed while the stage ran")
    assert "Traceback" not in run.stderr
    assert not (root / "artifacts" / "faults" / "rewrite").exists()
    assert locked_stages(root) == {"faults.data"}
    assert "faults.rewrite" not in cli(root, "list", "faults").stdout.split("up to date")[-1]

    by_hand = dvc(root, "repro", "--single-item", "faults.rewrite")
    assert by_hand.returncode != 0
    assert f"input {changed} changed while the stage ran" in by_hand.stderr + by_hand.stdout
    assert "faults.rewrite" not in locked_stages(root)


# --- DVC's own files and remotes ------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.usefixtures("shared_prefect")
def test_a_push_to_a_broken_remote_names_the_remote_its_url_and_dvcs_cause(tmp_path: Path):
    root = write_pipeline(tmp_path / "project", DATA)
    assert cli(root, "run", "faults").returncode == 0
    not_a_directory = tmp_path / "remote-is-a-file"
    not_a_directory.write_text("")
    assert dvc(root, "remote", "add", "-d", "broken", str(not_a_directory)).returncode == 0

    push = cli(root, "run", "faults", "--push")
    assert push.returncode == 1, push.stderr[-3000:]
    last = push.stderr.splitlines()[-1]
    assert last.startswith(f"error: push of faults/data to DVC remote 'broken' ({not_a_directory}) failed: ")
    assert "[Errno 20] Not a directory" in last, last  # DVC's own cause
    assert "Having any troubles" not in push.stderr and "Traceback" not in push.stderr


@pytest.mark.parametrize("garbled, where", [("stages:\n  faults.data: [unclosed\n", "line 4 column 1"),
                                            ("stages: 5\n", "expected `stages:`")])
def test_commands_that_read_dvc_lock_name_a_garbled_one_and_where(tmp_path: Path, garbled: str, where: str):
    root = write_pipeline(tmp_path / "project", DATA)
    (root / "dvc.lock").write_text('schema: "2.0"\n' + garbled)
    for command in (["versions", "faults", "data"], ["restore", "faults", "data", "abc123"], ["list", "faults"]):
        result = cli(root, *command)
        assert result.returncode == 2, (command, result.stderr[-3000:])
        assert result.stderr.startswith(f"error: {root / 'dvc.lock'}: ") and where in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
