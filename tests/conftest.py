"""Shared fixtures: a scratch project directory, a tiny locally built model, one Prefect test server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class Tracker:
    """A stage tracker that records what a stage logs (instead of MLflow)."""

    def __init__(self):
        self.logged: list[dict[str, float]] = []

    def log(self, step: int, metrics: dict[str, float], total: int | None = None) -> None:
        self.logged.append(metrics)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded, and results do not depend on the core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_instruct_data(root: Path, n_prompts: int = 40) -> dict[str, dict]:
    """Small instruction datasets as jsonl files in `root` (demos, comparisons, prompts, a corpus); returns their
    pipelines.yaml `datasets` entries. The demos name their columns `instruction` and `output`, mapped as real
    data often needs; every response has two words (equal lengths: a 2-process token mean equals the 1-process
    one exactly)."""
    import json
    import random

    from stages import instruct_task

    rng, words = random.Random(0), instruct_task.ALL_WORDS
    prompts = [instruct_task.make_prompt(rng) for _ in range(n_prompts)]
    files = {"demos": [{"instruction": p, "output": " ".join(rng.sample(words, 2))} for p in prompts],
             "comparisons": [{"prompt": p, "chosen": " ".join(rng.sample(words, 2)),
                              "rejected": " ".join(rng.sample(words, 2))} for p in prompts],
             "prompts": [{"prompt": p} for p in prompts],
             "corpus": [{"text": " ".join(rng.sample(words, 6))} for _ in range(64)]}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets = {name: {"path": f"{name}.jsonl"} for name in files}
    datasets["demos"]["columns"] = {"prompt": "instruction", "response": "output"}
    return datasets


def make_project(root: Path, pipelines_file: Path | None = None) -> Path:
    """A project directory with infra/ (accelerate configs) and, if given, a pipelines.yaml. Returns its config."""
    shutil.copytree(REPO / "infra", root / "infra")
    config = root / "pipelines.yaml"
    if pipelines_file is not None:
        shutil.copy(pipelines_file, config)
    return config


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """An empty project in tmp_path (cwd), with MLflow pointed at its own database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_project(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + word tokenizer saved with save_pretrained (loaded back through from_pretrained)."""
    from stages import instruct_task
    from stages.models import build_tiny_llama, build_word_tokenizer, save

    out = tmp_path_factory.mktemp("tiny_model")
    words = [*instruct_task.ALL_WORDS, *instruct_task.TOPICS, *instruct_task.COUNTS, "name"]
    tokenizer = build_word_tokenizer([" ".join(words)])
    torch.manual_seed(0)
    model = build_tiny_llama(len(tokenizer), 32, 1, 2, 64, tokenizer.pad_token_id, tokenizer.bos_token_id,
                             tokenizer.eos_token_id)
    save(model, tokenizer, out)
    return out


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (starting one costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
