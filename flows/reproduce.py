"""A pipeline's stages reproduced by DVC in order inside its MLflow parent run, without Prefect: what the Prefect
flow's tasks call (flows/flow.py), and what a run does alone when every stage is up to date (flows/run.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Callable

from flows import dvc
from flows.config import RunSettings
from flows.errors import StageFailed
from stages.paths import LinkedPath, claim
from stages.processes import RUN_PID_ENV
from stages.runner import EXIT_BAD_INPUT, FRESH_ENV
from stages.spec import ResolvedStage, digest
from stages.tracking import PARENT_RUN_ENV

PROJECT_ENV = "RL4LLM_PROJECT"  # on a worker: its clone of the project (default: the flow run's directory)


def reproduce_here(root: Path, pipeline: str, stage: str, spec: ResolvedStage, force: bool, env: dict[str, str],
                   push: bool, on_line: Callable[[str], None]) -> str:
    """`dvc repro` of one stage here, then push it if asked. Returns what DVC did: 'ran', 'restored' (outputs were
    missing and DVC brought them from the remote or its run cache) or 'skipped' (up to date). A symbolic link
    that is the stage's output directory is removed first (DVC would delete the outputs through it)."""
    try:
        claim(root, Path(spec.output_dir))
    except LinkedPath as e:
        raise StageFailed(EXIT_BAD_INPUT, f"error: {pipeline}/{stage} bad input: {e}") from None
    outcome = dvc.repro(root, pipeline, stage, force, env, on_line)
    if push:
        dvc.push(root, pipeline, stage)
    return outcome


def run_stages(root: Path, pipeline: str, specs: dict[str, ResolvedStage], stages_to_run: list[str],
               settings: RunSettings, reproduce: Callable[[str, dict[str, str]], str],
               log: Callable[[str], None]) -> dict[str, str]:
    """The pipeline's MLflow parent run around `reproduce(stage, env)` of each stage in order: each stage's lineage
    recorded, the final policy registered; the parent run ends KILLED or FAILED if a stage is interrupted or fails.
    Returns {stage: outcome}."""
    track = tracking()
    parent = track.start_parent_run(root, pipeline, digest(specs), settings.tags)
    env = {PARENT_RUN_ENV: parent, RUN_PID_ENV: str(os.getpid())}
    if settings.fresh:
        env[FRESH_ENV] = "1"
    outcome: dict[str, str] = {}
    run_ids: dict[str, str] = {}
    try:
        for stage in stages_to_run:
            outcome[stage] = reproduce(stage, env)
            run_ids[stage] = track.record_stage(root, parent, pipeline, stage, specs[stage], outcome[stage])
            log(f"{pipeline}.{stage}: {outcome[stage]}")
        final = settings.final_policy
        if final in run_ids:
            track.register_policy(root, parent, pipeline, final, specs[final], run_ids[final])
    except BaseException as error:
        track.end_parent_run(pipeline, parent, track.end_status(error))
        raise
    track.end_parent_run(pipeline, parent)
    ran = [s for s, o in outcome.items() if o == "ran"]
    log(f"{pipeline}: " + (f"ran {', '.join(ran)}" if ran else f"all {len(outcome)} stages up to date, nothing ran"))
    return outcome


def tracking() -> ModuleType:
    """flows.tracking, loaded when a run has something to record (MLflow takes seconds to load)."""
    from flows import tracking

    return tracking


def project_root() -> Path:
    """Where this process's project is: RL4LLM_PROJECT (a worker's clone), else the working directory."""
    return Path(os.environ.get(PROJECT_ENV) or os.getcwd()).resolve()
