"""Wall time of a whole pipeline on the embedded default, from a clean project directory (after install).

    python benchmarks/instructgpt_wall_time.py [--pipeline instructgpt]

Copies pipelines.yaml and infra/ into a fresh temporary directory, runs `rl4llm run <pipeline>` there (Prefect
server start, DVC, every stage subprocess, MLflow included), and prints the wall time and each stage's metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

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
        subprocess.run(["rl4llm", "run", args.pipeline], cwd=root, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.monotonic() - start
        print(f"{args.pipeline}: {wall:.1f} s wall, end to end")
        for metrics_file in sorted((root / "artifacts" / args.pipeline).glob("*/metrics.json"),
                                   key=lambda p: p.stat().st_mtime):
            metrics = json.loads(metrics_file.read_text())
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
            print(f"  {metrics_file.parent.name:<18} {shown}")


if __name__ == "__main__":
    main()
