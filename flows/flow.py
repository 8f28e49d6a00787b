"""The Prefect flow: one task per stage, in pipeline order; each task asks DVC to reproduce its stage.

Prefect owns ordering, retries, logs and the UI; task caching is off because DVC alone decides staleness. The flow
opens the MLflow parent run and hands its id to the stages through the environment.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc, tracking
from stages.runner import RAN_MARKER_ENV
from stages.tracking import PARENT_RUN_ENV


@task(cache_policy=NO_CACHE, retries=0)
def reproduce_stage(root: str, pipeline: str, stage: str, force: bool, env: dict[str, str]) -> bool:
    """`dvc repro --single-item <pipeline>.<stage>`; True if the stage really ran (False: DVC found it up to date
    or restored it from its run cache)."""
    dvc.repro(Path(root), pipeline, stage, force, env)
    return (Path(env[RAN_MARKER_ENV]) / f"{pipeline}.{stage}").exists()


@flow(name="rl4llm-pipeline", log_prints=True)
def pipeline_flow(root: str, pipeline: str, specs: dict[str, dict[str, Any]], stages_to_run: list[str],
                  force: bool, config_hash: str) -> dict[str, str]:
    """Reproduce `stages_to_run` of `pipeline` in order. Returns {stage: 'ran' | 'skipped'}."""
    logger = get_run_logger()
    parent = tracking.start_parent_run(Path(root), pipeline, config_hash)
    outcome: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rl4llm-ran-") as ran_dir:
            env = {PARENT_RUN_ENV: parent, RAN_MARKER_ENV: ran_dir}
            for stage in stages_to_run:
                ran = reproduce_stage.with_options(name=f"{pipeline}.{stage}")(root, pipeline, stage, force, env)
                outcome[stage] = "ran" if ran else "skipped"
                if not ran:
                    tracking.log_skipped_stage(Path(root), parent, pipeline, stage, specs[stage])
                logger.info("%s.%s: %s", pipeline, stage, "ran" if ran else "up to date, skipped")
    except BaseException as error:
        tracking.end_parent_run(tracking.end_status(error))
        raise
    tracking.end_parent_run()
    ran = [s for s, o in outcome.items() if o == "ran"]
    logger.info("%s: %s", pipeline, f"ran {', '.join(ran)}" if ran else
                f"all {len(outcome)} stages up to date, nothing ran")
    return outcome


def select_stages(order: list[str], graph: dict[str, set[str]], stage: str | None, downstream: bool) -> list[str]:
    """The stages to run: all; one; or one and every later stage that depends on it (transitively)."""
    if stage is None:
        return order
    selected = {stage}
    if downstream:
        for name in order[order.index(stage) + 1:]:
            if graph[name] & selected:
                selected.add(name)
    return [name for name in order if name in selected]


def input_graph(specs: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """stage -> the earlier stages whose outputs it reads."""
    producers = {path: stage for stage, spec in specs.items() for path in spec["outputs"].values()}
    return {stage: {producers[i["path"]] for i in spec["inputs"].values() if i["path"] in producers}
            for stage, spec in specs.items()}

