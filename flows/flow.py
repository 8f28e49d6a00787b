"""The Prefect flows: one task per stage, in pipeline order; each asks DVC to reproduce its stage, here or, for a
stage that names a `work_pool`, as its own flow run on a worker of that pool.

Prefect owns ordering, retries, logs and the UI; task caching is off because DVC alone decides staleness. The flow
opens the MLflow parent run and hands its id to the stages through the environment. With a DVC remote, outputs
move between machines through it: a worker pulls its stage's inputs and pushes its outputs and run cache, and the
run restores them here from the remote (DVC's run cache) instead of running the stage again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc
from flows.config import ConfigError, config_hash, input_graph, resolve, select_stages
from flows.preflight import tracking_uri_default
from flows.run import project_root, reproduce_here, run_pipeline, run_stages
from stages.processes import RUN_PID_ENV, interrupt_signal

PIPELINE_FLOW = "rl4llm-pipeline"
STAGE_FLOW = "rl4llm-stage"


@task(cache_policy=NO_CACHE)
def reproduce_stage(root: str, pipeline: str, stage: str, spec: dict[str, Any], force: bool, env: dict[str, str],
                    push: bool) -> str:
    """The stage in this process's project (see `reproduce_here`)."""
    return reproduce_here(Path(root), pipeline, stage, spec, force, env, push)


@task(cache_policy=NO_CACHE)
def dispatch_stage(root: str, pipeline: str, stage: str, spec: dict[str, Any], force: bool, env: dict[str, str],
                   push: bool, work_pool: str, pipeline_hash: str) -> str:
    """The stage as a flow run of its deployment on a worker of `work_pool`, unless DVC finds it up to date here
    (or only not pulled).
    The worker gets this run's dvc.lock entries of the other stages (so it can pull its inputs); its outputs come
    back here through the DVC remote (restored from the run cache the worker pushed)."""
    from prefect.deployments import run_deployment

    project = Path(root)
    state = dvc.status(project, pipeline, {stage: spec})[stage]
    if not force and (state == "up to date" or state.startswith("not pulled")):  # nothing to run: DVC restores
        return reproduce_here(project, pipeline, stage, spec, False, env, push)
    locked = {s: entry for s, entry in dvc.lock_entries(project, pipeline).items() if s != stage}
    name = f"{STAGE_FLOW}/{dvc.dvc_name(pipeline, stage)}"
    flow_run = run_deployment(name, parameters={"pipeline": pipeline, "stage": stage, "force": force, "env": env,
                                                "pipeline_hash": pipeline_hash, "locked": locked}, timeout=None)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"{pipeline}/{stage}: flow run '{flow_run.name}' on work pool '{work_pool}' ended "
                           f"{flow_run.state.name}: {flow_run.state.message or 'see its logs in Prefect'}")
    return reproduce_here(project, pipeline, stage, spec, False, env, push)


@flow(name=PIPELINE_FLOW, log_prints=True)
def pipeline_flow(root: str, pipeline: str, specs: dict[str, dict[str, Any]], stages_to_run: list[str],
                  force: bool, settings: dict[str, Any]) -> dict[str, str]:
    """Reproduce `stages_to_run` of `pipeline` in order, one task each (on its work pool, if it names one).
    Returns {stage: 'ran' | 'restored' | 'skipped'}."""
    push = settings["push"]  # run_pipeline refused it without a remote
    pipeline_hash = config_hash(specs)

    def reproduce(stage: str, env: dict[str, str]) -> str:
        chosen = settings["stages"][stage]
        options = dict(name=f"{pipeline}.{stage}", retries=chosen["retries"],
                       retry_delay_seconds=chosen["retry_delay_seconds"], retry_condition_fn=_worth_retrying)
        if chosen["work_pool"]:
            return dispatch_stage.with_options(**options)(root, pipeline, stage, specs[stage], force, env, push,
                                                          chosen["work_pool"], pipeline_hash)
        return reproduce_stage.with_options(**options)(root, pipeline, stage, specs[stage], force, env, push)

    return run_stages(Path(root), pipeline, specs, stages_to_run, settings, reproduce, get_run_logger().info)


def _worth_retrying(_task, _task_run, state) -> bool:
    """Retry failures, not interrupts or bad input (those would fail the same way again)."""
    try:
        state.result()
    except ConfigError:
        return False
    except BaseException as error:
        return interrupt_signal(error) is None
    return False


@flow(name=STAGE_FLOW, log_prints=True)
def stage_flow(pipeline: str, stage: str, force: bool, env: dict[str, str], pipeline_hash: str,
               locked: dict[str, dict[str, Any]]) -> str:
    """One stage on a worker, in its clone of the project: the same pipelines.yaml as the run that sent it (else
    it refuses), the run's dvc.lock entries of the other stages (`locked`), inputs pulled from the DVC remote,
    outputs and run cache pushed back when it finishes."""
    root = project_root()
    resolved = resolve(root / "pipelines.yaml")
    if config_hash(resolved.get(pipeline, {})) != pipeline_hash:
        raise ConfigError(str(root / "pipelines.yaml"), "this worker's project differs from the run's (update "
                                                        "its checkout)", pipeline, stage)
    from flows.run_lock import run_lock

    os.chdir(root)
    tracking_uri_default(root)
    with run_lock(root, pipeline, on_behalf_of=int(env.get(RUN_PID_ENV, 0))):
        dvc.ensure_repo(root)
        dvc.sync(root, resolved)
        dvc.write_lock_entries(root, pipeline, locked)
        return reproduce_here(root, pipeline, stage, resolved[pipeline][stage], force, env, push=True)


@flow(name=f"{PIPELINE_FLOW}-deployment", log_prints=True)
def deployed_pipeline(pipeline: str, stage: str | None = None, downstream: bool = False,
                      force: bool = False) -> dict[str, str]:
    """A pipeline run started from its deployment (`rl4llm deploy`), in the worker's clone of the project."""
    root = project_root()
    resolved = resolve(root / "pipelines.yaml")
    specs = resolved[pipeline]
    return run_pipeline(root, resolved, pipeline, select_stages(list(specs), input_graph(specs), stage, downstream),
                        force)


