"""What a stage kind receives: its resolved spec (from the generated params.yaml), an Accelerator, a tracker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import data
from stages.kinds import Input, StageParams

if TYPE_CHECKING:  # a kind's declaration may name StageContext without loading the training stack
    from accelerate import Accelerator

    from stages.spec import DataInput
    from stages.tracking import StageRun


@dataclass
class StageContext:
    pipeline: str
    stage: str
    seed: int
    params: StageParams  # the kind's params (its own subclass)
    inputs: dict[str, DataInput]  # input name -> what it reads
    outputs: dict[str, Path]  # output name -> path
    output_dir: Path
    model: str | None  # pipeline/stage default model (HF id or path), used when no model input is wired
    accelerator: Accelerator
    tracker: StageRun
    checkpoint_dir: Path | None = None  # where the training loop checkpoints (None: it does not)
    declared: dict[str, Input] = field(default_factory=dict)  # the kind's INPUTS: the columns its data must hold
    opened: dict[str, Any] = field(default_factory=dict, repr=False)  # what the stage opened, by name (its engine)

    def close(self) -> None:
        """Release what the stage opened (each `opened` value's close(): a started vLLM server stops)."""
        while self.opened:
            self.opened.popitem()[1].close()

    @property
    def label(self) -> str:
        """How messages name the stage: `pipeline/stage`."""
        return f"{self.pipeline}/{self.stage}"

    def has(self, name: str) -> bool:
        return name in self.inputs

    def path(self, name: str) -> str:
        return self.inputs[name].path

    def source(self, name: str) -> str:
        """How errors name input `name`: its dataset path (and split)."""
        spec = self.inputs[name]
        split = "" if Path(spec.path).is_file() else f", split {spec.split}"  # a file has no splits
        return f"input '{name}' ({spec.path}{split})"

    def rows(self, name: str) -> list[dict[str, Any]]:
        declared = self.declared.get(name, Input(""))
        return data.load_rows(self.inputs[name], declared.columns, declared.or_columns)

    def model_path(self, name: str) -> str:
        """The model input `name` if wired, else the pipeline's default `model`."""
        if name in self.inputs:
            return self.inputs[name].path
        if self.model is None:
            raise ValueError(f"{self.pipeline}/{self.stage}: no input '{name}' and no default model")
        return self.model

