"""The `rl4llm` command: validate, sync, run, pull, list, versions, restore, compare, deploy (flow side) and stage
(what DVC runs)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from flows.errors import ConfigError

if TYPE_CHECKING:  # the commands load what they need: `--help` and `validate` stay instant
    from flows.config import Resolved
    from stages.spec import ResolvedStage

EXIT_CONFIG = 2
EXIT_BUSY = 75  # EX_TEMPFAIL: the project is busy with another run; try again later


def _resolved(args) -> tuple[Path, Resolved]:
    from flows.config import resolve

    path = Path(args.config)
    resolved = resolve(path)
    return path.resolve().parent, resolved


def _pipeline(args, resolved: Resolved) -> dict[str, ResolvedStage]:
    from flows.schema import nearest

    if args.pipeline not in resolved.stages:
        raise ConfigError(args.config, f"no pipeline '{args.pipeline}'; {nearest(args.pipeline, resolved.stages)}")
    return resolved.stages[args.pipeline]


def cmd_validate(args) -> str:
    _, resolved = _resolved(args)
    n_stages = sum(len(s) for s in resolved.stages.values())
    return f"{args.config}: ok ({len(resolved.stages)} pipelines, {n_stages} stages)"


def cmd_sync(args) -> str:
    from flows import dvc
    from flows.run_lock import run_lock

    root, resolved = _resolved(args)
    with run_lock(root, "(sync)"):  # never under a running stage's feet
        changed = dvc.sync(root, resolved.stages)
    return "dvc.yaml and params.yaml " + ("updated" if changed else "already in sync")


def cmd_run(args) -> str:
    root, resolved = _resolved(args)
    specs = _pipeline(args, resolved)
    if args.stage:
        _stage(args, resolved)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry attempts
    from flows.config import input_graph, select_stages

    chosen = select_stages(list(specs), input_graph(specs), args.stage, args.downstream)
    if not args.seeds:
        return _run_one(args, root, resolved, args.pipeline, chosen, None)
    from flows.prefect_server import one_server
    from flows.seeds import add_seed_variants, parse_seeds

    seeds = add_seed_variants(resolved.stages, args.pipeline, parse_seeds(args.seeds, args.config), args.config)
    with one_server():
        for seed, pipeline in seeds.items():
            report = _run_one(args, root, resolved, pipeline, chosen, args.pipeline if pipeline != args.pipeline
                              else None)
            print(f"seed {seed}: {report}", flush=True)  # as each seed ends: a later one may fail
    return ""


def _run_one(args, root: Path, resolved: Resolved, pipeline: str, chosen: list[str], seed_of: str | None) -> str:
    from flows import dvc
    from flows.errors import DvcError, StageFailed
    from flows.run import run_pipeline
    from flows.run_lock import ProjectBusy

    try:
        outcome = run_pipeline(root, resolved, pipeline, chosen, args.force, args.fresh,
                               True if args.push else None, os.path.relpath(Path(args.config).resolve(), root),
                               seed_of)
    except Exception as error:  # a service died: done if every chosen stage is up to date
        if isinstance(error, (StageFailed, DvcError, subprocess.CalledProcessError, ConfigError, ProjectBusy)) \
                or not (root / ".dvc").exists():
            raise
        states = dvc.status(root, pipeline, resolved.stages[pipeline])
        if any(states[s] != "up to date" for s in chosen):
            raise
        print(f"warning: {type(error).__name__} after every stage had finished: {error}", file=sys.stderr)
        return f"{pipeline}: every stage finished; up to date: {', '.join(chosen)}"
    done = {kind: [s for s, o in outcome.items() if o == kind] for kind in ("ran", "restored", "skipped")}
    return (f"{pipeline}: " + (f"ran {', '.join(done['ran'])}; " if done["ran"] else "nothing ran; ")
            + (f"restored {', '.join(done['restored'])}; " if done["restored"] else "")
            + f"up to date: {', '.join(done['skipped']) or 'none'}")


def cmd_pull(args) -> str:
    from flows import dvc

    root, resolved = _resolved(args)
    specs = _pipeline(args, resolved)
    if args.stage:
        _stage(args, resolved)
    stages = [args.stage] if args.stage else list(specs)
    if dvc.default_remote(root) is None:
        raise ConfigError(args.config, "no default DVC remote to pull from (`dvc remote add -d <name> <url>`)",
                          args.pipeline)
    locked = [s for s in stages if s in dvc.lock_entries(root, args.pipeline)]
    if locked:
        from flows.run_lock import run_lock

        with run_lock(root, args.pipeline):  # a run holds DVC's lock: say who, not DVC's advice to delete it
            dvc.pull(root, args.pipeline, locked)
    missing = [s for s in stages if s not in locked]
    return (f"{args.pipeline}: pulled {', '.join(locked) or 'nothing'}"
            + (f"; never run (not in dvc.lock): {', '.join(missing)}" if missing else ""))


def cmd_versions(args) -> str:
    from flows import dvc
    from flows.preflight import tracking_uri_default
    from flows.versions import current_version, format_versions, stage_versions

    root, resolved = _resolved(args)
    _stage(args, resolved)
    dvc.read_lock(root)  # a garbled dvc.lock is named before MLflow loads
    tracking_uri_default(root)
    return format_versions(args.pipeline, args.stage, stage_versions(args.pipeline, args.stage),
                           current_version(root, args.pipeline, args.stage))


def cmd_restore(args) -> str:
    from flows import dvc
    from flows.preflight import tracking_uri_default
    from flows.run_lock import run_lock
    from flows.versions import restore

    root, resolved = _resolved(args)
    _stage(args, resolved)
    dvc.read_lock(root)  # a garbled dvc.lock is named before MLflow loads
    tracking_uri_default(root)
    with run_lock(root, args.pipeline):
        version = restore(root, args.pipeline, args.stage, args.version, args.config)
    return (f"{args.pipeline}/{args.stage}: restored version {version}; `rl4llm list {args.pipeline}` shows what is "
            "stale against it")


def cmd_deploy(args) -> str:
    from flows.deploy import deploy

    root, resolved = _resolved(args)
    _pipeline(args, resolved)
    names = deploy(args.pipeline, resolved.settings[args.pipeline], args.pool, args.source, args.config)
    return "deployments: " + ", ".join(names)


def _stage(args, resolved: Resolved) -> ResolvedStage:
    specs = _pipeline(args, resolved)
    if args.stage not in specs:
        from flows.schema import nearest

        raise ConfigError(args.config, f"no stage '{args.stage}'; {nearest(args.stage, specs)}", args.pipeline)
    return specs[args.stage]


def cmd_list(args) -> str:
    from flows import dvc
    from flows.config import input_graph
    from flows.preflight import may_hold_running_runs, tracking_uri_default
    from flows.run_lock import holder

    root, resolved = _resolved(args)
    busy = holder(root)  # a run holds DVC's repository lock too: read dvc.lock instead of asking DVC
    lines = [f"a run is in progress ({busy}); states as recorded in dvc.lock"] if busy else []
    if not busy:
        dvc.ensure_repo(root)
        dvc.sync(root, resolved.stages)
    tracking_uri_default(root)
    orphans = []
    if may_hold_running_runs(os.environ["MLFLOW_TRACKING_URI"]):  # else MLflow need not even load
        from flows import tracking

        orphans = tracking.fail_orphaned_runs()
    if orphans:
        lines.append(f"marked FAILED: {len(orphans)} MLflow run(s) left RUNNING by processes that are gone")
    for pipeline in [args.pipeline] if args.pipeline else list(resolved.stages):
        specs = _pipeline(argparse.Namespace(**{**vars(args), "pipeline": pipeline}), resolved)
        lines.append(pipeline)
        states = dvc.status(root, pipeline, specs, live=not busy)
        for stage, spec in specs.items():
            if states[stage] == "never run":
                states[stage] = _unpublished_state(root, pipeline, stage, spec, bool(busy))
        for stage, upstream in input_graph(specs).items():
            stale = sorted(u for u in upstream if states[u] != "up to date")
            if stale and states[stage] == "up to date":
                states[stage] = f"stale (upstream: {', '.join(stale)})"
            lines.append(f"  {stage:<24} {specs[stage].kind:<24} {states[stage]}")
    return "\n".join(lines)


def _unpublished_state(root: Path, pipeline: str, stage: str, spec: ResolvedStage, busy: bool) -> str:
    """A stage without a published output: running (a run is on and its staging directory exists), interrupted
    with a checkpoint to resume from (or only damaged ones), or never run."""
    from stages.checkpoint import checkpoint_dir, resumable, saved_checkpoints

    directory = checkpoint_dir(root, pipeline, stage, spec)
    saved = resumable(directory)
    at = f"step {saved['step']}/{saved['total']}" if saved else ""
    if busy and (root / spec.output_dir).with_name(f".{stage}.partial").exists():
        return "running" + (f" (checkpoint at {at})" if saved else "")
    if saved:
        return f"interrupted (resumes from {at})"
    return "interrupted (no intact checkpoint: starts fresh)" if saved_checkpoints(directory) else "never run"


def cmd_compare(args) -> str:
    from flows import compare, tracking
    from flows.preflight import tracking_uri_default

    root, resolved = _resolved(args)
    for name in args.pipelines:
        _pipeline(argparse.Namespace(**{**vars(args), "pipeline": name}), resolved)
    tracking_uri_default(root)
    rows = tracking.stage_metrics(args.pipelines, args.last)
    if not rows:
        return "no runs recorded yet for " + ", ".join(args.pipelines)
    chosen = args.metrics.split(",") if args.metrics else None
    charted = compare.plot(rows, chosen, tracking.stage_curves(rows, compare.RL_KINDS, compare.CURVES),
                           Path(args.out))
    report = compare.FORMATTERS[args.format](rows, chosen)
    return f"{report}\nchart: {args.out}" if charted and args.format in ("table", "markdown") else report


def _all_kinds(args) -> list[str]:
    """The built-in kinds, and the user's own that the pipelines file names (found from its directory)."""
    from flows.reference import user_kinds
    from flows.schema import load
    from stages.kinds import BUILT_IN_KINDS
    from stages.registry import use_project

    config = Path(args.config)
    if not config.exists():
        return list(BUILT_IN_KINDS)
    use_project(config.resolve().parent)
    return list(BUILT_IN_KINDS) + user_kinds(load(config))


def cmd_kinds(args) -> str:
    from flows.reference import describe_kind
    from flows.schema import nearest
    from stages.kinds import get_kind

    known = _all_kinds(args)
    if args.kind and args.kind not in known and ("." not in args.kind or ":" in args.kind):
        raise ConfigError(args.config, f"no stage kind '{args.kind}'; {nearest(args.kind, known)}")
    try:
        return "\n\n".join(describe_kind(get_kind(name)) for name in ([args.kind] if args.kind else known))
    except ValueError as e:  # a user's kind that does not load
        raise ConfigError(args.config, str(e)) from None


def cmd_schema(args) -> str:
    import json

    from flows.reference import pipelines_schema

    try:
        schema = pipelines_schema(_all_kinds(args))
    except ValueError as e:  # a user's kind that does not load
        raise ConfigError(args.config, str(e)) from None
    Path(args.out).write_text(json.dumps(schema, indent=1) + "\n")
    return (f"wrote {args.out}; point your editor at it, e.g. the first line of pipelines.yaml: "
            f"# yaml-language-server: $schema={args.out}")


def cmd_stage(args) -> NoReturn:
    from stages.runner import supervise

    supervise(args.pipeline, args.stage, args.params_file)  # the stage prints its metrics; we end as it ends


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rl4llm", description="Declarative LLM post-training pipelines.")
    top.add_argument("-c", "--config", default="pipelines.yaml", help="pipelines file (default: pipelines.yaml)")
    top.add_argument("--version", action="version", version=f"rl4llm {version()}")
    sub = top.add_subparsers(dest="command", required=True)
    config_after = argparse.ArgumentParser(add_help=False)  # `rl4llm run P -c FILE` as well as `rl4llm -c FILE run P`
    config_after.add_argument("-c", "--config", default=argparse.SUPPRESS, help="pipelines file")

    def command(name: str, fn, help: str, *positional: str) -> argparse.ArgumentParser:
        parsed = sub.add_parser(name, help=help, parents=[config_after])
        for argument in positional:
            parsed.add_argument(argument)
        parsed.set_defaults(fn=fn)
        return parsed

    command("validate", cmd_validate, "check pipelines.yaml without running anything")
    command("sync", cmd_sync, "regenerate dvc.yaml and params.yaml from pipelines.yaml")
    run = command("run", cmd_run, "run a pipeline (stages DVC finds up to date are skipped)", "pipeline")
    run.add_argument("--stage", help="run only this stage")
    run.add_argument("--downstream", action="store_true", help="with --stage: also the stages that depend on it")
    run.add_argument("--force", action="store_true", help="rerun even if up to date")
    run.add_argument("--fresh", action="store_true", help="ignore the checkpoints of interrupted stages")
    run.add_argument("--push", action="store_true", help="push each stage's outputs and run cache to the DVC remote")
    run.add_argument("--seeds", help="run the pipeline once per seed, e.g. 0,1,2 (compare shows mean ± sd)")
    pull = command("pull", cmd_pull, "fetch a pipeline's outputs (as dvc.lock names them) from the DVC remote",
                   "pipeline")
    pull.add_argument("--stage", help="only this stage")
    command("versions", cmd_versions, "a stage's versions, newest first, with what changed", "pipeline", "stage")
    restore = command("restore", cmd_restore, "put a stage version's outputs back (downstream stages become stale)",
                      "pipeline", "stage")
    restore.add_argument("version", help="a version from `rl4llm versions` (a unique prefix is enough)")
    deploy = command("deploy", cmd_deploy, "Prefect deployments of a pipeline and of its stages on work pools",
                     "pipeline")
    deploy.add_argument("--pool", help="work pool of the pipeline flow (default: the pipeline's defaults.work_pool)")
    deploy.add_argument("--source", help="where workers load the flows from (default: this package's directory)")
    command("list", cmd_list, "pipelines, stages and their status").add_argument("pipeline", nargs="?")
    compare = command("compare", cmd_compare, "stage metrics across the last runs, as a table and a PNG chart")
    compare.add_argument("pipelines", nargs="+")
    compare.add_argument("--last", type=int, default=3, help="runs per pipeline (default 3)")
    compare.add_argument("--metrics", help="comma-separated metric names (default: each stage kind's key metrics)")
    compare.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table",
                         help="how to print the comparison (default: a table 100 columns wide)")
    compare.add_argument("--out", default="compare.png", help="the chart (default: compare.png)")
    kinds = command("kinds", cmd_kinds, "stage kinds: inputs, outputs, params (yours too)")
    kinds.add_argument("kind", nargs="?", help="only this kind")
    schema = command("schema", cmd_schema, "write a JSON schema of pipelines.yaml (editor completion and checks)")
    schema.add_argument("--out", default="pipelines.schema.json", help="(default: pipelines.schema.json)")
    stage = command("stage", cmd_stage, "run one stage from params.yaml (the command DVC runs)", "pipeline", "stage")
    stage.add_argument("--params-file", default="params.yaml")
    return top


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("rl4llm")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def execute(argv: list[str] | None = None) -> str:
    """Run one command and return what it reports (`main` also prints it and turns failures into exit codes)."""
    args = parser().parse_args(argv)
    return args.fn(args)


def main(argv: list[str] | None = None) -> None:
    from flows.errors import DvcError, StageFailed
    from flows.run_lock import ProjectBusy

    signal.signal(signal.SIGTERM, _terminated)
    this_environment_first()
    args = parser().parse_args(argv)
    try:
        report = args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except ProjectBusy as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BUSY)
    except StageFailed as e:  # the stage's exit code is the run's (2: bad input)
        print(e, file=sys.stderr)
        sys.exit(e.code if 0 < e.code < 256 else 1)
    except DvcError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as e:  # a stage's own cause line (in `stderr`) ends the output, if it has one
        print(e.stderr or f"error: `{' '.join(e.cmd)}` failed with exit code {e.returncode} (its output is above)",
              file=sys.stderr)
        sys.exit(1)
    except BaseException as e:
        from stages.processes import interrupt_signal

        signum = interrupt_signal(e)
        if signum is None:
            raise
        config = "" if args.config == "pipelines.yaml" else f" -c {args.config}"
        seeds = f" --seeds {args.seeds}" if getattr(args, "seeds", None) else ""
        resume = f"; resume with `rl4llm{config} run {args.pipeline}{seeds}`" if args.command == "run" else ""
        print(f"interrupted ({signal.Signals(signum).name}): {e or 'stopped'}{resume}", file=sys.stderr)
        sys.exit(128 + signum)
    if report:
        print(report)


def this_environment_first() -> None:
    """The tools we start (dvc, accelerate, `rl4llm stage` as DVC runs it) come from this interpreter's environment,
    e.g. the project's .venv, even when it is not activated."""
    here = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])


def _terminated(signum: int, _frame) -> None:
    """SIGTERM outside a stage: stop like Ctrl-C does (as an exception, so runs end as KILLED)."""
    from stages.processes import Interrupted

    raise Interrupted(signum, "stopped by SIGTERM")


if __name__ == "__main__":
    main()
