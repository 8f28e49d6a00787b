"""Bring a pretrained model into a pipeline: a Hub id, a local `save_pretrained` directory or a GGUF file (e.g. a
llama.cpp quantisation, dequantised here) becomes an ordinary `save_pretrained` directory (weights in `dtype`, the
tokenizer with its chat template) that every other kind reads as `<stage>.model`.

The source is the stage's input, so DVC hashes a local file or directory and reruns the stage when it changes; a Hub
id is identified by its name and `revision` alone (pin a commit: DVC cannot see the Hub change under a branch name).

Declared here (what pipelines.yaml may set); how it works: stages/runs/import_model.py.
"""

from __future__ import annotations

from typing import Literal

from stages.kinds import Input, StageParams


class Params(StageParams):
    revision: str | None = None  # Hub branch, tag or commit of a Hub-id source (None: main); ignored for a local one
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"  # of the saved weights; auto: the source's own
    trust_remote_code: bool = False  # run a Hub model's own modelling code (only for sources you trust)


INPUTS = {
    "source": Input("the model to import: a Hub id (HuggingFaceTB/SmolLM2-135M-Instruct), a save_pretrained "
                    "directory, or a .gguf file", model=True, gguf=True),
}
OUTPUTS = {"model": "model"}
KEY_METRICS = ("parameters", "import_seconds")  # `rl4llm compare` shows these

run = "stages.runs.import_model:run"  # what a stage of this kind does
