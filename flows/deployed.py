"""The flow a pipeline's deployment runs on a worker (`rl4llm deploy`): `rl4llm run` of the pipeline in the
worker's clone of the project."""

from __future__ import annotations

from prefect import flow

from flows.config import input_graph, resolve, select_stages
from flows.flow import PIPELINE_FLOW
from flows.reproduce import project_root
from flows.run import run_pipeline


@flow(name=f"{PIPELINE_FLOW}-deployment", log_prints=True)
def deployed_pipeline(pipeline: str, stage: str | None = None, downstream: bool = False,
                      force: bool = False) -> dict[str, str]:
    """A pipeline run started from its deployment, in the worker's clone of the project."""
    root = project_root()
    resolved = resolve(root / "pipelines.yaml")
    specs = resolved.stages[pipeline]
    return run_pipeline(root, resolved, pipeline, select_stages(list(specs), input_graph(specs), stage, downstream),
                        force)
