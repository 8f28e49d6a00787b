"""pipelines.yaml: every shipped config resolves, generated files agree, and broken configs fail fast and clearly."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import dvc
from flows.config import resolve
from flows.errors import ConfigError, ConfigErrors
from tests.conftest import REPO, make_project

BASE = {
    "pipelines": {
        "demo": {
            "defaults": {"seed": 1},
            "datasets": {"demos": {"path": "demos.jsonl", "columns": {"prompt": "question", "response": "answer"}}},
            "stages": [
                {"name": "sft", "kind": "sft", "inputs": {"data": "datasets.demos"}, "params": {"lr": 0.01}},
                {"name": "rm", "kind": "reward_model",
                 "inputs": {"base": "sft.model", "comparisons": "datasets.demos", "demos": "datasets.demos"}},
            ],
        }
    }
}


def write(project: Path, config: dict) -> Path:
    (project / "demos.jsonl").write_text(json.dumps({"question": "name two animals", "answer": "cat dog"}) + "\n")
    path = project / "pipelines.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def broken(project: Path, edit) -> ConfigError:
    config = copy.deepcopy(BASE)
    edit(config["pipelines"]["demo"])
    with pytest.raises(ConfigError) as raised:
        resolve(write(project, config))
    return raised.value


def test_the_project_config_resolves():
    assert resolve(REPO / "pipelines.yaml")


@pytest.mark.parametrize("config", sorted((REPO / "tests" / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_test_config_resolves(config, tmp_path):
    assert resolve(make_project(tmp_path, config))


def test_generated_dvc_yaml_and_params_agree_with_pipelines_yaml():
    dvc_yaml, params_yaml = dvc.render(REPO, resolve(REPO / "pipelines.yaml").stages)
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml, "dvc.yaml is stale: run `rl4llm sync`"
    assert (REPO / "params.yaml").read_text() == params_yaml, "params.yaml is stale: run `rl4llm sync`"


def test_resolution_fills_defaults_and_maps_columns(project):
    spec = resolve(write(project, BASE)).stages["demo"]
    assert spec["sft"].seed == 1
    assert spec["sft"].params["lr"] == 0.01 and spec["sft"].params["epochs"] == 3
    assert spec["sft"].inputs["data"].columns == {"prompt": "question", "response": "answer"}
    assert spec["rm"].inputs["base"].path == "artifacts/demo/sft/model"
    assert spec["rm"].outputs == {"model": "artifacts/demo/rm/model"}


def test_unknown_stage_kind_names_nearest(project):
    error = broken(project, lambda p: p["stages"][0].update(kind="sftt"))
    assert (error.pipeline, error.stage, error.key) == ("demo", "sft", "kind")
    assert "did you mean 'sft'" in str(error) and "pipelines.yaml" in str(error)


def test_input_naming_a_later_stage_is_rejected(project):
    error = broken(project, lambda p: p["stages"][0]["inputs"].update(base="rm.model"))
    assert (error.stage, error.key) == ("sft", "inputs.base")
    assert "names no earlier stage's output" in str(error)


def test_input_naming_a_missing_output_suggests_one(project):
    error = broken(project, lambda p: p["stages"][1]["inputs"].update(base="sft.modle"))
    assert error.key == "inputs.base" and "did you mean 'model'" in str(error)


def test_missing_required_input(project):
    error = broken(project, lambda p: p["stages"][1]["inputs"].pop("demos"))
    assert (error.stage, error.key) == ("rm", "inputs.demos")


def test_misspelt_param_names_nearest(project):
    error = broken(project, lambda p: p["stages"][0]["params"].update(lrr=0.1))
    assert error.key == "params.lrr" and "did you mean 'lr'" in str(error)


def test_a_replaced_param_says_what_replaced_it(project):
    error = broken(project, lambda p: p["stages"][0]["params"].update(gradient_accumulation_steps=2))
    assert error.key == "params.gradient_accumulation_steps" and "replaced by micro_batch_size" in str(error)


def test_the_rollout_engine_is_part_of_the_stages_spec(project):
    """A stage sampled through vllm is not the same stage as one sampled through hf: DVC sees the param change."""
    config = copy.deepcopy(BASE)
    hf = resolve(write(project, config)).stages["demo"]["sft"].params
    config["pipelines"]["demo"]["stages"][0]["params"]["rollout"] = {"engine": "vllm"}
    vllm = resolve(write(project, config)).stages["demo"]["sft"].params
    assert hf["rollout"]["engine"] == "hf" and vllm["rollout"]["engine"] == "vllm"
    assert {k: v for k, v in hf.items() if k != "rollout"} == {k: v for k, v in vllm.items() if k != "rollout"}


def test_an_unknown_rollout_engine_is_named(project):
    error = broken(project, lambda p: p["stages"][0]["params"].update(rollout={"engine": "sglang"}))
    assert error.key.startswith("params.rollout") and "'hf'" in str(error) and "'vllm'" in str(error)


def test_mistyped_param(project):
    error = broken(project, lambda p: p["stages"][0]["params"].update(epochs="many"))
    assert error.key == "params.epochs" and "'many'" in str(error)


def test_missing_dataset_file(project):
    error = broken(project, lambda p: p["datasets"]["demos"].update(path="nope.jsonl"))
    assert error.key == "inputs.data" and "not found: nope.jsonl" in str(error)


def test_missing_dataset_column(project):
    error = broken(project, lambda p: p["datasets"]["demos"]["columns"].update(response="reply"))
    assert error.key == "inputs.data" and "column 'reply' (mapped to 'response') not in demos.jsonl" in str(error)


def test_unknown_top_level_key(project):
    error = broken(project, lambda p: p["stages"][0].update(parms={}))
    assert (error.stage, error.key) == ("sft", "parms") and "unknown key" in str(error)


def test_every_problem_is_reported_at_once(project):
    def three_problems(pipeline: dict) -> None:
        pipeline["stages"][0]["params"].update(lrr=0.1, epochs="many")
        pipeline["stages"][1]["inputs"].pop("demos")

    error = broken(project, three_problems)
    assert isinstance(error, ConfigErrors) and str(error).startswith("3 problems:")
    assert [(e.stage, e.key) for e in error.errors] == [("sft", "params.lrr"), ("sft", "params.epochs"),
                                                       ("rm", "inputs.demos")]


def test_cli_exits_2_and_writes_nothing(project):
    config = copy.deepcopy(BASE)
    config["pipelines"]["demo"]["stages"][0]["kind"] = "sftt"
    write(project, config)
    before = sorted(p.name for p in project.iterdir())
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "demo"], cwd=project, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "stage 'sft'" in result.stderr and "unknown stage kind 'sftt'" in result.stderr
    assert sorted(p.name for p in project.iterdir()) == before


def hub_layout_config(chat_columns: dict[str, str]) -> dict:
    return {"pipelines": {"demo": {
        "defaults": {"seed": 0, "model": "some/model"},
        "datasets": {"chat": {"path": "chat", "split": "train", "columns": chat_columns},
                     "flat": {"path": "demos.jsonl", "columns": {"prompt": "question", "response": "answer"}},
                     "prefs": {"path": "prefs", "split": "train"}},
        "stages": [{"name": "sft_chat", "kind": "sft", "inputs": {"data": "datasets.chat"}},
                   {"name": "sft_flat", "kind": "sft", "inputs": {"data": "datasets.flat"}},
                   {"name": "rm", "kind": "reward_model",
                    "inputs": {"base": "sft_chat.model", "comparisons": "datasets.prefs", "demos": "datasets.chat"}}],
    }}}


def test_hub_layout_folders_and_flat_files_share_the_column_mapping(project: Path):
    from datasets import Dataset

    for name, row in (("chat", {"conversation": [{"role": "user", "content": "hi"}]}),
                      ("prefs", {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "b"}]})):
        (project / name / "data").mkdir(parents=True)
        Dataset.from_list([row]).to_parquet(project / name / "data/train-00000-of-00001.parquet")
    resolved = resolve(write(project, hub_layout_config({"messages": "conversation"})))
    assert resolved.stages["demo"]["sft_chat"].inputs["data"].columns == {"messages": "conversation"}

    with pytest.raises(ConfigError) as raised:
        resolve(write(project, hub_layout_config({"messages": "conversations"})))
    message = str(raised.value)
    for part in ("pipelines.yaml", "'demo'", "'sft_chat'", "inputs.data", "'conversations'", "chat"):
        assert part in message, message


def model_inputs_config(base: str, defaults: dict | None = None) -> dict:
    """BASE with the sft stage's `base` model input set to `base` (and the pipeline's `defaults.inputs`)."""
    config = copy.deepcopy(BASE)
    pipeline = config["pipelines"]["demo"]
    pipeline["datasets"]["tiny"] = {"path": "models/tiny"}
    pipeline["stages"][0]["inputs"]["base"] = base
    pipeline["defaults"]["inputs"] = defaults or {}
    return config


@pytest.mark.parametrize("base", ["models/tiny", "./models/tiny", "datasets.tiny", "Qwen/Qwen2.5-0.5B", "absolute"])
def test_a_model_input_names_a_model_directory_or_a_hub_id_directly(project: Path, tiny_model_dir: Path, base: str):
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    base = str(project / "models" / "tiny") if base == "absolute" else base
    resolved = resolve(write(project, model_inputs_config(base))).stages
    path = resolved["demo"]["sft"].inputs["base"].path
    assert path == ("models/tiny" if base == "datasets.tiny" else base)
    deps = dvc.dvc_stages(project, resolved)["stages"]["demo.sft"]["deps"]
    assert (path in deps) == (base != "Qwen/Qwen2.5-0.5B")  # a local model is a DVC dependency; a Hub id is not


def test_a_default_input_may_be_a_path(project: Path, tiny_model_dir: Path):
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    config = model_inputs_config("models/tiny", defaults={"base": "models/tiny"})
    del config["pipelines"]["demo"]["stages"][0]["inputs"]["base"]
    del config["pipelines"]["demo"]["stages"][1]["inputs"]["base"]
    resolved = resolve(write(project, config)).stages["demo"]
    assert resolved["sft"].inputs["base"].path == resolved["rm"].inputs["base"].path == "models/tiny"


def test_an_import_stage_reads_a_gguf_file_and_feeds_later_stages(project: Path):
    (project / "models").mkdir()
    (project / "models" / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    config = copy.deepcopy(BASE)
    config["pipelines"]["demo"]["stages"].insert(0, {
        "name": "import", "kind": "import_model", "inputs": {"source": "models/m.gguf"},
        "params": {"revision": None, "dtype": "bfloat16"}})
    config["pipelines"]["demo"]["stages"][1]["inputs"]["base"] = "import.model"
    resolved = resolve(write(project, config))
    specs = resolved.stages["demo"]
    assert specs["import"].inputs["source"].path == "models/m.gguf" and specs["import"].params["dtype"] == "bfloat16"
    assert specs["sft"].inputs["base"].path == "artifacts/demo/import/model"
    assert "models/m.gguf" in dvc.dvc_stages(project, resolved.stages)["stages"]["demo.import"]["deps"]
