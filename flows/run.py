"""`rl4llm run` of one pipeline: the project's run lock, dvc.yaml and params.yaml brought in sync, the tracking
server checked, then each stale stage reproduced by DVC in pipeline order inside the pipeline's MLflow parent run.

Prefect (flows/flow.py) runs the stages when any is stale; a run with every stage up to date records them without
starting Prefect at all (flows/reproduce.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flows import dvc
from flows.config import Resolved, RunSettings
from flows.errors import ConfigError
from flows.reproduce import run_stages, tracking
from flows.seeds import pipeline_seed
from stages.checkpoint import STATE_DIR
from stages.processes import RUN_PID_ENV
from stages.tracking import EXPERIMENT_ENV, UNSENT


def run_pipeline(root: Path, resolved: Resolved, pipeline: str, stages_to_run: list[str], force: bool = False,
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

    specs = resolved.stages[pipeline]
    seed = pipeline_seed(specs)
    tags = ({} if seed is None else {"seed": str(seed)}) | ({"seed_of": seed_of} if seed_of else {})
    settings = resolved.settings[seed_of or pipeline]
    settings = settings.model_copy(update={"tags": tags, "fresh": fresh,
                                           "push": settings.push if push is None else push})
    os.chdir(root)
    os.environ[RUN_PID_ENV] = str(os.getpid())
    with run_lock(root, pipeline):
        dvc.ensure_repo(root)
        dvc.sync(root, resolved.stages)
        tracking_uri_default(root)
        check_tracking_server(os.environ["MLFLOW_TRACKING_URI"])
        pools = {settings.stages[s].work_pool for s in stages_to_run} - {None}
        if (settings.push or pools) and not dvc.default_remote(root):
            raise ConfigError(config_file, "pushing outputs and running stages on work pools need a default DVC "
                                           "remote (`dvc remote add -d <name> <url>`)", pipeline,
                              key="push" if settings.push else "work_pool")
        states = dvc.status(root, pipeline, {s: specs[s] for s in stages_to_run})
        recorded = RecordedState(root, pipeline, stages_to_run, settings)
        nothing_stale = not force and all(state == "up to date" for state in states.values())
        if nothing_stale and not settings.push and recorded.unchanged():  # seen and recorded already: nothing to do
            return dict.fromkeys(stages_to_run, "skipped")
        if may_hold_running_runs(os.environ["MLFLOW_TRACKING_URI"]):
            tracking().fail_orphaned_runs()
        if nothing_stale:  # no Prefect server needed

            def skip(stage: str, _env: dict[str, str]) -> str:
                if settings.push:
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

    def __init__(self, root: Path, pipeline: str, stages: list[str], settings: RunSettings):
        self.path = root / STATE_DIR / "recorded" / f"{pipeline}.json"
        self.root, self.pipeline, self.stages, self.settings = root, pipeline, stages, settings

    def digest(self) -> str:
        locked = dvc.lock_entries(self.root, self.pipeline)
        settings = self.settings.model_dump(exclude={"push", "fresh"})  # asked for per run: not what was seen
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        seen = {"lock": {s: locked.get(s) for s in self.stages}, "settings": settings, "tracking": uri,
                "experiment": os.environ.get(EXPERIMENT_ENV),
                "database": database.stat().st_ino if database and database.exists() else None}
        return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()

    def unchanged(self) -> bool:
        """Seen and recorded already, and nothing kept while tracking was lost waits to be sent."""
        kept = any((self.root / STATE_DIR / "logs").glob(f"*{UNSENT}"))
        return not kept and self.path.exists() and self.path.read_text() == self.digest()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dvc.write_atomically(self.path, self.digest())
