"""A stage's resolved spec: what `rl4llm` makes of pipelines.yaml for one stage, what params.yaml holds under
`<pipeline>.<stage>` (DVC hashes it), and what every reader (the stage, DVC's calls, checkpoints, tracking) reads by
attribute. No torch: `validate`, `list` and DVC's calls read it too."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field

from stages.kinds import Described


class DataInput(Described):
    """What an input reads: a dataset of pipelines.yaml, or an earlier stage's output."""

    path: str  # local data file or folder, model directory or .gguf file (relative to pipelines.yaml), or a Hub id
    split: str = "train"  # split of an HF dataset (or of a local Hub-layout folder)
    subset: str | None = None  # HF dataset configuration name
    columns: dict[str, str] = Field(default_factory=dict)  # name a stage expects -> the dataset's column


class ResolvedStage(Described):
    """One stage, flat and self-contained: every setting and param with its default filled in."""

    kind: str  # a built-in kind or the module path of the user's own
    seed: int  # seeds sampling, initialisation and data order
    model: str | None  # the default model (HF id or local path), for model inputs not wired
    accelerate_config: str  # accelerate config file
    num_processes: int  # processes the accelerate config launches
    inputs: dict[str, DataInput]  # input name -> what it reads
    output_dir: str  # artifacts/<pipeline>/<stage>
    outputs: dict[str, str]  # output name -> its path, inside output_dir
    params: dict[str, Any]  # the kind's params

    def dump(self) -> dict[str, Any]:
        """As params.yaml holds it (plain YAML types)."""
        return self.model_dump(mode="json")


def digest(specs: dict[str, ResolvedStage] | ResolvedStage, length: int = 12) -> str:
    """A short hash of one spec or of a pipeline's specs (a change to any setting or param changes it)."""
    dumped = specs.dump() if isinstance(specs, ResolvedStage) else {name: s.dump() for name, s in specs.items()}
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:length]
