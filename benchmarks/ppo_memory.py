"""Memory of the ppo stage on a ~20 M-parameter Qwen2-layout model: full fine-tuning vs LoRA with the shared base.

    python benchmarks/ppo_memory.py

Builds the model (byte-level BPE ChatML tokenizer, tests/real_layout.py) and Hub-layout chat prompts in a temporary
project, then runs the same ppo stage (GAE, value model from the reward model) twice, each in a fresh process: full
fine-tuning (policy, reference, reward model, value model: four copies, two with gradients and AdamW state) and LoRA
(reference = policy with adapters off, reward model = value model with adapters off: two copies). Reports each
process's peak RSS minus its RSS after the imports, i.e. what the models, gradients, optimizer state and
activations took.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PPO = {"iterations": 2, "rollout_prompts": 8, "minibatch_size": 8, "ppo_epochs": 1, "max_new_tokens": 8}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def child(stage: str) -> None:
    """Run one stage in this process; print {import_rss_mb, peak_rss_mb}."""
    from stages.runner import run_stage  # the whole training stack

    import_rss = rss_mb()
    run_stage("memory", stage)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"import_rss_mb": import_rss, "peak_rss_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch-size", type=int, default=2,
                        help="micro_batch_size (samples per forward/backward): activations, the same in both runs, "
                             "shrink with it, so the figure is mostly models, gradients, optimizer state")
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    sys.path.insert(0, str(REPO))
    from tests.real_layout import build_hub_datasets, build_qwen2

    with tempfile.TemporaryDirectory(prefix="rl4llm-memory-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "infra", root / "infra")
        model = build_qwen2(root / "qwen2", hidden_size=512, layers=7, heads=8, kv_heads=2, intermediate_size=1536)
        build_hub_datasets(root)
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
            model).parameters())
        inputs = {"policy": "datasets.model", "reward": "datasets.model", "prompts": "datasets.prompts"}
        ppo = {**PPO, "micro_batch_size": args.micro_batch_size}
        config = {"pipelines": {"memory": {
            "defaults": {"seed": 0},
            "datasets": {"model": {"path": "qwen2"}, "prompts": {"path": "prompts", "split": "train"}},
            "stages": [{"name": "full", "kind": "ppo", "inputs": inputs, "params": ppo},
                       {"name": "lora", "kind": "ppo", "inputs": inputs,
                        "params": {**ppo, "lora": {"r": 16, "alpha": 32}}}]}}}
        (root / "pipelines.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "flows.cli", "sync"], cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        results = {}
        for stage in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, "--child", stage], cwd=root, env=env, check=True,
                                 capture_output=True, text=True).stdout
            results[stage] = json.loads(out.strip().splitlines()[-1])
        print(f"ppo stage, Qwen2 layout, {n_params / 1e6:.1f} M parameters (fp32), "
              f"micro_batch_size {args.micro_batch_size}:")
        for stage, r in results.items():
            print(f"  {stage}: RSS after imports {r['import_rss_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB, "
                  f"models + gradients + optimizer state + activations {r['peak_rss_mb'] - r['import_rss_mb']:.0f} MB")
        full, lora = (results[s]["peak_rss_mb"] - results[s]["import_rss_mb"] for s in ("full", "lora"))
        print(f"  LoRA / full: {lora / full:.2f}x")


if __name__ == "__main__":
    main()
