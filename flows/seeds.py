"""One pipeline, several seeds: `rl4llm run P --seeds 0,1,2`.

Seed `s` of pipeline `P` is the pipeline with every stage's seed set to `s`: `P` itself when all its stages already
use `s`, else the variant `P-seed<s>`, whose stages write `artifacts/P-seed<s>/<stage>/` and are DVC stages of their
own (generated into dvc.yaml while they run; their dvc.lock entries stay, so an unchanged seed is skipped the next
time). Every MLflow run of a seed is tagged `seed` (and a variant's `seed_of: P`), and `compare P` aggregates the
seeds as mean ± sd.
"""

from __future__ import annotations

from flows.errors import ConfigError
from stages.paths import ARTIFACTS
from stages.spec import ResolvedStage


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


def pipeline_seed(specs: dict[str, ResolvedStage]) -> int | None:
    """The seed every stage of a pipeline uses (None if they differ)."""
    seeds = {spec.seed for spec in specs.values()}
    return seeds.pop() if len(seeds) == 1 else None


def add_seed_variants(resolved: dict[str, dict[str, ResolvedStage]], pipeline: str, seeds: list[int],
                      file: str) -> dict[int, str]:
    """{seed: the pipeline that runs it}, adding the variants needed to `resolved` ({pipeline: {stage: spec}})."""
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
        resolved[name] = {stage: _moved(spec, old, new).model_copy(update={"seed": seed})
                          for stage, spec in specs.items()}
        names[seed] = name
    return names


def _moved(spec: ResolvedStage, old: str, new: str) -> ResolvedStage:
    """The spec with its outputs, and its inputs from earlier stages, under `new` instead of `old`."""
    def move(path: str) -> str:
        return new + path.removeprefix(old) if path == old or path.startswith(f"{old}/") else path

    inputs = {name: item.model_copy(update={"path": move(item.path)}) for name, item in spec.inputs.items()}
    return spec.model_copy(update={"output_dir": move(spec.output_dir), "inputs": inputs,
                                   "outputs": {name: move(path) for name, path in spec.outputs.items()}})
