"""`rl4llm deploy`: Prefect deployments of a pipeline and of its stages that name a work pool.

The pipeline's deployment runs the whole pipeline flow on a worker of its pool; each stage with a `work_pool` gets
its own deployment (`rl4llm-stage/<pipeline>.<stage>`), which the pipeline flow starts with `run_deployment`. A
pooled stage whose accelerate config spans M > 1 machines also gets a rank deployment per other machine r
(`rl4llm-stage-rank/<pipeline>.<stage>.rank<r>` on pool `<pool>-rank<r>`).
Workers load the flows from `source` (default: this package's directory, for workers on this machine; a git URL
for others) and run them in their clone of the project (`RL4LLM_PROJECT`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import flows
from flows import dvc
from flows.config import RunSettings, resolve
from flows.errors import ConfigError

FLOWS_FILE = "flows/flow.py"  # the stage flow
DEPLOYED_FILE = "flows/deployed.py"  # the pipeline flow a deployment runs


def package_source() -> str:
    """The directory holding the `flows` package: where a worker on this machine loads the flows from."""
    return str(Path(flows.__file__).resolve().parents[1])


def deploy(pipeline: str, settings: RunSettings, pool: str | None, source: str | None, config_file: str) -> list[str]:
    """Create or update the deployments; returns their names."""
    from prefect import Flow

    from flows.flow import PIPELINE_FLOW, RANK_FLOW, STAGE_FLOW, num_machines, rank_deployment, rank_pool

    pools = {stage: chosen.work_pool for stage, chosen in settings.stages.items() if chosen.work_pool}
    pipeline_pool = pool or settings.default_work_pool
    if pipeline_pool is None:
        raise ConfigError(config_file, "the pipeline flow needs a work pool: set `defaults.work_pool` or pass --pool",
                          pipeline, key="defaults.work_pool")
    where = source or package_source()
    root = Path(config_file).resolve().parent
    specs = resolve(config_file).stages[pipeline] if pools else {}
    names = []
    with contextlib.redirect_stdout(io.StringIO()):  # Prefect prints a table per deployment; we report the names
        for stage, stage_pool in pools.items():
            stage_flow = Flow.from_source(where, f"{FLOWS_FILE}:stage_flow")
            stage_flow.deploy(name=dvc.dvc_name(pipeline, stage), work_pool_name=stage_pool, build=False,
                              push=False, print_next_steps=False, ignore_warnings=True)
            names.append(f"{STAGE_FLOW}/{dvc.dvc_name(pipeline, stage)}")
            for rank in range(1, num_machines(root, specs[stage])):
                rank_flow = Flow.from_source(where, f"{FLOWS_FILE}:rank_flow")
                rank_flow.deploy(name=rank_deployment(pipeline, stage, rank), build=False, push=False,
                                 work_pool_name=rank_pool(stage_pool, rank), print_next_steps=False,
                                 ignore_warnings=True)
                names.append(f"{RANK_FLOW}/{rank_deployment(pipeline, stage, rank)}")
        pipeline_flow = Flow.from_source(where, f"{DEPLOYED_FILE}:deployed_pipeline")
        pipeline_flow.deploy(name=pipeline, work_pool_name=pipeline_pool, parameters={"pipeline": pipeline},
                             build=False, push=False, print_next_steps=False, ignore_warnings=True)
        names.append(f"{PIPELINE_FLOW}-deployment/{pipeline}")
    return names
