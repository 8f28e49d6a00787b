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

from flows import dvc, tracking
from flows.config import ConfigError, config_hash, resolve, run_settings
from flows.seeds import pipeline_seed
from stages.processes import RUN_PID_ENV, interrupt_signal
from stages.runner import FRESH_ENV
from stages.tracking import PARENT_RUN_ENV

PIPELINE_FLOW = "rl4llm-pipeline"
STAGE_FLOW = "rl4llm-stage"
PROJECT_ENV = "RL4LLM_PROJECT"  # on a worker: its clone of the project (default: the flow run's directory)
STAGE_OUTPUT = logging.getLogger("rl4llm.stage")  # a stage's own output lines, sent to the Prefect API


def _stream(line: str) -> None:
    """One line of a stage's output: to the terminal as it was, and to the Prefect logs of the task."""
    sys.stderr.write(line + "\n")  # not print: the flow's log_prints would log it a second time
    sys.stderr.flush()
    if not STAGE_OUTPUT.handlers:
        from prefect.logging.handlers import APILogHandler

        STAGE_OUTPUT.addHandler(APILogHandler())
        STAGE_OUTPUT.setLevel(logging.INFO)
        STAGE_OUTPUT.propagate = False  # the terminal already has the line
    STAGE_OUTPUT.info(line)


def _reproduce(root: Path, pipeline: str, stage: str, spec: dict[str, Any], force: bool, env: dict[str, str],
               push: bool) -> str:
    """`dvc repro` of one stage here, then push it if asked. Returns 'ran', 'restored' (outputs were missing and
    DVC brought them from the remote or its run cache) or 'skipped' (up to date)."""
    present = dvc.outputs_present(root, spec)
    dvc.repro(root, pipeline, stage, force, env, on_line=_stream)
    if push:
        dvc.push(root, pipeline, stage)
    if tracking.stage_run(env[PARENT_RUN_ENV], stage):
        return "ran"
    return "skipped" if present else "restored"


@task(cache_policy=NO_CACHE)
def reproduce_stage(root: str, pipeline: str, stage: str, spec: dict[str, Any], force: bool, env: dict[str, str],
                    push: bool) -> str:
    """The stage in this process's project (see `_reproduce`)."""
    return _reproduce(Path(root), pipeline, stage, spec, force, env, push)


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
        return _reproduce(project, pipeline, stage, spec, False, env, push)
    locked = {s: entry for s, entry in dvc.lock_entries(project, pipeline).items() if s != stage}
    name = f"{STAGE_FLOW}/{dvc.dvc_name(pipeline, stage)}"
    flow_run = run_deployment(name, parameters={"pipeline": pipeline, "stage": stage, "force": force, "env": env,
                                                "pipeline_hash": pipeline_hash, "locked": locked}, timeout=None)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"{pipeline}/{stage}: flow run '{flow_run.name}' on work pool '{work_pool}' ended "
                           f"{flow_run.state.name}: {flow_run.state.message or 'see its logs in Prefect'}")
    return _reproduce(project, pipeline, stage, spec, False, env, push)


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


def run_stages(root: Path, pipeline: str, specs: dict[str, dict[str, Any]], stages_to_run: list[str],
               settings: dict[str, Any], reproduce: Callable[[str, dict[str, str]], str],
               log: Callable[[str], None]) -> dict[str, str]:
    """The pipeline's MLflow parent run around `reproduce(stage, env)` of each stage in order: each stage's lineage
    recorded, the final policy registered; the parent run ends KILLED or FAILED if a stage is interrupted or fails.
    Returns {stage: outcome}."""
    parent = tracking.start_parent_run(root, pipeline, config_hash(specs), settings.get("run_tags", {}))
    env = {PARENT_RUN_ENV: parent, RUN_PID_ENV: str(os.getpid())}
    outcome: dict[str, str] = {}
    run_ids: dict[str, str] = {}
    try:
        for stage in stages_to_run:
            outcome[stage] = reproduce(stage, env)
            run_ids[stage] = tracking.record_stage(root, parent, pipeline, stage, specs[stage], outcome[stage])
            log(f"{pipeline}.{stage}: {outcome[stage]}")
        final = settings["final_policy"]
        if final in run_ids:
            tracking.register_policy(root, parent, pipeline, final, specs[final], run_ids[final])
    except BaseException as error:
        tracking.end_parent_run(tracking.end_status(error))
        raise
    tracking.end_parent_run()
    ran = [s for s, o in outcome.items() if o == "ran"]
    log(f"{pipeline}: " + (f"ran {', '.join(ran)}" if ran else f"all {len(outcome)} stages up to date, nothing ran"))
    return outcome


def _worth_retrying(_task, _task_run, state) -> bool:
    """Retry failures, not interrupts or bad input (those would fail the same way again)."""
    try:
        state.result()
    except ConfigError:
        return False
    except BaseException as error:
        return interrupt_signal(error) is None
    return False


def run_pipeline(root: Path, resolved: dict, pipeline: str, stages_to_run: list[str], force: bool = False,
                 fresh: bool = False, push: bool | None = None, config_file: str = "pipelines.yaml",
                 seed_of: str | None = None) -> dict[str, str]:
    """What `rl4llm run` does once the command line is read: take the project's run lock, generate dvc.yaml and
    params.yaml, check the tracking server, then run the pipeline flow (on the configured Prefect API, else a
    temporary server) — or, when DVC finds every stage up to date, record that without Prefect. `seed_of`: the
    pipeline whose seed variant `pipeline` is (flows/seeds.py)."""
    from flows.prefect_server import prefect_api
    from flows.preflight import check_tracking_server
    from flows.run_lock import run_lock

    specs = resolved[pipeline]
    settings = run_settings(root / config_file)[seed_of or pipeline]
    seed = pipeline_seed(specs)
    settings["run_tags"] = ({} if seed is None else {"seed": str(seed)}) | ({"seed_of": seed_of} if seed_of else {})
    if push is not None:
        settings["push"] = push
    os.chdir(root)
    os.environ[RUN_PID_ENV] = str(os.getpid())
    with run_lock(root, pipeline):
        dvc.ensure_repo(root)
        dvc.sync(root, resolved)
        tracking.tracking_uri_default(root)
        check_tracking_server(os.environ["MLFLOW_TRACKING_URI"])
        tracking.fail_orphaned_runs()
        pools = {settings["stages"][s]["work_pool"] for s in stages_to_run} - {None}
        if (settings["push"] or pools) and not dvc.default_remote(root):
            raise ConfigError(config_file, "pushing outputs and running stages on work pools need a default DVC "
                                           "remote (`dvc remote add -d <name> <url>`)", pipeline,
                              key="push" if settings["push"] else "work_pool")
        if fresh:
            os.environ[FRESH_ENV] = "1"
        states = dvc.status(root, pipeline, {s: specs[s] for s in stages_to_run})
        if not force and all(state == "up to date" for state in states.values()):  # no Prefect server needed

            def skip(stage: str, _env: dict[str, str]) -> str:
                if settings["push"]:
                    dvc.push(root, pipeline, stage)
                return "skipped"

            return run_stages(root, pipeline, specs, stages_to_run, settings, skip, lambda _message: None)
        with prefect_api():
            return pipeline_flow(str(root), pipeline, specs, stages_to_run, force, settings)


def project_root() -> Path:
    """Where this process's project is: RL4LLM_PROJECT (a worker's clone), else the working directory."""
    return Path(os.environ.get(PROJECT_ENV) or os.getcwd()).resolve()


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
    tracking.tracking_uri_default(root)
    with run_lock(root, pipeline, on_behalf_of=int(env.get(RUN_PID_ENV, 0))):
        dvc.ensure_repo(root)
        dvc.sync(root, resolved)
        dvc.write_lock_entries(root, pipeline, locked)
        return _reproduce(root, pipeline, stage, resolved[pipeline][stage], force, env, push=True)


@flow(name=f"{PIPELINE_FLOW}-deployment", log_prints=True)
def deployed_pipeline(pipeline: str, stage: str | None = None, downstream: bool = False,
                      force: bool = False) -> dict[str, str]:
    """A pipeline run started from its deployment (`rl4llm deploy`), in the worker's clone of the project."""
    root = project_root()
    resolved = resolve(root / "pipelines.yaml")
    specs = resolved[pipeline]
    return run_pipeline(root, resolved, pipeline, select_stages(list(specs), input_graph(specs), stage, downstream),
                        force)


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
