"""import_model: a save_pretrained directory and a Hub id become an ordinary save_pretrained directory; the source is
the stage's DVC dependency. The real SmolLM2 GGUF file's import is tested with its pipeline (tests/test_smollm2.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from flows import cli
from flows.dvc import ensure_repo
from stages.context import StageContext
from stages.kinds import get_kind
from stages.models import load_policy, load_tokenizer
from stages.spec import DataInput
from tests.conftest import Tracker



def import_stage(source: str | Path, out: Path, **params) -> tuple[dict[str, float], Path]:
    """Run an import_model stage on `source` in this process; (its metrics, its model directory)."""
    kind = get_kind("import_model")
    ctx = StageContext("demo", "import", 0, kind.params(**params), {"source": DataInput(path=str(source))},
                       {"model": out / "model"}, out, None, Accelerator(cpu=True), Tracker(), declared=kind.inputs)
    return kind.load_run()(ctx), out / "model"


def test_a_save_pretrained_directory_is_saved_again_in_the_chosen_dtype(tiny_model_dir: Path, tmp_path: Path):
    metrics, model_dir = import_stage(tiny_model_dir, tmp_path / "f32")
    source, imported = load_file(tiny_model_dir / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert imported.keys() == source.keys() and all(torch.equal(imported[k], source[k]) for k in source)
    assert load_tokenizer(str(model_dir)).chat_template == load_tokenizer(str(tiny_model_dir)).chat_template
    assert metrics["parameters"] == load_policy(str(tiny_model_dir)).num_parameters()

    _, bf16 = import_stage(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16")
    weights = load_file(bf16 / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert all(torch.equal(weights[k], source[k].to(torch.bfloat16)) for k in source)


def test_a_hub_id_neither_cached_nor_reachable_is_named_with_the_stage_and_key(tmp_path: Path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine with no network
    with pytest.raises(ValueError) as raised:
        import_stage("rl4llm-tests/not-a-cached-model", tmp_path, revision="v1")
    assert str(raised.value).startswith(
        "demo/import: inputs.source: Hub model 'rl4llm-tests/not-a-cached-model' (revision v1) is neither in the local "
        "Hugging Face cache nor downloadable (")
    assert "give a local save_pretrained directory or .gguf file as the source" in str(raised.value)
    assert not (tmp_path / "model").exists()


PIPELINE = {"pipelines": {"imp": {"stages": [
    {"name": "import", "kind": "import_model", "inputs": {"source": "models/tiny"}}]}}}


@pytest.mark.e2e
def test_a_changed_source_reruns_the_stage_and_an_unchanged_one_is_skipped(project: Path, tiny_model_dir: Path):
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    (project / "pipelines.yaml").write_text(yaml.safe_dump(PIPELINE))
    cli.execute(["-c", "pipelines.yaml", "sync"])
    ensure_repo(project)
    assert "models/tiny" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["imp.import"]["deps"]

    def repro() -> str:
        return subprocess.run(["dvc", "repro", "imp.import"], cwd=project, check=True, capture_output=True,
                              text=True).stdout

    assert "Running stage 'imp.import'" in repro()
    assert (project / "artifacts/imp/import/model/config.json").exists()
    assert "didn't change, skipping" in repro()
    assert "import_model             up to date" in cli.execute(["-c", "pipelines.yaml", "list"])

    config = project / "models" / "tiny" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-5}))
    assert "stale (changed deps: models/tiny)" in cli.execute(["-c", "pipelines.yaml", "list"])
