"""`rl4llm stage <pipeline> <stage>`: run one stage from its resolved spec in params.yaml.

This is the command DVC runs. It behaves the same by hand: it reads only files (params.yaml and its inputs),
writes only `artifacts/<pipeline>/<stage>/` (outputs + metrics.json), and logs one MLflow run. When the pipeline's
accelerate config asks for more than one process it re-launches itself under `accelerate launch`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import datasets
import transformers
import yaml
from accelerate.utils import set_seed

from stages.context import StageContext
from stages.distributed import build_accelerator
from stages.kinds import get_kind
from stages.tracking import StageRun

PARAMS_FILE = "params.yaml"
RAN_MARKER_ENV = "RL4LLM_RAN_DIR"  # set by the flow: a stage that really runs leaves a marker file there
METRICS_FILE = "metrics.json"


def load_spec(pipeline: str, stage: str, params_file: str = PARAMS_FILE) -> dict[str, Any]:
    resolved = yaml.safe_load(Path(params_file).read_text()) or {}
    try:
        return resolved[pipeline][stage]
    except KeyError:
        raise SystemExit(f"{params_file}: no stage '{stage}' in pipeline '{pipeline}' "
                         f"(run `rl4llm sync` after editing pipelines.yaml)") from None


def tree_hash(paths: list[Path]) -> str:
    """sha256 over the files under `paths` (relative names and contents), to tag the MLflow run."""
    digest = hashlib.sha256()
    for root in sorted(paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root.parent)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def is_launched_worker() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def launch_distributed(pipeline: str, stage: str, spec: dict[str, Any], params_file: str) -> None:
    cmd = ["accelerate", "launch", "--config_file", spec["accelerate_config"],
           "-m", "stages.runner", pipeline, stage, "--params-file", params_file]
    subprocess.run(cmd, check=True)


def run_stage(pipeline: str, stage: str, params_file: str = PARAMS_FILE) -> dict[str, float]:
    spec = load_spec(pipeline, stage, params_file)
    output_dir = Path(spec["output_dir"])
    if spec["num_processes"] > 1 and not is_launched_worker():
        launch_distributed(pipeline, stage, spec, params_file)
        return json.loads((output_dir / METRICS_FILE).read_text())

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    accelerator = build_accelerator(spec["accelerate_config"])
    set_seed(spec["seed"])
    kind = get_kind(spec["kind"])
    params = kind.params(**spec["params"])
    if accelerator.is_main_process:
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()

    tracker = StageRun(pipeline, stage, spec["kind"], spec["params"], is_main=accelerator.is_main_process)
    ctx = StageContext(
        pipeline=pipeline, stage=stage, seed=spec["seed"], params=params, inputs=spec["inputs"],
        outputs={name: Path(path) for name, path in spec["outputs"].items()}, output_dir=output_dir,
        model=spec.get("model"), accelerator=accelerator, tracker=tracker,
    )
    try:
        metrics = kind.run(ctx)
    except BaseException:
        tracker.fail()
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        tracker.finish(metrics, {"output_hash": tree_hash(list(ctx.outputs.values())), "skipped": "false"})
        if os.environ.get(RAN_MARKER_ENV):
            marker = Path(os.environ[RAN_MARKER_ENV]) / f"{pipeline}.{stage}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(tracker.run_id or "")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rl4llm stage", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    parser.add_argument("stage")
    parser.add_argument("--params-file", default=PARAMS_FILE)
    args = parser.parse_args(argv)
    print(json.dumps(run_stage(args.pipeline, args.stage, args.params_file), sort_keys=True))


if __name__ == "__main__":
    main()
