"""`rl4llm run` of one pipeline: the project's run lock, dvc.yaml and params.yaml brought in sync, the tracking
server checked, then each stale stage reproduced by DVC in pipeline order inside the pipeline's MLflow parent run.

Prefect (flows/flow.py) runs the stages when any is stale; a run with every stage up to date records them without
starting Prefect at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from flows import dvc
from flows.config import ConfigError, config_hash, run_settings
from flows.seeds import pipeline_seed
from stages.checkpoint import STATE_DIR
from stages.processes import RUN_PID_ENV
from stages.runner import FRESH_ENV
from stages.tracking import EXPERIMENT_ENV, PARENT_RUN_ENV

PROJECT_ENV = "RL4LLM_PROJECT"  # on a worker: its clone of the project (default: the flow run's directory)
STAGE_OUTPUT = logging.getLogger("rl4llm.stage")  # a stage's own output lines, sent to the Prefect API


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


def reproduce_here(root: Path, pipeline: str, stage: str, spec: dict[str, Any], force: bool, env: dict[str, str],
                   push: bool) -> str:
    """`dvc repro` of one stage here, then push it if asked. Returns 'ran', 'restored' (outputs were missing and
    DVC brought them from the remote or its run cache) or 'skipped' (up to date)."""
    present = dvc.outputs_present(root, spec)
    dvc.repro(root, pipeline, stage, force, env, on_line=stream(f"{pipeline}/{stage}"))
    if push:
        dvc.push(root, pipeline, stage)
    if tracking().stage_run(env[PARENT_RUN_ENV], stage):
        return "ran"
    return "skipped" if present else "restored"


def run_stages(root: Path, pipeline: str, specs: dict[str, dict[str, Any]], stages_to_run: list[str],
               settings: dict[str, Any], reproduce: Callable[[str, dict[str, str]], str],
               log: Callable[[str], None]) -> dict[str, str]:
    """The pipeline's MLflow parent run around `reproduce(stage, env)` of each stage in order: each stage's lineage
    recorded, the final policy registered; the parent run ends KILLED or FAILED if a stage is interrupted or fails.
    Returns {stage: outcome}."""
    track = tracking()
    parent = track.start_parent_run(root, pipeline, config_hash(specs), settings.get("run_tags", {}))
    env = {PARENT_RUN_ENV: parent, RUN_PID_ENV: str(os.getpid())}
    outcome: dict[str, str] = {}
    run_ids: dict[str, str] = {}
    try:
        for stage in stages_to_run:
            outcome[stage] = reproduce(stage, env)
            run_ids[stage] = track.record_stage(root, parent, pipeline, stage, specs[stage], outcome[stage])
            log(f"{pipeline}.{stage}: {outcome[stage]}")
        final = settings["final_policy"]
        if final in run_ids:
            track.register_policy(root, parent, pipeline, final, specs[final], run_ids[final])
    except BaseException as error:
        track.end_parent_run(pipeline, parent, track.end_status(error))
        raise
    track.end_parent_run(pipeline, parent)
    ran = [s for s, o in outcome.items() if o == "ran"]
    log(f"{pipeline}: " + (f"ran {', '.join(ran)}" if ran else f"all {len(outcome)} stages up to date, nothing ran"))
    return outcome


def run_pipeline(root: Path, resolved: dict, pipeline: str, stages_to_run: list[str], force: bool = False,
                 fresh: bool = False, push: bool | None = None, config_file: str = "pipelines.yaml",
                 seed_of: str | None = None) -> dict[str, str]:
    """What `rl4llm run` does once the command line is read: take the project's run lock, generate dvc.yaml and
    params.yaml, check the tracking server, then run the pipeline flow (on the configured Prefect API, else a
    temporary server) — or, when DVC finds every stage up to date, record that without Prefect. `seed_of`: the
    pipeline whose seed variant `pipeline` is (flows/seeds.py)."""
    from flows.prefect_server import prefect_api
    from flows.preflight import check_tracking_server, may_hold_running_runs, tracking_uri_default
    from flows.run_lock import run_lock
    from stages.warm import warm_stages

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
        tracking_uri_default(root)
        check_tracking_server(os.environ["MLFLOW_TRACKING_URI"])
        pools = {settings["stages"][s]["work_pool"] for s in stages_to_run} - {None}
        if (settings["push"] or pools) and not dvc.default_remote(root):
            raise ConfigError(config_file, "pushing outputs and running stages on work pools need a default DVC "
                                           "remote (`dvc remote add -d <name> <url>`)", pipeline,
                              key="push" if settings["push"] else "work_pool")
        if fresh:
            os.environ[FRESH_ENV] = "1"
        states = dvc.status(root, pipeline, {s: specs[s] for s in stages_to_run})
        recorded = RecordedState(root, pipeline, stages_to_run, settings)
        nothing_stale = not force and all(state == "up to date" for state in states.values())
        if nothing_stale and not settings["push"] and recorded.unchanged():  # seen and recorded already: nothing to do
            return dict.fromkeys(stages_to_run, "skipped")
        if may_hold_running_runs(os.environ["MLFLOW_TRACKING_URI"]):
            tracking().fail_orphaned_runs()
        if nothing_stale:  # no Prefect server needed

            def skip(stage: str, _env: dict[str, str]) -> str:
                if settings["push"]:
                    dvc.push(root, pipeline, stage)
                return "skipped"

            outcome = run_stages(root, pipeline, specs, stages_to_run, settings, skip, lambda _message: None)
        else:
            with warm_stages(), prefect_api():  # the warm process loads while the Prefect server starts
                from flows.flow import pipeline_flow

                outcome = pipeline_flow(str(root), pipeline, specs, stages_to_run, force, settings)
        recorded.save()
        return outcome


class RecordedState:
    """What the last recorded run of a pipeline's stages saw: their dvc.lock entries, the run settings and the
    tracking store (its URI; for a local sqlite store also the database file's inode, so a store deleted or
    replaced is recorded into again), hashed (`.rl4llm/recorded/<pipeline>.json`). A run that finds every stage up
    to date and this unchanged has nothing to record, so it needs neither Prefect nor MLflow."""

    def __init__(self, root: Path, pipeline: str, stages: list[str], settings: dict[str, Any]):
        self.path = root / STATE_DIR / "recorded" / f"{pipeline}.json"
        self.root, self.pipeline, self.stages, self.settings = root, pipeline, stages, settings

    def digest(self) -> str:
        locked = dvc.lock_entries(self.root, self.pipeline)
        settings = {k: v for k, v in self.settings.items() if k != "push"}  # a push is done, or asked for again
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        seen = {"lock": {s: locked.get(s) for s in self.stages}, "settings": settings, "tracking": uri,
                "experiment": os.environ.get(EXPERIMENT_ENV),
                "database": database.stat().st_ino if database and database.exists() else None}
        return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()

    def unchanged(self) -> bool:
        return self.path.exists() and self.path.read_text() == self.digest()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dvc.write_atomically(self.path, self.digest())


def tracking() -> ModuleType:
    """flows.tracking, loaded when a run has something to record (MLflow takes seconds to load)."""
    from flows import tracking

    return tracking


def project_root() -> Path:
    """Where this process's project is: RL4LLM_PROJECT (a worker's clone), else the working directory."""
    return Path(os.environ.get(PROJECT_ENV) or os.getcwd()).resolve()
