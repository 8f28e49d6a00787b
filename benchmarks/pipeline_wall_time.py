"""Wall time of a whole pipeline on the embedded default, from a clean project directory (after install).

    python benchmarks/pipeline_wall_time.py [--pipeline instructgpt]

Copies pipelines.yaml and infra/ into a fresh temporary directory, runs `rl4llm run <pipeline>` there (Prefect
server start, DVC, every stage subprocess, MLflow included), and prints the wall time and each stage's final metrics
with its MLflow run's duration (`wall_s`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.tracking import stage_metrics

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="instructgpt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rl4llm-bench-") as tmp:
        root = Path(tmp)
        shutil.copy(REPO / "pipelines.yaml", root)
        shutil.copytree(REPO / "infra", root / "infra")
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "flows.cli", "run", args.pipeline], cwd=root, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - start
        print(f"{args.pipeline}: {wall:.1f} s wall, end to end")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        for row in stage_metrics([args.pipeline], last=1):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(row["metrics"].items()))
            print(f"  {row['stage']:<18} {shown}")


if __name__ == "__main__":
    main()
