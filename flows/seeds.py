"""One pipeline, several seeds: `rl4llm run P --seeds 0,1,2`.

Seed `s` of pipeline `P` is the pipeline with every stage's seed set to `s`: `P` itself when all its stages already
use `s`, else the variant `P-seed<s>`, whose stages write `artifacts/P-seed<s>/<stage>/` and are DVC stages of their
own (generated into dvc.yaml while they run; their dvc.lock entries stay, so an unchanged seed is skipped the next
time). Every MLflow run of a seed is tagged `seed` (and a variant's `seed_of: P`), and `compare P` aggregates the
seeds as mean ± sd.
"""

from __future__ import annotations

import copy
from typing import Any

from flows.errors import ConfigError
from stages.paths import ARTIFACTS


def parse_seeds(text: str, file: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(file, f"--seeds takes comma-separated integers, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(file, f"--seeds takes distinct integers, got '{text}'")
    return seeds


def variant_name(pipeline: str, seed: int) -> str:
    return f"{pipeline}-seed{seed}"


def pipeline_seed(specs: dict[str, dict[str, Any]]) -> int | None:
    """The seed every stage of a pipeline uses (None if they differ)."""
    seeds = {spec["seed"] for spec in specs.values()}
    return seeds.pop() if len(seeds) == 1 else None


def add_seed_variants(resolved: dict[str, dict[str, dict[str, Any]]], pipeline: str, seeds: list[int],
                      file: str) -> dict[int, str]:
    """{seed: the pipeline that runs it}, adding the variants needed to `resolved`."""
    specs = resolved[pipeline]
    names = {}
    for seed in seeds:
        if pipeline_seed(specs) == seed:
            names[seed] = pipeline
            continue
        name = variant_name(pipeline, seed)
        if name in resolved:
            raise ConfigError(file, f"pipeline '{name}' already exists: seed {seed} of '{pipeline}' needs that name",
                              pipeline)
        old, new = f"{ARTIFACTS}/{pipeline}", f"{ARTIFACTS}/{name}"
        resolved[name] = {stage: _moved(copy.deepcopy(spec), old, new) | {"seed": seed}
                          for stage, spec in specs.items()}
        names[seed] = name
    return names


def _moved(spec: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """The spec with its outputs, and its inputs from earlier stages, under `new` instead of `old`."""
    def move(path: str) -> str:
        return new + path.removeprefix(old) if path == old or path.startswith(f"{old}/") else path

    spec["output_dir"] = move(spec["output_dir"])
    spec["outputs"] = {name: move(path) for name, path in spec["outputs"].items()}
    for item in spec["inputs"].values():
        item["path"] = move(item["path"])
    return spec
