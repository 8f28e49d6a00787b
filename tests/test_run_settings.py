"""Run settings (push, final policy, work pools, retries): read from pipelines.yaml, kept out of the stage specs
DVC hashes, and the remote read from DVC's config without starting DVC."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml
from prefect.states import Failed

from flows import dvc
from flows.config import RunSettings, StageSettings, resolve
from flows.errors import ConfigError
from flows.flow import _worth_retrying
from stages.processes import Interrupted
from tests.conftest import REPO, make_project


def write_config(root: Path, **changes) -> Path:
    config = yaml.safe_load((REPO / "tests/pipelines/tiny_instructgpt.yaml").read_text())
    tiny = config["pipelines"]["tiny"]
    tiny["defaults"].update(changes.pop("defaults", {}))
    for stage in tiny["stages"]:
        stage.update(changes.pop(stage["name"], {}))
    tiny.update(changes)
    make_project(root)
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "pipelines.yaml"


def test_stage_settings_override_the_pipeline_defaults(tmp_path):
    path = write_config(tmp_path, defaults={"work_pool": "cpu", "retries": 2}, push=True,
                        ppo={"work_pool": "trainer", "retry_delay_seconds": 30})
    settings = resolve(path).settings["tiny"]
    assert settings.push and settings.default_work_pool == "cpu"
    assert settings.stages["ppo"] == StageSettings(work_pool="trainer", retries=2, retry_delay_seconds=30)
    assert settings.stages["sft"] == StageSettings(work_pool="cpu", retries=2, retry_delay_seconds=10.0)
    assert settings.final_policy == "ppo"  # the last stage that trains a policy


def test_where_a_stage_runs_never_makes_it_stale(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = resolve(write_config(tmp_path / "a"))
    moved = resolve(write_config(tmp_path / "b", defaults={"work_pool": "gpu", "retries": 3}, push=True))
    assert plain.stages == moved.stages and plain.settings != moved.settings


@pytest.mark.parametrize("changes, key", [({"final_policy": "comparisons"}, "final_policy"),
                                          ({"ppo": {"retries": -1}}, "retries")])
def test_bad_run_settings_are_named(tmp_path, changes, key):
    with pytest.raises(ConfigError, match=key):
        resolve(write_config(tmp_path, **changes))


def test_failures_are_retried_but_not_interrupts_or_bad_input():
    assert _worth_retrying(None, None, Failed(data=RuntimeError("worker lost")))
    assert not _worth_retrying(None, None, Failed(data=ConfigError("pipelines.yaml", "bad")))
    assert not _worth_retrying(None, None, Failed(data=Interrupted(signal.SIGTERM, "stopped")))


def test_the_default_remote_is_read_from_dvc_config(tmp_path):
    (tmp_path / ".dvc").mkdir()
    assert dvc.default_remote(tmp_path) is None and dvc.remote_url(tmp_path) is None
    (tmp_path / ".dvc/config").write_text("[core]\n    remote = store\n['remote \"store\"']\n    url = /srv/dvc\n")
    assert dvc.default_remote(tmp_path) == "store" and dvc.remote_url(tmp_path) == "/srv/dvc"
    (tmp_path / ".dvc/config.local").write_text("['remote \"store\"']\n    url = s3://bucket/dvc\n")
    assert dvc.remote_url(tmp_path) == "s3://bucket/dvc"  # config.local wins, as in DVC


def test_lock_entries_are_replaced_one_stage_at_a_time(tmp_path):
    dvc.write_lock_entries(tmp_path, "p", {"a": {"cmd": "x", "outs": [{"path": "o", "md5": "1"}]}})
    dvc.write_lock_entries(tmp_path, "q", {"a": {"cmd": "y"}})
    dvc.write_lock_entries(tmp_path, "p", {"b": {"cmd": "z"}})
    assert dvc.lock_entries(tmp_path, "p") == {"a": {"cmd": "x", "outs": [{"path": "o", "md5": "1"}]},
                                               "b": {"cmd": "z"}}
    assert dvc.lock_entry(tmp_path, "q", "a") == {"cmd": "y"}
    assert yaml.safe_load((tmp_path / "dvc.lock").read_text())["schema"] == "2.0"


def test_a_no_op_run_records_again_once_the_tracking_store_changed(tmp_path, monkeypatch):
    from flows.run import RecordedState

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    seen = RecordedState(tmp_path, "p", ["a"], RunSettings(push=False))
    seen.save()
    assert seen.unchanged()
    assert RecordedState(tmp_path, "p", ["a"], RunSettings(push=True)).unchanged()  # a push is no change
    kept = tmp_path / ".rl4llm" / "logs" / "p.a.unsent.jsonl"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}\n")
    assert not seen.unchanged()  # metrics kept while tracking was lost: the next run sends them
    kept.unlink()
    store.unlink()
    assert not seen.unchanged()  # the store is gone: what it recorded must be recorded again
