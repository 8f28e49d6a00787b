"""Checkpoint overhead of a stage: its wall time with the default `checkpoint_every` against no checkpoints, and the
time spent saving (each `TrainingLoop` save timed, and the manifest within it), interleaved rounds in one process
after a warm-up round.

Run from a project whose stage's inputs exist (e.g. after `rl4llm run instructgpt --stage reward_model` and its
upstream):  python benchmarks/checkpoint_overhead.py --pipeline instructgpt --stage ppo --rounds 3

`--real-size DIR` instead times, in DIR, what a checkpoint of a SmolLM2-135M-sized model (random weights, AdamW
state, ~1.6 GB) costs: accelerate's save, its manifest (sizes and hashes), the check of a resume, and the load.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial
from pathlib import Path

import yaml

from stages import loop, runner
from stages.checkpoint import remove, verified, write_manifest

NEVER = 10 ** 9  # a checkpoint interval no stage reaches


def timed(owner: object, name: str) -> list[float]:
    """Wrap the function `owner.name` to record how long each call takes."""
    durations: list[float] = []
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)

    setattr(owner, name, wrapper)
    return durations


def real_size(directory: Path, rounds: int) -> None:
    """Median seconds to save, write the manifest of, verify and load a SmolLM2-135M-sized checkpoint in
    `directory`, as `TrainingLoop` does (the manifest right after the save, as a stage writes it; the page cache
    is warm for the check and the load)."""
    import torch
    import transformers
    from accelerate import Accelerator

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    tokens = torch.zeros(1, 8, dtype=torch.long, device=accelerator.device)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()  # the optimiser's state exists from here on
    phases: dict[str, list[float]] = {"save": [], "manifest": [], "verify": [], "load": []}
    for round_ in range(rounds):
        path = directory / f"step-{round_ + 1}"
        for phase, act in (("save", partial(accelerator.save_state, str(path), safe_serialization=False)),
                           ("manifest", partial(write_manifest, path, round_ + 1, rounds)),
                           ("verify", partial(verified, path, contents=True)),
                           ("load", partial(accelerator.load_state, str(path)))):
            started = time.perf_counter()
            act()
            phases[phase].append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        remove(path)
    seconds = {phase: statistics.median(values) for phase, values in phases.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f} M parameters on {accelerator.device}, checkpoint {size / 1e9:.2f} GB, "
          f"median of {rounds}: " + ", ".join(f"{phase} {s:.2f} s" for phase, s in seconds.items()))
    print(f"manifest: {seconds['manifest'] / seconds['save']:+.0%} on a save; verify: "
          f"{seconds['verify'] / seconds['load']:+.0%} on a resume's load")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="instructgpt")
    parser.add_argument("--stage", default="ppo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--real-size", type=Path, metavar="DIR", help="time a 135M-parameter checkpoint in DIR")
    args = parser.parse_args()
    if args.real_size:
        return real_size(args.real_size, args.rounds)
    resolved = yaml.safe_load(Path(runner.PARAMS_FILE).read_text())
    spec = resolved[args.pipeline][args.stage]
    default_every = spec["params"]["checkpoint_every"]
    saves, manifests = timed(loop.TrainingLoop, "_save"), timed(loop, "write_manifest")
    walls: dict[str, list[float]] = {"default": [], "none": []}
    save_totals: list[float] = []
    for round_ in range(args.rounds + 1):  # round 0 warms up (imports, allocator) and is not counted
        for setting, every in (("default", default_every), ("none", NEVER)):
            variant = copy.deepcopy(resolved)
            variant[args.pipeline][args.stage]["params"]["checkpoint_every"] = every
            params_file = Path(f".bench-params-{setting}.yaml")
            params_file.write_text(yaml.safe_dump(variant, sort_keys=False))
            saves.clear()
            manifests.clear()
            started = time.perf_counter()
            runner.run_stage(args.pipeline, args.stage, str(params_file))
            params_file.unlink()
            if round_ == 0:
                continue
            walls[setting].append(time.perf_counter() - started)
            if setting == "default":
                save_totals.append(sum(saves))
                print(f"checkpoints: {len(saves)} saves, {sum(saves):.2f} s (manifests {sum(manifests):.2f} s)",
                      flush=True)
            print(f"{setting}: {walls[setting][-1]:.1f} s", flush=True)
    default, none = statistics.median(walls["default"]), statistics.median(walls["none"])
    share = statistics.median(s / w for s, w in zip(save_totals, walls["default"]))
    print(f"\n{args.pipeline}/{args.stage}, checkpoint_every={default_every}, {args.rounds} interleaved rounds")
    print(f"wall time, median: {default:.1f} s with checkpoints, {none:.1f} s without ({default / none - 1:+.1%})")
    print(f"time saving checkpoints, median share of the stage: {share:.1%}")


if __name__ == "__main__":
    main()
