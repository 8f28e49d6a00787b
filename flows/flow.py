"""The Prefect flows: one task per stage, in pipeline order; each asks DVC to reproduce its stage, here or, for a
stage that names a `work_pool`, as its own flow run on a worker of that pool.

Prefect owns ordering, retries, logs and the UI; task caching is off because DVC alone decides staleness. The flow
opens the MLflow parent run and hands its id to the stages through the environment. With a DVC remote, outputs
move between machines through it: a worker pulls its stage's inputs and pushes its outputs and run cache, and the
run restores them here from the remote (DVC's run cache) instead of running the stage again.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc
from flows.config import RunSettings, resolve
from flows.errors import ConfigError, DvcError, StageFailed
from flows.preflight import tracking_uri_default
from flows.reproduce import project_root, reproduce_here, run_stages
from flows.run_lock import run_lock
from stages.processes import RUN_PID_ENV, Interrupted, interrupt_signal
from stages.runner import EXIT_BAD_INPUT
from stages.spec import ResolvedStage, digest

PIPELINE_FLOW = "rl4llm-pipeline"
STAGE_FLOW = "rl4llm-stage"
STAGE_OUTPUT = logging.getLogger("rl4llm.stage")  # a stage's own output lines, sent to the Prefect API
EXPLAINED = (StageFailed, DvcError, ConfigError, Interrupted)  # failures whose message is their whole story


def stream(label: str) -> Callable[[str], None]:
    """Where the lines of stage `label`'s output go: prefixed `[label]` (unless the stage did), to the terminal and
    to the Prefect logs of the task."""
    return lambda line: _stream(line if line.startswith(f"[{label}]") else f"[{label}] {line}")


def _stream(line: str) -> None:
    sys.stderr.write(line + "\n")  # not print: the flow's log_prints would log it a second time
    sys.stderr.flush()
    if not STAGE_OUTPUT.handlers:
        from prefect.logging.handlers import APILogHandler

        STAGE_OUTPUT.addHandler(APILogHandler())
        STAGE_OUTPUT.setLevel(logging.INFO)
        STAGE_OUTPUT.propagate = False  # the terminal already has the line
    STAGE_OUTPUT.info(line)


def _without_traceback(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task or flow with the traceback of its exception: for a failure that explains itself
    in one line (a stage's cause, an interrupt), that line is enough."""
    if record.exc_info and isinstance(record.exc_info[1], EXPLAINED):
        record.exc_info = record.exc_text = None
    return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_without_traceback)


@task(cache_policy=NO_CACHE)
def reproduce_stage(root: str, pipeline: str, stage: str, spec: ResolvedStage, force: bool, env: dict[str, str],
                    push: bool) -> str:
    """The stage in this process's project (see `reproduce_here`)."""
    return reproduce_here(Path(root), pipeline, stage, spec, force, env, push, stream(f"{pipeline}/{stage}"))


@task(cache_policy=NO_CACHE)
def dispatch_stage(root: str, pipeline: str, stage: str, spec: ResolvedStage, force: bool, env: dict[str, str],
                   push: bool, work_pool: str, pipeline_hash: str) -> str:
    """The stage as a flow run of its deployment on a worker of `work_pool`, unless DVC finds it up to date here
    (or only not pulled).
    The worker gets this run's dvc.lock entries of the other stages (so it can pull its inputs); its outputs come
    back here through the DVC remote (restored from the run cache the worker pushed)."""
    from prefect.deployments import run_deployment

    project, on_line = Path(root), stream(f"{pipeline}/{stage}")
    state = dvc.status(project, pipeline, {stage: spec})[stage]
    if not force and (state == "up to date" or state.startswith("not pulled")):  # nothing to run: DVC restores
        return reproduce_here(project, pipeline, stage, spec, False, env, push, on_line)
    locked = {s: entry for s, entry in dvc.lock_entries(project, pipeline).items() if s != stage}
    name = f"{STAGE_FLOW}/{dvc.dvc_name(pipeline, stage)}"
    flow_run = run_deployment(name, parameters={"pipeline": pipeline, "stage": stage, "force": force, "env": env,
                                                "pipeline_hash": pipeline_hash, "locked": locked}, timeout=None)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"{pipeline}/{stage}: flow run '{flow_run.name}' on work pool '{work_pool}' ended "
                           f"{flow_run.state.name}: {flow_run.state.message or 'see its logs in Prefect'}")
    return reproduce_here(project, pipeline, stage, spec, False, env, push, on_line)


@flow(name=PIPELINE_FLOW, log_prints=True)
def pipeline_flow(root: str, pipeline: str, specs: dict[str, ResolvedStage], stages_to_run: list[str],
                  force: bool, settings: RunSettings) -> dict[str, str]:
    """Reproduce `stages_to_run` of `pipeline` in order, one task each (on its work pool, if it names one).
    Returns {stage: 'ran' | 'restored' | 'skipped'}."""
    push = settings.push  # run_pipeline refused it without a remote
    pipeline_hash = digest(specs)

    def reproduce(stage: str, env: dict[str, str]) -> str:
        chosen = settings.stages[stage]
        options = dict(name=f"{pipeline}.{stage}", retries=chosen.retries,
                       retry_delay_seconds=chosen.retry_delay_seconds, retry_condition_fn=_worth_retrying)
        if chosen.work_pool:
            return dispatch_stage.with_options(**options)(root, pipeline, stage, specs[stage], force, env, push,
                                                          chosen.work_pool, pipeline_hash)
        return reproduce_stage.with_options(**options)(root, pipeline, stage, specs[stage], force, env, push)

    return run_stages(Path(root), pipeline, specs, stages_to_run, settings, reproduce, get_run_logger().info)


def _worth_retrying(_task, _task_run, state) -> bool:
    """Retry failures, not interrupts or bad input (those would fail the same way again)."""
    try:
        state.result()
    except ConfigError:
        return False
    except StageFailed as error:
        return error.code != EXIT_BAD_INPUT
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
    if digest(resolved.stages.get(pipeline, {})) != pipeline_hash:
        raise ConfigError(str(root / "pipelines.yaml"), "this worker's project differs from the run's (update "
                                                        "its checkout)", pipeline, stage)
    os.chdir(root)
    tracking_uri_default(root)
    with run_lock(root, pipeline, on_behalf_of=int(env.get(RUN_PID_ENV, 0))):
        dvc.ensure_repo(root)
        dvc.sync(root, resolved.stages)
        dvc.write_lock_entries(root, pipeline, locked)
        return reproduce_here(root, pipeline, stage, resolved.stages[pipeline][stage], force, env, True,
                              stream(f"{pipeline}/{stage}"))
