"""Wall time of the everyday commands on a project whose pipeline has run: a no-op rerun, `validate`, `list`,
`compare` and `--help`, each through the interpreter running this script (so PYTHONPATH picks the checkout
measured); and the orchestration overhead per stage of the first run: its wall time minus the stages' own MLflow
run durations, over the stage count.

    python benchmarks/command_latency.py [--pipeline-file tests/pipelines/tiny_instructgpt.yaml] [--repeats 3]

Run it on an idle machine; it prints the median of each command and the time of the first (real) run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.tracking import stage_metrics

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline-file", default=str(REPO / "tests/pipelines/tiny_instructgpt.yaml"))
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "flows.cli"]
    with tempfile.TemporaryDirectory(prefix="rl4llm-latency-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "infra", root / "infra")
        shutil.copy(args.pipeline_file, root / "pipelines.yaml")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        env.pop("PREFECT_API_URL", None)
        first = timed([*cli, "run", args.pipeline], root, env)
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        own = [row["metrics"]["wall_s"] for row in stage_metrics([args.pipeline], last=1)]
        print(f"first run of {args.pipeline}: {first:.1f} s; the {len(own)} stages' own runs {sum(own):.1f} s; "
              f"orchestration overhead {(first - sum(own)) / len(own):.1f} s per stage")
        commands = {"no-op rerun": [*cli, "run", args.pipeline], "validate": [*cli, "validate"],
                    "list": [*cli, "list"], "compare": [*cli, "compare", args.pipeline, "--last", "1"],
                    "--help": [*cli, "--help"]}
        for name, cmd in commands.items():
            times = [timed(cmd, root, env) for _ in range(args.repeats)]
            print(f"{name:<12} median {statistics.median(times):5.2f} s  (runs: "
                  f"{', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
