"""accelerate: the sft stage run as 2 CPU processes (gloo) matches the 1-process run.

Also exercises the path real users take: `model:` points at a saved HF model directory loaded with from_pretrained,
and the data are a local dataset file with a column mapping.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages import instruct_task
from tests.conftest import make_project

pytestmark = pytest.mark.e2e


def test_two_process_sft_matches_one_process(tmp_path: Path, tiny_model_dir: Path):
    rng = random.Random(0)
    rows = []
    for _ in range(40):  # 32 train rows = 4 full batches; equal response lengths: the 2-process token mean equals the 1-process one exactly
        prompt = instruct_task.make_prompt(rng)
        rows.append({"instruction": prompt, "output": " ".join(rng.sample(instruct_task.ALL_WORDS, 2))})
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {"kind": "sft", "inputs": {"data": "datasets.demos"},
           "params": {"epochs": 2, "batch_size": 8, "lr": 0.01, "holdout_fraction": 0.2}}
    config = {"pipelines": {"dist": {
        "defaults": {"seed": 0, "model": str(tiny_model_dir)},
        "datasets": {"demos": {"path": "demos.jsonl", "columns": {"prompt": "instruction", "response": "output"}}},
        "stages": [{"name": "one", **sft},
                   {"name": "two", **sft, "accelerate_config": "infra/accelerate/cpu_2proc.yaml"}],
    }}}
    make_project(tmp_path)
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for args in (["sync"], ["stage", "dist", "one"], ["stage", "dist", "two"]):
        subprocess.run(["rl4llm", *args], cwd=tmp_path, env=env, check=True, timeout=300)

    one, two = (json.loads((tmp_path / f"artifacts/dist/{s}/metrics.json").read_text()) for s in ("one", "two"))
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    w1, w2 = (load_file(tmp_path / f"artifacts/dist/{s}/model/model.safetensors") for s in ("one", "two"))
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-4, rtol=1e-3)
    assert any(not torch.equal(w1[n], initial[n]) for n in w1)  # it trained
