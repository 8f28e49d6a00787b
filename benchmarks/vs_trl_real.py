"""GRPO with LoRA on a real model against TRL's GRPOTrainer: seconds per iteration, and where they go.

    python benchmarks/vs_trl_real.py /tmp/smol/hf [--rounds 2] [--iterations 3]

Both sides train the same `save_pretrained` model (SmolLM2-135M-Instruct in the issue) with the same LoRA (r 16,
alpha 32, all linear layers), prompts (reasoning_gym chain_sum, two terms of 1–2 digits, as chat messages), group
(4 prompts × 4 samples), 64 new tokens, temperature 1.0 with no top-k/top-p, β = 0.04 (the KL to the reference:
the policy with its adapters off; TRL 1.16's default is 0, which skips the reference forward), one optimiser step
per iteration (μ = 1: no old-policy forward on either side), no gradient checkpointing (TRL 1.16 turns it on by
default; ours is off), the same reward (the last number of the completion equals the answer), one torch thread,
fp32 (TRL 1.16 turns bf16 autocast on by default, several times slower on a CPU without bf16 matrix units). Rounds
interleave ours and TRL's (A B A B …) in this one process.

Time per iteration is read between the ends of the first and the last iteration (loading and setup left out): ours
from the stage tracker's step calls, TRL's from a callback at each step's end. Where the seconds go is measured the
same way on both sides, from outside the trainers: time inside `generate` (generation), in the model's forward with
gradients off outside generation (reference / old-policy log-probs), with gradients on (training forward), in
`torch.autograd.backward` (backward), in the optimiser's `step` (optimizer), and the rest (rewards, tokenizing,
clipping, logging).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.context import StageContext  # noqa: E402
from stages.data import write_jsonl  # noqa: E402
from stages.kinds import get_kind  # noqa: E402
from stages.models import load_policy, load_tokenizer  # noqa: E402
from stages.spec import DataInput  # noqa: E402

PROMPTS, PROMPTS_PER_STEP, GROUP, NEW_TOKENS = 64, 4, 4, 64
LORA = dict(r=16, alpha=32, target_modules="all-linear")
BETA, TEMPERATURE, LR = 0.04, 1.0, 1e-5
PHASES = ("generation", "ref/old forward", "train forward", "backward", "optimizer", "other")


def last_number_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1 when the completion's last number equals the answer (both sides pass the dataset's `answer` column)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(bool(n) and n[-1] == str(a)) for n, a in zip((re.findall(r"-?\d+", t) for t in texts), answer)]


def chain_sum_rows() -> list[dict[str, Any]]:
    import reasoning_gym

    data = reasoning_gym.create_dataset("chain_sum", size=PROMPTS, seed=0, min_terms=2, max_terms=2, min_digits=1,
                                        max_digits=2)
    return [{"prompt": [{"role": "user", "content": row["question"]}], "answer": row["answer"]} for row in data]


class Phases:
    """Seconds spent in each phase (PHASES), measured by wrapping generate, the model's forward, autograd's
    backward and every optimiser's step; `mark()` at each iteration's end keeps the time and the phases then."""

    def __init__(self, model_class: type):
        self.model_class = model_class
        self.total = dict.fromkeys(PHASES[:-1], 0.0)
        self.marks: list[tuple[float, dict[str, float]]] = []
        self.generating = False

    def mark(self, *_: Any, **__: Any) -> None:
        self.marks.append((time.perf_counter(), dict(self.total)))

    def per_iteration(self) -> tuple[float, dict[str, float]]:
        """Mean seconds per iteration between the first and the last mark, and the phases' share of them."""
        (t0, p0), (t1, p1), n = self.marks[0], self.marks[-1], len(self.marks) - 1
        phases = {k: (p1[k] - p0[k]) / n for k in p0}
        seconds = (t1 - t0) / n
        return seconds, {**phases, "other": seconds - sum(phases.values())}

    def _timed(self, phase: Callable[[], str | None], fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            name = phase()
            if name is None:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - start
        return wrapper

    def _forward_phase(self) -> str | None:
        return None if self.generating else "train forward" if torch.is_grad_enabled() else "ref/old forward"

    def time_instance_forward(self, model: torch.nn.Module) -> None:
        """Time the forward a trainer set on the model itself (TRL 1.16's fused LM head), which the patch of the
        class does not reach."""
        if "forward" in vars(model):
            model.forward = self._timed(self._forward_phase, model.forward)

    @contextmanager
    def installed(self) -> Iterator[None]:
        from transformers.generation.utils import GenerationMixin

        generate, forward, backward = GenerationMixin.generate, self.model_class.forward, torch.autograd.backward

        def generating(*args, **kwargs):
            self.generating = True
            try:
                return generate(*args, **kwargs)
            finally:
                self.generating = False

        GenerationMixin.generate = self._timed(lambda: "generation", generating)
        self.model_class.forward = self._timed(self._forward_phase, forward)
        torch.autograd.backward = self._timed(lambda: "backward", backward)
        started: list[float] = []
        pre = register_optimizer_step_pre_hook(lambda *_: started.append(time.perf_counter()))
        post = register_optimizer_step_post_hook(
            lambda *_: self.total.__setitem__("optimizer", self.total["optimizer"] + time.perf_counter()
                                              - started.pop()))
        try:
            yield
        finally:
            GenerationMixin.generate, self.model_class.forward, torch.autograd.backward = generate, forward, backward
            pre.remove()
            post.remove()


class Tracker:
    """The stage tracker our kind logs to: each step's end is a mark."""

    def __init__(self, phases: Phases):
        self.phases = phases

    def log(self, step: int, metrics: dict[str, float], total: int | None = None, record: bool = True) -> None:
        self.phases.mark()

    def tag(self, tags: dict[str, str]) -> None:
        pass


def ours(model_dir: str, prompts: Path, iterations: int, out: Path, phases: Phases) -> None:
    kind = get_kind("grpo")
    params = kind.params(iterations=iterations, prompts_per_step=PROMPTS_PER_STEP, samples_per_prompt=GROUP,
                         minibatch_size=PROMPTS_PER_STEP * GROUP, max_new_tokens=NEW_TOKENS, lr=LR, kl_coef=BETA,
                         temperature=TEMPERATURE, lora=LORA, evaluator=None,
                         rewards={"benchmarks.vs_trl_real:last_number_reward": 1.0})
    inputs = {"policy": DataInput(path=model_dir), "prompts": DataInput(path=str(prompts))}
    ctx = StageContext("bench", "grpo", 0, params, inputs,
                       {name: out / rel for name, rel in kind.outputs.items()}, out, None, Accelerator(cpu=True),
                       Tracker(phases), declared=kind.inputs)
    kind.load_run()(ctx)


def trl(model_dir: str, rows: list[dict[str, Any]], iterations: int, out: Path, phases: Phases) -> None:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    callback = type("Mark", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: phases.mark()})()
    config = trl.GRPOConfig(output_dir=str(out), report_to="none", save_strategy="no", use_cpu=True, seed=0,
                            per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, num_generations=GROUP,
                            max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                            beta=BETA, learning_rate=LR, max_steps=iterations, gradient_checkpointing=False, bf16=False,
                            lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, disable_tqdm=True,
                            dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                      task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(load_policy(model_dir), reward_funcs=[last_number_reward], args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(model_dir),
                              callbacks=[callback], peft_config=lora)
    phases.time_instance_forward(trainer.model.get_base_model())
    trainer.train()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a save_pretrained directory (e.g. the converted SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3, help="per run; the first one's end starts the clock")
    parser.add_argument("--only", choices=("ours", "trl"), help="run one side only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_class = type(load_policy(args.model_dir))
    rows = chain_sum_rows()
    sides = [s for s in ("ours", "trl") if args.only in (None, s)]
    results: dict[str, list[tuple[float, dict[str, float]]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="rl4llm-vs-trl-real-") as tmp:
        prompts = Path(tmp, "prompts.jsonl")
        write_jsonl(rows, prompts)
        for round_ in range(args.rounds):
            for side in sides:
                phases, out = Phases(model_class), Path(tmp, f"{side}{round_}")
                before = load()
                with phases.installed():
                    if side == "ours":
                        ours(args.model_dir, prompts, args.iterations, out, phases)
                    else:
                        trl(args.model_dir, rows, args.iterations, out, phases)
                seconds, split = phases.per_iteration()
                results[side].append((seconds, split))
                shown = ", ".join(f"{k} {v:.1f}" for k, v in split.items())
                print(f"round {round_ + 1} {side:<4} {seconds:6.1f} s/iteration ({shown}); load average "
                      f"before {before}, after {load()}", flush=True)
    print(f"\nmedian seconds per iteration, 1 torch thread, {args.iterations - 1} iterations timed per run")
    for side, runs in results.items():
        split = {k: statistics.median(s[k] for _, s in runs) for k in PHASES}
        print(f"  {side:<4} {statistics.median(s for s, _ in runs):6.1f}  "
              + "  ".join(f"{k} {v:.1f}" for k, v in split.items()))
    if len(results) == 2:
        ratio = statistics.median(s for s, _ in results["ours"]) / statistics.median(s for s, _ in results["trl"])
        print(f"  ours/TRL {ratio:.2f}x")


if __name__ == "__main__":
    main()
