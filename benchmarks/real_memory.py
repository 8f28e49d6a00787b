"""Peak memory and seconds per iteration of GRPO with LoRA on a real model, through the real stage code.

    python benchmarks/real_memory.py /tmp/smol/hf [--iterations 2] [--micro-batch-size N] [--gradient-checkpointing]
                                                  [--threads 1]

Writes a temporary project: 64 two-term arithmetic prompts (`{prompt, answer}` jsonl) and one grpo stage reading the
model directory given (declared as a dataset, as any local model input), with LoRA (r 16), 8 prompts × 4 samples,
64 new tokens, rewards `accuracy` and `format`, everything else at its default (so `minibatch_size` 64 puts the whole
rollout of 32 samples in one optimiser step, and `micro_batch_size` decides the memory). `flows.cli sync` resolves it
into params.yaml, then a fresh process runs the stage exactly as `rl4llm stage` does (`stages.runner.run_stage`),
with RL4LLM_TORCH_THREADS torch threads (default 1, so as not to starve the machine), and reports its peak RSS
(`ru_maxrss`), its RSS after the imports, and the seconds of each iteration (rollout, scoring and update; the
first measured from the start of the loop).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE = "grpo_lora"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def child() -> None:
    """Run the stage in this process; print {import_rss_mb, peak_rss_mb, iteration_s}."""
    from stages.loop import TrainingLoop
    from stages.runner import run_stage  # the whole training stack

    import_rss, marks = rss_mb(), []
    steps, end_step = TrainingLoop.steps, TrainingLoop.end_step

    def timed_steps(loop):  # the loop starts: the first iteration is timed from here
        marks.append(time.monotonic())
        yield from steps(loop)

    def timed_end_step(loop, *args, **kwargs):
        marks.append(time.monotonic())
        return end_step(loop, *args, **kwargs)

    TrainingLoop.steps, TrainingLoop.end_step = timed_steps, timed_end_step
    run_stage("memory", STAGE)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"import_rss_mb": import_rss, "peak_rss_mb": peak,
                      "iteration_s": [b - a for a, b in zip(marks, marks[1:])]}))


def arithmetic_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"prompt": f"What is {a} + {b}? Think briefly, then give the result inside <answer></answer>.",
                     "answer": str(a + b)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a save_pretrained model directory (e.g. /tmp/smol/hf)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, help="micro_batch_size of the stage (default: the stage's)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="gradient_checkpointing of the stage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the stage (RL4LLM_TORCH_THREADS)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child()
    if not args.model:
        parser.error("the model directory is required")

    with tempfile.TemporaryDirectory(prefix="rl4llm-real-memory-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "infra", root / "infra")
        (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_prompts(64)))
        params = {"iterations": args.iterations, "prompts_per_step": 8, "samples_per_prompt": 4,
                  "max_new_tokens": 64, "lora": {"r": 16, "alpha": 32}, "gradient_checkpointing": args.gradient_checkpointing,
                  "rewards": {"accuracy": 1.0, "format": 0.5}}
        if args.micro_batch_size:
            params["micro_batch_size"] = args.micro_batch_size
        config = {"pipelines": {"memory": {
            "defaults": {"seed": 0},
            "datasets": {"model": {"path": str(Path(args.model).resolve())}, "prompts": {"path": "prompts.jsonl"}},
            "stages": [{"name": STAGE, "kind": "grpo", "params": params,
                        "inputs": {"policy": "datasets.model", "prompts": "datasets.prompts"}}]}}}
        (root / "pipelines.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(REPO),
               "RL4LLM_TORCH_THREADS": str(args.threads)}
        subprocess.run([sys.executable, "-m", "flows.cli", "sync"], cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        started, load = time.monotonic(), os.getloadavg()[0]
        run = subprocess.run([sys.executable, __file__, "--child"], cwd=root, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"the stage failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
    seconds = ", ".join(f"{s:.0f}" for s in r["iteration_s"])
    print(f"grpo + LoRA r16 on {args.model}: 8 prompts x 4 samples x 64 new tokens, micro_batch_size "
          f"{args.micro_batch_size or 'default'}{', gradient checkpointing' if args.gradient_checkpointing else ''}, "
          f"{args.threads} torch thread(s), load average at the start {load:.1f}")
    print(f"  peak RSS {r['peak_rss_mb'] / 1024:.2f} GB (after imports {r['import_rss_mb'] / 1024:.2f} GB); "
          f"seconds per iteration: {seconds}; stage process {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
