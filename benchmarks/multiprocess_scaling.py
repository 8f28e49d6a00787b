"""PPO and GRPO on 2 processes vs 1, same global batch: wall time per iteration and the learning outcome over seeds.

    python benchmarks/multiprocess_scaling.py [--seeds 0 1 2]

In a fresh temporary project, runs the embedded InstructGPT pipeline up to its reward model and the R1-Zero
pipeline up to its base model once, then the `instructgpt/ppo` and `deepseek-r1-zero/grpo` stages of pipelines.yaml
(same params) with `infra/accelerate/single.yaml` and `cpu_2proc.yaml` for each seed. Time per iteration is read
from the stage's MLflow curve (first to last iteration, so process start-up and evaluation are left out); the outcome
is the stage's held-out metric (PPO: gold score, GRPO: accuracy). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CASES = {  # pipeline, its stages the RL stage needs, the RL stage, the per-iteration metric, the outcome
    "ppo": ("instructgpt", ["data", "pretrain", "sft", "comparisons", "reward_model"], "ppo", "reward", "gold_score"),
    "grpo": ("deepseek-r1-zero", ["data", "pretrain"], "grpo", "reward", "accuracy"),
}
CONFIGS = {"1proc": "infra/accelerate/single.yaml", "2proc": "infra/accelerate/cpu_2proc.yaml"}


def bench_config(seeds: list[int], hidden_size: int | None) -> dict:
    """pipelines.yaml's two pipelines cut to what the RL stage needs, plus one copy of it per seed and config;
    `hidden_size` widens the pretrained model (more compute per token, the same Python overhead per step)."""
    source = yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"]
    pipelines = {}
    for pipeline, needed, rl_stage, _, _ in CASES.values():
        spec = source[pipeline]
        stages = [s for s in spec["stages"] if s["name"] in needed]
        if hidden_size:
            for stage in stages:
                if stage["kind"] == "pretrain":
                    stage["params"] = {**stage.get("params", {}), "hidden_size": hidden_size}
        rl = next(s for s in spec["stages"] if s["name"] == rl_stage)
        stages += [{**rl, "name": f"{rl_stage}_{config}_s{seed}", "seed": seed, "accelerate_config": path}
                   for seed in seeds for config, path in CONFIGS.items()]
        pipelines[pipeline] = {**spec, "stages": stages}
    return {"pipelines": pipelines}


def seconds_per_iteration(pipeline: str, stage: str, metric: str) -> float:
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.pipeline = '{pipeline}' and tags.stage = '{stage}'")
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, metric)
    times = sorted(m.timestamp for m in history)
    return (times[-1] - times[0]) / 1000 / (len(times) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden-size", type=int, default=None, help="width of the pretrained model (default: "
                                                                       "pipelines.yaml's, 64)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rl4llm-scaling-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "infra", root / "infra")
        (root / "pipelines.yaml").write_text(yaml.safe_dump(bench_config(args.seeds, args.hidden_size), sort_keys=False))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        cli = [sys.executable, "-m", "flows.cli"]
        subprocess.run([*cli, "sync"], cwd=root, check=True, stdout=subprocess.DEVNULL)
        for name in args.cases:
            pipeline, needed, rl_stage, metric, outcome = CASES[name]
            for stage in needed:
                subprocess.run([*cli, "stage", pipeline, stage], cwd=root, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            results: dict[str, dict[str, list[float]]] = {c: {"s_per_it": [], outcome: []} for c in CONFIGS}
            for seed in args.seeds:
                for config in CONFIGS:
                    stage = f"{rl_stage}_{config}_s{seed}"
                    subprocess.run([*cli, "stage", pipeline, stage], cwd=root, check=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    final = json.loads((root / f"artifacts/{pipeline}/{stage}/metrics.json").read_text())
                    results[config]["s_per_it"].append(seconds_per_iteration(pipeline, stage, metric))
                    results[config][outcome].append(final[outcome])
            print(f"{pipeline}/{rl_stage} (seeds {args.seeds}, hidden size {args.hidden_size or 'default'}):")
            for config, values in results.items():
                shown = ", ".join(f"{k} {statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f} {[round(x, 3) for x in v]}"
                                  for k, v in values.items())
                print(f"  {config}: {shown}")
            ratio = statistics.mean(results["2proc"]["s_per_it"]) / statistics.mean(results["1proc"]["s_per_it"])
            print(f"  time per iteration, 2 processes / 1 process: {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
