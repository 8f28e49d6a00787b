"""The README's result tables: every shipped pipeline over several seeds, as mean ± sd (what `rl4llm compare` prints).

    python benchmarks/seeds.py [--seeds 0,1,2] [--pipelines instructgpt,...] [--dir DIR]

Copies pipelines.yaml and infra/ into DIR (default: a fresh temporary directory), links `make model`'s GGUF file
into DIR/models/, runs `rl4llm run <pipeline> --seeds <seeds>` there for each pipeline (stages already done for a
seed are skipped, so an interrupted benchmark resumes with the same --dir), then prints each pipeline's key metrics
per seed with their mean ± sd as markdown, and the wall time of each pipeline run. A pipeline with `best_of_n`
stages also gets their accuracy-vs-N table: a row per selection method, a column per N, mean ± sd over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.compare import mean_sd

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("instructgpt", "instructgpt-dpo", "deepseek-r1-zero", "deepseek-r1", "verifiers", "search-r1",
             "smollm2-search-r1")
METRICS = ("gold_score,kl,ptx_lm_loss,eval_accuracy,accuracy,format_rate,language_consistency,initial_accuracy,"
           "initial_format_rate,initial_language_consistency,mean_response_length,correct_rate,step_positive_rate,"
           "eval_auc,eval_step_accuracy,eval_step_auc,eval_first_error_f1,search_rate,mean_searches,"
           "tool_calls_per_sample,notool_accuracy,initial_search_rate,initial_notool_accuracy")
SCORERS = ("pass1", "majority", "orm", "prm_min", "prm_prod", "prm_last", "oracle")  # best_of_n's selection methods
CURVE_METRICS = ",".join(f"{scorer}_n{2 ** k}" for scorer in SCORERS for k in range(11))
CURVE_POINT = re.compile(r"^(.+)_n(\d+)$")


def best_of_n_table(rows: list[dict]) -> str:
    """Markdown: for each best_of_n stage, a row per selection method and a column per N, mean ± sd over seeds."""
    tables = []
    for stage in dict.fromkeys(r["stage"] for r in rows if r["kind"] == "best_of_n"):
        points: dict[str, dict[int, list[float]]] = {}
        for row in (r for r in rows if r["stage"] == stage):
            for name, value in row["metrics"].items():
                scorer, n = CURVE_POINT.match(name).groups()
                points.setdefault(scorer, {}).setdefault(int(n), []).append(value)
        sizes = sorted({n for by_n in points.values() for n in by_n})
        lines = [f"| {stage}: accuracy at N | " + " | ".join(f"N={n}" for n in sizes) + " |",
                 "|---|" + "---:|" * len(sizes)]
        lines += [f"| {scorer} | " + " | ".join(mean_sd(by_n[n]) if n in by_n else "-" for n in sizes) + " |"
                  for scorer in SCORERS if scorer in points for by_n in [points[scorer]]]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


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
        (root / "models").mkdir(exist_ok=True)  # the real model's GGUF file (`make model`), for smollm2-* pipelines
        for model in (REPO / "models").glob("*.gguf"):
            if not (root / "models" / model.name).exists():
                (root / "models" / model.name).symlink_to(model.resolve())
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
            curves = json.loads(subprocess.run([*cli, "compare", pipeline, "--last", "1", "--format", "json",
                                                "--metrics", CURVE_METRICS, "--out", os.devnull], cwd=root, env=env,
                                               check=True, capture_output=True, text=True).stdout)
            if any(row["kind"] == "best_of_n" for row in curves):
                print(f"\n{best_of_n_table(curves)}", flush=True)


if __name__ == "__main__":
    main()
