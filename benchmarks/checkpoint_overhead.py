"""Checkpoint overhead of a stage: its wall time with the default `checkpoint_every` against no checkpoints, and the
time spent saving (each `TrainingLoop` save timed), interleaved rounds in one process after a warm-up round.

Run from a project whose stage's inputs exist (e.g. after `rl4llm run instructgpt --stage reward_model` and its
upstream):  python benchmarks/checkpoint_overhead.py --pipeline instructgpt --stage ppo --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import yaml

from stages import loop, runner

NEVER = 10 ** 9  # a checkpoint interval no stage reaches


def timed_saves() -> list[float]:
    """Wrap `TrainingLoop._save` to record how long each save takes."""
    durations: list[float] = []
    save = loop.TrainingLoop._save

    def timed(self, step, state):
        started = time.perf_counter()
        save(self, step, state)
        durations.append(time.perf_counter() - started)

    loop.TrainingLoop._save = timed
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="instructgpt")
    parser.add_argument("--stage", default="ppo")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    resolved = yaml.safe_load(Path(runner.PARAMS_FILE).read_text())
    spec = resolved[args.pipeline][args.stage]
    default_every = spec["params"]["checkpoint_every"]
    saves = timed_saves()
    walls: dict[str, list[float]] = {"default": [], "none": []}
    save_totals: list[float] = []
    for round_ in range(args.rounds + 1):  # round 0 warms up (imports, allocator) and is not counted
        for setting, every in (("default", default_every), ("none", NEVER)):
            variant = copy.deepcopy(resolved)
            variant[args.pipeline][args.stage]["params"]["checkpoint_every"] = every
            params_file = Path(f".bench-params-{setting}.yaml")
            params_file.write_text(yaml.safe_dump(variant, sort_keys=False))
            saves.clear()
            started = time.perf_counter()
            runner.run_stage(args.pipeline, args.stage, str(params_file))
            params_file.unlink()
            if round_ == 0:
                continue
            walls[setting].append(time.perf_counter() - started)
            if setting == "default":
                save_totals.append(sum(saves))
                print(f"checkpoints: {len(saves)} saves, {sum(saves):.2f} s", flush=True)
            print(f"{setting}: {walls[setting][-1]:.1f} s", flush=True)
    default, none = statistics.median(walls["default"]), statistics.median(walls["none"])
    share = statistics.median(s / w for s, w in zip(save_totals, walls["default"]))
    print(f"\n{args.pipeline}/{args.stage}, checkpoint_every={default_every}, {args.rounds} interleaved rounds")
    print(f"wall time, median: {default:.1f} s with checkpoints, {none:.1f} s without ({default / none - 1:+.1%})")
    print(f"time saving checkpoints, median share of the stage: {share:.1%}")


if __name__ == "__main__":
    main()
