"""The README's result tables: every shipped pipeline over several seeds, as mean ± sd (what `rl4llm compare` prints).

    python benchmarks/seeds.py [--seeds 0,1,2] [--pipelines instructgpt,...] [--dir DIR]

Copies pipelines.yaml and infra/ into DIR (default: a fresh temporary directory), runs
`rl4llm run <pipeline> --seeds <seeds>` there for each pipeline (stages already done for a seed are skipped, so an
interrupted benchmark resumes with the same --dir), then prints each pipeline's key metrics per seed with their
mean ± sd as markdown, and the wall time of each pipeline run.
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

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("instructgpt", "instructgpt-dpo", "deepseek-r1-zero", "deepseek-r1")
METRICS = ("gold_score,kl,ptx_lm_loss,eval_accuracy,accuracy,format_rate,language_consistency,initial_accuracy,"
           "initial_format_rate,initial_language_consistency,mean_response_length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--dir", help="project directory to run in (kept; default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rl4llm-seeds-") as tmp:
        root = Path(args.dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "pipelines.yaml", root)
        shutil.copytree(REPO / "infra", root / "infra", dirs_exist_ok=True)
        cli = [sys.executable, "-m", "flows.cli"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        for pipeline in args.pipelines.split(","):
            start = time.monotonic()
            subprocess.run([*cli, "run", pipeline, "--seeds", args.seeds], cwd=root, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"{pipeline} --seeds {args.seeds}: {time.monotonic() - start:.0f} s wall", flush=True)
        for pipeline in args.pipelines.split(","):
            table = subprocess.run([*cli, "compare", pipeline, "--last", "1", "--format", "markdown", "--metrics",
                                    METRICS, "--out", str(root / f"{pipeline}.png")], cwd=root, env=env, check=True,
                                   capture_output=True, text=True).stdout
            print(f"\n{table}", flush=True)


if __name__ == "__main__":
    main()
