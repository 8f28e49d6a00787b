"""`rl4llm stage <pipeline> <stage>`: run one stage from its resolved spec in params.yaml.

This is the command DVC runs. It behaves the same by hand: it reads only files (params.yaml and its inputs), writes
only `artifacts/<pipeline>/<stage>/` and the stage's checkpoint area, and logs one MLflow run. When the pipeline's
accelerate config asks for more than one process it re-launches itself under `accelerate launch`.

Crash safety: the stage writes into `artifacts/<pipeline>/.<stage>.partial/` and renames it into place only once it
has finished, so a killed stage never leaves an output that looks complete; a training loop resumes from its last
checkpoint (`stages/loop.py`); SIGINT / SIGTERM stop it after a checkpoint (exit 130 / 143, MLflow run KILLED); a
non-finite loss, gradient or reward stops it (exit 1, run FAILED); bad input exits 2. Each failure prints one line
of cause; the full traceback goes to `.rl4llm/logs/<pipeline>.<stage>.log` (where `rl4llm run` also keeps the
stage's output). `rl4llm stage` waits on the stage's process (`supervise`): a stage the kernel kills (SIGKILL, e.g.
the OOM killer) gets a line too, with its peak RSS and whether the OOM killer struck, and the command ends by the
same signal.

Several machines: an accelerate config with `num_machines` > 1 is the same file on every machine (a DVC dependency
of the stage); each machine runs `rl4llm stage` in its own checkout with its rank in RL4LLM_MACHINE_RANK (and, if it
reaches machine 0 by another address or port, RL4LLM_MAIN_PROCESS_IP / RL4LLM_MAIN_PROCESS_PORT). Machine 0 holds
the global main process: it alone publishes the outputs and metrics.json and logs to MLflow; a machine of rank > 0
runs its ranks and touches no output.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from stages.checkpoint import STATE_DIR, checkpoint_dir, input_hashes, remove, resumable, stage_checkpoints, tree_hash
from stages.paths import ARTIFACTS, claim, output_dir, within
from stages.processes import (Interrupted, die_with_run, end_by, install_stop_handlers, memory_limit, oom_kills,
                              run_child, torch_threads)
from stages.spec import ResolvedStage

PARAMS_FILE = "params.yaml"
FRESH_ENV = "RL4LLM_FRESH"  # set by `rl4llm run --fresh`: ignore (and remove) the stage's checkpoints
METRICS_FILE = "metrics.json"
EXIT_BAD_INPUT = 2
STOPS = (signal.SIGINT, signal.SIGTERM)  # a stage stops on these after a checkpoint, exiting 128 + the signal
CHILD = "import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); from stages.runner import main; main()"
MACHINE_RANK_ENV = "RL4LLM_MACHINE_RANK"  # this machine's rank in a multi-machine accelerate config (default 0)
MAIN_IP_ENV = "RL4LLM_MAIN_PROCESS_IP"  # overrides the config's main_process_ip on this machine
MAIN_PORT_ENV = "RL4LLM_MAIN_PROCESS_PORT"  # overrides the config's main_process_port on this machine


def log_file(pipeline: str, stage: str) -> Path:
    """The stage's log: its output under `rl4llm run`, and the traceback of its failure."""
    return Path(STATE_DIR) / "logs" / f"{pipeline}.{stage}.log"


class InputChanged(ValueError):
    """An input's contents changed while the stage ran: its outputs would not match what dvc.lock records."""


def load_spec(pipeline: str, stage: str, params_file: str = PARAMS_FILE) -> ResolvedStage:
    """The stage's resolved spec, as `rl4llm sync` wrote it into params.yaml (a hand-edit that breaks it is named)."""
    resolved = yaml.safe_load(Path(params_file).read_text()) or {}
    try:
        raw = resolved[pipeline][stage]
    except (KeyError, TypeError):
        raise ValueError(f"{params_file}: no stage '{stage}' in pipeline '{pipeline}' "
                         f"(run `rl4llm sync` after editing pipelines.yaml)") from None
    try:
        return ResolvedStage.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{params_file}: {pipeline}.{stage}: not a resolved spec ({e.errors()[0]['msg']} at "
                         f"{'.'.join(map(str, e.errors()[0]['loc']))}); run `rl4llm sync`") from None


def owned_output_dir(root: Path, pipeline: str, stage: str, spec: ResolvedStage, params_file: str) -> Path:
    """The stage's output directory, `artifacts/<pipeline>/<stage>` of this project, checked on the normalised
    paths (a hand-edited params.yaml must not make a stage delete or write anywhere else; `stages.paths` guards
    against symbolic links on the way)."""
    expected = within(root, output_dir(pipeline, stage))
    outputs = [within(root, p) for p in spec.outputs.values()]
    if within(root, spec.output_dir) != expected or not all(
            p.is_relative_to(expected) and p != expected for p in outputs):
        raise ValueError(f"{params_file}: {pipeline}.{stage}: output_dir and outputs must lie in "
                         f"{ARTIFACTS}/{pipeline}/{stage}/ (got {spec.output_dir}, {list(spec.outputs.values())})")
    return expected


def check_inputs_unchanged(root: Path, label: str, spec: ResolvedStage, read: dict[str, str]) -> None:
    """Refuse to publish when an input differs from what the stage read at its start (`read`): DVC would record the
    new contents in dvc.lock, for outputs made from the old."""
    now = input_hashes(root, spec)
    changed = sorted(path for path in read.keys() | now.keys() if read.get(path) != now.get(path))
    if changed:
        raise InputChanged(f"{label}: input {', '.join(changed)} changed while the stage ran (it read the contents "
                           "of its start); nothing published: run the stage again")


def is_launched_worker() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def num_machines(spec: ResolvedStage) -> int:
    """How many machines the stage's accelerate config spans (`num_machines`, default 1)."""
    return int((yaml.safe_load(Path(spec.accelerate_config).read_text()) or {}).get("num_machines", 1))


def machine_rank(machines: int) -> int:
    """This machine's rank among `machines` (RL4LLM_MACHINE_RANK; 0 when unset or on one machine)."""
    value = os.environ.get(MACHINE_RANK_ENV, "0")
    if machines == 1:
        return 0
    if not value.isdigit() or int(value) >= machines:
        raise ValueError(f"{MACHINE_RANK_ENV}={value!r}: a machine rank must be an integer from 0 to {machines - 1} "
                         f"(the accelerate config spans {machines} machines)")
    return int(value)


def machine_args(machines: int) -> list[str]:
    """The per-machine `accelerate launch` options of a multi-machine config: this machine's rank and, if this
    machine overrides them, the main process's address and port."""
    if machines == 1:
        return []
    overrides = {"--main_process_ip": os.environ.get(MAIN_IP_ENV), "--main_process_port": os.environ.get(MAIN_PORT_ENV)}
    return ["--machine_rank", str(machine_rank(machines)),
            *[arg for option, value in overrides.items() if value for arg in (option, value)]]


def launch_distributed(pipeline: str, stage: str, spec: ResolvedStage, params_file: str, machines: int) -> None:
    """`accelerate launch` of this stage on N processes (this machine's share of them, on several machines); a
    signal we get is passed on, and its exit is ours."""
    cmd = ["accelerate", "launch", "--config_file", spec.accelerate_config, *machine_args(machines),
           "-m", "stages.runner", pipeline, stage, "--params-file", params_file]
    code, received, _peak = run_child(cmd)
    if received is not None:
        raise Interrupted(received, f"{pipeline}/{stage}: stopped by signal {received}")
    if code != 0:
        raise SystemExit(code)


def check_same_on_every_rank(accelerator: Any, label: str, key: str) -> None:
    """Refuse to train unless every rank read the same spec and inputs (`key`: their hash, the checkpoint key): on
    several machines each reads its own checkout's params.yaml and inputs, and one that synced or pulled something
    else would silently train on other data."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    keys = gather_object([key])
    differ = [rank for rank, other in enumerate(keys) if other != keys[0]]
    if differ:
        raise ValueError(f"{label}: rank(s) {', '.join(map(str, differ))} read another spec or other inputs than "
                         "rank 0 (on several machines: every checkout needs the same params.yaml and the same "
                         "inputs: `git pull`, `rl4llm sync`, `dvc pull`)")


def run_stage(pipeline: str, stage: str, params_file: str = PARAMS_FILE) -> dict[str, float]:
    spec = load_spec(pipeline, stage, params_file)
    root = Path.cwd()
    published = owned_output_dir(root, pipeline, stage, spec, params_file)
    staging = published.parent / f".{published.name}.partial"
    if not is_launched_worker():
        machines = num_machines(spec)
        rank = machine_rank(machines)  # machine 0 holds the global main process, which alone publishes
        for folder in (published, staging) if rank == 0 else ():  # before anything is written: no link on the way
            claim(root, folder)
        claim(root, stage_checkpoints(root, pipeline, stage), replaceable=False)
        if spec.num_processes > 1:
            launch_distributed(pipeline, stage, spec, params_file, machines)
            if rank > 0:
                print(f"{pipeline}/{stage}: machine {rank} of {machines} done; machine 0 publishes the outputs and "
                      "metrics", file=sys.stderr)
                return {}
            return json.loads((published / METRICS_FILE).read_text())
    read = input_hashes(root, spec) if os.environ.get("RANK", "0") == "0" else None  # the inputs as the stage reads
    install_stop_handlers()

    import datasets  # the training stack loads after the checks above
    import torch
    import transformers
    from accelerate.utils import set_seed

    from stages.context import StageContext
    from stages.distributed import build_accelerator
    from stages.kinds import get_kind
    from stages.loop import check_finite, fault_point
    from stages.tracking import StageRun

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", spec.num_processes))  # this machine's (torchrun sets it)
    torch.set_num_threads(torch_threads(local_processes))
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    accelerator = build_accelerator(spec.accelerate_config)
    set_seed(spec.seed)
    kind = get_kind(spec.kind)
    params = kind.params(**spec.params)
    checkpoints = checkpoint_dir(root, pipeline, stage, spec, read)
    check_same_on_every_rank(accelerator, f"{pipeline}/{stage}", checkpoints.name)
    if accelerator.is_main_process:
        if os.environ.get(FRESH_ENV):
            remove(stage_checkpoints(root, pipeline, stage))
        remove(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    tracker = StageRun(pipeline, stage, spec.kind, spec.params, is_main=accelerator.is_main_process)
    ctx = StageContext(
        pipeline=pipeline, stage=stage, seed=spec.seed, params=params, inputs=spec.inputs,
        outputs={name: staging / within(root, path).relative_to(published) for name, path in spec.outputs.items()},
        output_dir=staging, model=spec.model, accelerator=accelerator, tracker=tracker,
        checkpoint_dir=checkpoints, declared=kind.inputs,
    )
    try:
        metrics = kind.load_run()(ctx)
        check_finite(f"{ctx.label} final metrics", metrics)
        if accelerator.is_main_process:
            check_inputs_unchanged(root, ctx.label, spec, read)
    except Interrupted:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        ctx.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")
        fault_point("publish", 0)
        remove(claim(root, published))
        staging.rename(published)
        remove(stage_checkpoints(root, pipeline, stage))
        outputs = [Path(p) for p in spec.outputs.values()]
        tracker.finish(metrics, {"output_hash": tree_hash(outputs), "skipped": "false"})
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Run the stage; on failure print one line of cause and exit 130 / 143 (interrupted), 2 (bad input: a
    ValueError or a missing file) or 1. The traceback of a failure goes to `.rl4llm/logs/<pipeline>.<stage>.log`."""
    parser = argparse.ArgumentParser(prog="rl4llm stage", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    parser.add_argument("stage")
    parser.add_argument("--params-file", default=PARAMS_FILE)
    args = parser.parse_args(argv)
    die_with_run()  # DVC, the launcher or the run gone: stop at the next step boundary, with a checkpoint
    from stages.loop import NonFinite  # the training stack loads here, not where flows/ reads this module's names

    try:
        print(json.dumps(run_stage(args.pipeline, args.stage, args.params_file), sort_keys=True))
    except Interrupted as e:
        print(f"{e}; resume with `rl4llm run {args.pipeline}`", file=sys.stderr)
        sys.exit(128 + e.signum)
    except NonFinite as e:
        spec = load_spec(args.pipeline, args.stage, args.params_file)
        kept = resumable(checkpoint_dir(Path.cwd(), args.pipeline, args.stage, spec))
        print(f"error: {e}; nothing published" + (f", last good checkpoint: step {kept['step']}" if kept else ""),
              file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        log = log_file(args.pipeline, args.stage)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:  # after the output `rl4llm run` keeps there
            out.write(traceback.format_exc())
        bad_input = isinstance(e, (ValueError, FileNotFoundError))
        print(f"error: {args.pipeline}/{args.stage} {'bad input' if bad_input else 'failed'}: {type(e).__name__}: "
              f"{e} (full traceback: {log})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if bad_input else 1)


def supervise(pipeline: str, stage: str, params_file: str = PARAMS_FILE) -> NoReturn:
    """`rl4llm stage`: run the stage (`main`) in a child of the run's warm process, else in a child process with
    our import path, and end as it ended. A stage ended by a signal other than a stop (SIGKILL from the OOM
    killer or a `kill -9`, a crash) gets its one line of cause (`killed_cause`), and we end by the same signal."""
    from stages.warm import run_warm

    argv = [pipeline, stage, "--params-file", params_file]
    die_with_run()  # our parent gone: the stage stops at its next step boundary
    oom_before = oom_kills()
    warm = run_warm("stages.runner:main", argv)  # forked from the run's warm process, if it has one
    if warm is None:
        code, _received, peak = run_child([sys.executable, "-c", CHILD, json.dumps(sys.path), *argv])
    else:
        code, peak = warm
        if code - 128 in signal.valid_signals() and code - 128 not in STOPS:  # its report of a death by signal N
            code = 128 - code
    if code >= 0 or -code in STOPS:
        sys.exit(code)
    after = oom_kills()
    oom = None if oom_before is None or after is None else after - oom_before
    cause = killed_cause(f"{pipeline}/{stage}", -code, peak, oom, memory_limit(), batch_params(pipeline, stage,
                                                                                             params_file))
    print(cause, file=sys.stderr)
    end_by(-code)


def killed_cause(label: str, signum: int, peak_rss: int | None, oom_kills: int | None, limit: int | None,
                 batches: dict[str, Any]) -> str:
    """The one line for a stage killed by `signum`: with its peak RSS (None: not measured) out of `limit` bytes,
    and, for SIGKILL, whether the kernel's OOM killer struck while it ran (`oom_kills`: how many it killed
    meanwhile; None: unknown), with a smaller batch to try (`batches`: the stage's batch-size params)."""
    name = signal.Signals(signum).name
    memory = "peak RSS " + (f"{peak_rss / 1e9:.2f} GB" if peak_rss else "not measured") + \
        (f" (limit {limit / 1e9:.1f} GB)" if limit else "")
    smaller = ", ".join(f"{key} (now {value})" for key, value in batches.items())
    advice = f"try a smaller {smaller}" if smaller else "try smaller batches"
    if signum != signal.SIGKILL:
        return f"error: {label} killed by {name}; {memory}"
    if oom_kills is None:
        return f"error: {label} killed by SIGKILL — out of memory? {memory}; if so, {advice}"
    if oom_kills:
        return f"error: {label} killed by SIGKILL — out of memory (the kernel's OOM killer struck); {memory}; " \
            + advice
    return f"error: {label} killed by SIGKILL, not by the kernel's OOM killer (someone's kill -9?); {memory}"


def batch_params(pipeline: str, stage: str, params_file: str) -> dict[str, Any]:
    """The stage's params that set how many rows go through the model at once: its micro-batch, else every
    batch size ({} when params.yaml does not say)."""
    try:
        params = load_spec(pipeline, stage, params_file).params
    except (OSError, ValueError):
        return {}
    sizes = {key: value for key, value in params.items() if key.endswith("batch_size") and isinstance(value, int)}
    micro = {key: value for key, value in sizes.items() if "micro" in key}
    return micro or sizes


if __name__ == "__main__":
    main()
