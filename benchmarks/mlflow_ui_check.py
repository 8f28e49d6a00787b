"""Does the MLflow UI a user opens (README, "MLflow UI") show a pipeline's runs? Checked in a real headless browser.

A pipeline's parent run and its nested stage runs are logged through rl4llm's own tracking code (flows/tracking.py,
stages/tracking.py) into a fresh sqlite store, twice: into rl4llm's experiment (tagged as model training) and, for
contrast, into an experiment made without the tag, as rl4llm made them before. `mlflow server` serves the store, and
headless Chromium opens each experiment's page (the page a click on the experiment opens), lets the JavaScript app
render (`--virtual-time-budget`), dumps the DOM and saves a screenshot. The check passes when rl4llm's experiment page
shows the parent run with its stage runs nested under it ("4 matching runs"), and not MLflow 3's GenAI
"Overview" (traces, "No data available"). Found with MLflow 3.17: the UI picks GenAI or model-training pages by its
own switch (the `workflowType` URL parameter, else the browser's last choice, GenAI at first), not by the
experiment's `mlflow.experimentKind` tag, so the README's link carries `?workflowType=machine_learning`.

One-time machine setup (not a project dependency): `apt-get install -y chromium` (Debian's package).

    .venv/bin/python benchmarks/mlflow_ui_check.py [--out /tmp/mlflow_ui]

Prints what each page showed and exits 1 when rl4llm's does not show the runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE, STAGES = "ui-check", ("sft", "reward_model", "ppo")
GENAI_OVERVIEW = ("No data available", "Traces")  # what MLflow 3's GenAI overview shows for an experiment of runs


def log_pipeline(root: Path, experiment: str) -> str:
    """A finished parent run with one finished nested run per stage, through rl4llm's tracking code. Returns the
    experiment's id."""
    os.environ["RL4LLM_EXPERIMENT"] = experiment
    from flows.tracking import end_parent_run, start_parent_run
    from stages.tracking import PARENT_RUN_ENV, StageRun

    parent = start_parent_run(root, PIPELINE, "0" * 12, {})
    os.environ[PARENT_RUN_ENV] = parent
    for i, stage in enumerate(STAGES):
        run = StageRun(PIPELINE, stage, stage, {"lr": 1e-3})
        for step in range(1, 4):
            run.log(step, {"loss": 1.0 / (step + i)})
        run.finish({"loss": 0.1}, {"skipped": "false"})
    end_parent_run(PIPELINE, parent)
    from mlflow import MlflowClient

    return MlflowClient().get_run(parent).info.experiment_id


def untagged_copy(experiment_id: str, name: str) -> str:
    """The same runs in an experiment without `mlflow.experimentKind` (as rl4llm made them before)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    copy = client.create_experiment(name)
    ids = {}
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    for run in sorted(runs, key=lambda r: "mlflow.parentRunId" in r.data.tags):  # parents first
        tags = dict(run.data.tags)
        if "mlflow.parentRunId" in tags:
            tags["mlflow.parentRunId"] = ids[tags["mlflow.parentRunId"]]
        made = client.create_run(copy, run.info.start_time, tags, run.info.run_name)
        ids[run.info.run_id] = made.info.run_id
        client.set_terminated(made.info.run_id, "FINISHED")
    return copy


def serve(home: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{home / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.5)


def browse(url: str, screenshot: Path, budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran for `budget_ms` of virtual time; a screenshot of it at `screenshot`."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium: `apt-get install -y chromium` (one-time machine setup)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1600,1000", f"--virtual-time-budget={budget_ms}"]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                          check=True).stdout


def shown(dom: str) -> dict[str, object]:
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S))
    return {"runs": [name for name in (PIPELINE, *STAGES) if re.search(rf"\b{re.escape(name)}\b", text)],
            "matching": int(found.group(1)) if (found := re.search(r"(\d+)\s+matching runs", text)) else 0,
            "genai_overview": all(marker in text for marker in GENAI_OVERVIEW)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/mlflow_ui", help="screenshots and DOM dumps go to OUT_*.png/html")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    home = Path(tempfile.mkdtemp(prefix="mlflow-ui-check-"))
    os.chdir(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    tagged = log_pipeline(home, "rl4llm")
    untagged = untagged_copy(tagged, "rl4llm-untagged")
    port = 5000 + os.getpid() % 1000
    server = serve(home, port)
    results = {}
    try:
        pages = {"tagged": f"{tagged}", "untagged": f"{untagged}",
                 "model_training": f"{tagged}?workflowType=machine_learning"}  # the README's link
        for label, page in pages.items():
            screenshot = Path(f"{args.out}_{label}.png")
            dom = browse(f"http://127.0.0.1:{port}/#/experiments/{page}", screenshot)
            Path(f"{args.out}_{label}.html").write_text(dom)
            results[label] = shown(dom)
            print(f"{label} page /#/experiments/{page}: runs named {results[label]['runs']} of "
                  f"{results[label]['matching']} matching, GenAI overview "
                  f"{'shown' if results[label]['genai_overview'] else 'not shown'}; screenshot {screenshot}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    shown_runs = results["model_training"]  # the parent run, its stage runs folded under it (MLflow's default)
    ok = PIPELINE in shown_runs["runs"] and shown_runs["matching"] == 1 + len(STAGES) and \
        not shown_runs["genai_overview"]
    print("PASS: the experiment page shows the pipeline's runs" if ok else "FAIL: the runs are not shown")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
