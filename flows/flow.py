"""The Prefect flows: one task per stage, in pipeline order; each asks DVC to reproduce its stage, here or, for a
stage that names a `work_pool`, as its own flow run on a worker of that pool.

A pooled stage whose accelerate config spans M > 1 machines runs as M flow runs at once: machine 0's stage flow run
on the stage's pool, which publishes as any pooled stage does, and a rank flow run for each machine r = 1..M-1 on
pool `<pool>-rank<r>`, whose workers hold their machine's rank in RL4LLM_MACHINE_RANK (`infra/team/worker.sh
<pool>-rank<r>` sets it): the rank is fixed per machine by its worker, never by a parameter an idle worker could
pick up.

Prefect owns ordering, retries, logs and the UI; task caching is off because DVC alone decides staleness. The flow
opens the MLflow parent run and hands its id to the stages through the environment. With a DVC remote, outputs
move between machines through it: a worker pulls its stage's inputs and pushes its outputs and run cache, and the
run restores them here from the remote (DVC's run cache) instead of running the stage again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc
from flows.config import Resolved, RunSettings, resolve
from flows.errors import ConfigError, DvcError, StageFailed
from flows.preflight import tracking_uri_default
from flows.reproduce import project_root, reproduce_here, run_stages
from flows.run_lock import run_lock
from stages.processes import RUN_PID_ENV, Interrupted, interrupt_signal, run_child
from stages.runner import EXIT_BAD_INPUT, MACHINE_RANK_ENV
from stages.spec import ResolvedStage, digest

PIPELINE_FLOW = "rl4llm-pipeline"
STAGE_FLOW = "rl4llm-stage"
RANK_FLOW = "rl4llm-stage-rank"  # machine r > 0's share of a stage that spans machines
RANK_GRACE_S = 120.0  # how long rank runs may outlive machine 0's completed run (which DVC may have restored alone)
POLL_S = 2.0  # how often a multi-machine stage's flow runs are checked
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
    back here through the DVC remote (restored from the run cache the worker pushed). A stage spanning machines
    runs on all of them at once (`run_on_machines`)."""
    from prefect.deployments import run_deployment

    project, on_line = Path(root), stream(f"{pipeline}/{stage}")
    state = dvc.status(project, pipeline, {stage: spec})[stage]
    if not force and (state == "up to date" or state.startswith("not pulled")):  # nothing to run: DVC restores
        return reproduce_here(project, pipeline, stage, spec, False, env, push, on_line)
    locked = {s: entry for s, entry in dvc.lock_entries(project, pipeline).items() if s != stage}
    parameters = {"pipeline": pipeline, "stage": stage, "force": force, "env": env, "pipeline_hash": pipeline_hash,
                  "locked": locked}
    machines = num_machines(project, spec)
    if machines == 1:
        flow_run = run_deployment(f"{STAGE_FLOW}/{dvc.dvc_name(pipeline, stage)}", parameters=parameters,
                                  timeout=None)
        if not flow_run.state.is_completed():
            raise RuntimeError(f"{pipeline}/{stage}: flow run '{flow_run.name}' on work pool '{work_pool}' ended "
                               f"{flow_run.state.name}: {flow_run.state.message or 'see its logs in Prefect'}")
    else:
        run_on_machines(pipeline, stage, parameters, machines, work_pool, on_line)
    return reproduce_here(project, pipeline, stage, spec, False, env, push, on_line)


def num_machines(root: Path, spec: ResolvedStage) -> int:
    """How many machines the stage's accelerate config spans (its `num_machines`, default 1)."""
    return int((yaml.safe_load((root / spec.accelerate_config).read_text()) or {}).get("num_machines", 1))


def rank_pool(pool: str, rank: int) -> str:
    """The work pool of machine `rank` (> 0) of a stage on `pool`: its workers run with that machine rank."""
    return f"{pool}-rank{rank}"


def rank_deployment(pipeline: str, stage: str, rank: int) -> str:
    return f"{dvc.dvc_name(pipeline, stage)}.rank{rank}"


def run_on_machines(pipeline: str, stage: str, parameters: dict[str, Any], machines: int, pool: str,
                    on_line: Callable[[str], None]) -> None:
    """Start machine 0's stage flow run and every other machine's rank flow run without waiting (they meet at the
    accelerate rendezvous), then wait for all of them. One that fails cancels the others (they would wait for it at
    the rendezvous) and fails the stage; rank runs still going RANK_GRACE_S after machine 0's completed (which
    happens when DVC restored its outputs without training) are cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    ranked = {key: parameters[key] for key in ("pipeline", "stage", "env", "pipeline_hash", "locked")}
    started = {0: (f"{STAGE_FLOW}/{dvc.dvc_name(pipeline, stage)}", parameters),
               **{rank: (f"{RANK_FLOW}/{rank_deployment(pipeline, stage, rank)}", {**ranked, "rank": rank})
                  for rank in range(1, machines)}}
    runs: dict[int, Any] = {}
    with get_client(sync_client=True) as client:
        try:
            for rank, (name, arguments) in started.items():
                try:
                    runs[rank] = run_deployment(name, parameters=arguments, timeout=0)
                except ObjectNotFound:
                    raise RuntimeError(f"{pipeline}/{stage}: no deployment {name} (the stage spans {machines} "
                                       f"machines): run `rl4llm deploy {pipeline}`") from None
            on_line(f"{pipeline}/{stage}: {machines} machines: flow run '{runs[0].name}' on work pool '{pool}', "
                    + ", ".join(f"'{runs[r].name}' on '{rank_pool(pool, r)}'" for r in range(1, machines)))
            wait_for_machines(client, runs, pool, f"{pipeline}/{stage}", on_line)
        except BaseException:  # a machine left alone would wait for the others at the rendezvous
            cancel_unfinished(client, runs)
            raise


def wait_for_machines(client: Any, runs: dict[int, Any], pool: str, label: str,
                      on_line: Callable[[str], None]) -> None:
    """Poll the machines' flow runs until all completed (returns) or one ended otherwise (raises)."""
    machine_0_done: float | None = None
    while True:
        states = {rank: client.read_flow_run(run.id).state for rank, run in runs.items()}
        ended = [rank for rank, state in states.items() if state.is_final() and not state.is_completed()]
        if ended:
            rank = ended[0]
            where = pool if rank == 0 else rank_pool(pool, rank)
            raise RuntimeError(f"{label}: machine {rank}'s flow run '{runs[rank].name}' on work pool '{where}' ended "
                               f"{states[rank].name}: {states[rank].message or 'see its logs in Prefect'}")
        if all(state.is_completed() for state in states.values()):
            return
        if states[0].is_completed():
            machine_0_done = machine_0_done or time.monotonic()
            if time.monotonic() - machine_0_done > RANK_GRACE_S:
                on_line(f"{label}: machine 0 completed; cancelling the machines still waiting (its outputs were "
                        "restored without training)")
                cancel_unfinished(client, runs)
                return
        time.sleep(POLL_S)


def cancel_unfinished(client: Any, runs: dict[int, Any]) -> None:
    """Cancel the flow runs not yet ended: at once those no worker started, through their worker the others."""
    from prefect.states import Cancelled, Cancelling

    for run in runs.values():
        state = client.read_flow_run(run.id).state
        if not state.is_final():
            client.set_flow_run_state(run.id, Cancelling() if state.is_running() else Cancelled(), force=True)


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
    resolved = checked_project(root, pipeline, stage, pipeline_hash)
    with run_here(root, pipeline, resolved, env, locked):
        return reproduce_here(root, pipeline, stage, resolved.stages[pipeline][stage], force, env, True,
                              stream(f"{pipeline}/{stage}"))


@contextmanager
def run_here(root: Path, pipeline: str, resolved: Resolved, env: dict[str, str],
             locked: dict[str, dict[str, Any]]) -> Iterator[None]:
    """This worker's clone, made the run's for the duration: the working directory and tracking store, the
    pipeline's run lock (on behalf of the run), dvc.yaml synced and the run's dvc.lock entries (`locked`) written."""
    os.chdir(root)
    tracking_uri_default(root)
    with run_lock(root, pipeline, on_behalf_of=int(env.get(RUN_PID_ENV, 0))):
        dvc.ensure_repo(root)
        dvc.sync(root, resolved.stages)
        dvc.write_lock_entries(root, pipeline, locked)
        yield


def checked_project(root: Path, pipeline: str, stage: str, pipeline_hash: str) -> Resolved:
    """This worker's project resolved, refused unless its pipeline is the one the run sent (`pipeline_hash`)."""
    resolved = resolve(root / "pipelines.yaml")
    if digest(resolved.stages.get(pipeline, {})) != pipeline_hash:
        raise ConfigError(str(root / "pipelines.yaml"), "this worker's project differs from the run's (update "
                                                        "its checkout)", pipeline, stage)
    return resolved


@flow(name=RANK_FLOW, log_prints=True)
def rank_flow(pipeline: str, stage: str, rank: int, env: dict[str, str], pipeline_hash: str,
              locked: dict[str, dict[str, Any]]) -> str:
    """Machine `rank`'s share of a stage that spans machines, on a worker whose RL4LLM_MACHINE_RANK is `rank` (else
    it refuses), in its clone: the same pipelines.yaml and dvc.lock entries as the stage flow, the stage's inputs
    pulled from the DVC remote, then `rl4llm stage`, whose processes join machine 0's. No `dvc repro` and no push:
    machine 0 publishes, records and pushes the outputs."""
    root = project_root()
    resolved = checked_project(root, pipeline, stage, pipeline_hash)
    label = f"{pipeline}/{stage}"
    if os.environ.get(MACHINE_RANK_ENV) != str(rank):
        raise ConfigError(str(root / "pipelines.yaml"), f"this worker's {MACHINE_RANK_ENV} is "
                          f"{os.environ.get(MACHINE_RANK_ENV)!r}, not {rank}: a worker of a rank's pool runs with "
                          f"that rank (`infra/team/worker.sh <pool>-rank{rank}`)", pipeline, stage)
    with run_here(root, pipeline, resolved, env, locked):
        upstream = upstream_stages(resolved.stages[pipeline], stage, locked)
        if upstream and dvc.default_remote(root):
            dvc.pull(root, pipeline, upstream)
        causes: list[str] = []  # the stage's `error: …` lines (runner.main prints one, naming its full log)
        shown = stream(label)

        def on_line(line: str) -> None:
            causes.extend([line] if line.startswith("error: ") else [])
            shown(line)

        code, received, _peak = run_child(["rl4llm", "stage", pipeline, stage], new_group=True, cwd=root,
                                          on_line=on_line, env={**os.environ, **env})
    if received is not None:
        raise Interrupted(received, f"{label}: machine {rank} stopped by {signal.Signals(received).name}")
    if code:
        raise StageFailed(code, f"{causes[-1] if causes else f'error: {label} failed with exit code {code}'} "
                                f"(on machine {rank}, in {root})")
    return f"machine {rank} of {label} done"


def upstream_stages(specs: dict[str, ResolvedStage], stage: str, locked: dict[str, dict[str, Any]]) -> list[str]:
    """The stages with an entry in `locked` whose outputs `stage` reads."""
    paths = [i.path for i in specs[stage].inputs.values()]
    return [other for other, spec in specs.items() if other != stage and other in locked and any(
        path == spec.output_dir or path.startswith(f"{spec.output_dir}/") for path in paths)]
