"""Training loops against TRL's: time per optimiser step (GRPO: per iteration) of the sft, dpo and grpo kinds and of
TRL's SFTTrainer, DPOTrainer and GRPOTrainer, plus a bare PyTorch DPO loop, on the same tiny model, data and
settings, one torch thread each, in interleaved rounds.

    make bench-trl            # installs the `bench` extra (TRL: never a runtime dependency), then runs this
    python benchmarks/vs_trl.py [--rounds 3]

Each loop's time per step is read between its first and last step (model loading, saving and evaluation left out):
our kinds' from the stage tracker's step calls, TRL's from a callback at each step's end. Both sides train on the
prompt/response tokens with the chat template applied (TRL: conversational rows). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import instruct_task  # noqa: E402
from stages.context import StageContext  # noqa: E402
from stages.data import write_jsonl  # noqa: E402
from stages.kinds import get_kind  # noqa: E402
from stages.models import build_tiny_llama, build_word_tokenizer, load_policy, load_tokenizer, save  # noqa: E402
from stages.spec import DataInput  # noqa: E402

SFT = dict(rows=512, batch_size=32, lr=1e-3, max_length=64)
DPO = dict(rows=256, batch_size=16, lr=1e-4, beta=0.1, max_length=64)
GRPO = dict(prompts=64, prompts_per_step=4, samples_per_prompt=8, max_new_tokens=12, lr=1e-4, beta=0.04,
            iterations=8)


def gold_reward(completions: list[str], prompt: list[str] | None = None, prompts: list[Any] | None = None,
                **_: Any) -> list[float]:
    """The embedded task's gold score (our kinds pass `prompt`, TRL passes `prompts`)."""
    asked = prompt if prompt is not None else [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [instruct_task.gold_score(p, c) for p, c in zip(asked, texts)]


def chat(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": prompt}]
    return turns + ([{"role": "assistant", "content": response}] if response is not None else [])


class StepClock:
    """A stage tracker (or TRL callback) noting when each step ends."""

    def __init__(self):
        self.times: list[float] = []

    def log(self, step: int, metrics: dict[str, float], total: int | None = None, record: bool = True) -> None:
        self.times.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def per_step(self) -> float:
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def make_inputs(root: Path) -> dict[str, Path]:
    rng = random.Random(0)
    prompts = [instruct_task.make_prompt(rng) for _ in range(SFT["rows"])]
    sft = [{"prompt": p, "response": instruct_task.demonstration(p, rng)} for p in prompts]
    dpo = [{"prompt": p, "chosen": instruct_task.demonstration(p, rng, slip=0.0),
            "rejected": " ".join(rng.sample(instruct_task.ALL_WORDS, 3))} for p in prompts[:DPO["rows"]]]
    files = {"sft": root / "sft.jsonl", "dpo": root / "dpo.jsonl", "prompts": root / "prompts.jsonl"}
    write_jsonl(sft, files["sft"])
    write_jsonl(dpo, files["dpo"])
    write_jsonl([{"prompt": p} for p in prompts[:GRPO["prompts"]]], files["prompts"])
    tokenizer = build_word_tokenizer([f"{r['prompt']} {r['response']}" for r in sft]
                                     + [" ".join(instruct_task.ALL_WORDS)])
    torch.manual_seed(0)
    model = build_tiny_llama(len(tokenizer), 64, 2, 4, 128, tokenizer.pad_token_id, tokenizer.bos_token_id,
                             tokenizer.eos_token_id)
    save(model, tokenizer, root / "policy")
    files["policy"] = root / "policy"
    return files


def ours(kind_name: str, inputs: dict[str, DataInput], params: dict[str, Any], out: Path) -> float:
    kind = get_kind(kind_name)
    clock = StepClock()
    ctx = StageContext("bench", kind_name, 0, kind.params(**params), inputs,
                       {name: out / rel for name, rel in kind.outputs.items()}, out, None, Accelerator(cpu=True),
                       clock, declared=kind.inputs)
    kind.load_run()(ctx)
    return clock.per_step()


def trl_trainer(name: str, files: dict[str, Path], out: Path) -> float:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    rows = [json.loads(line) for line in files[{"sft": "sft", "dpo": "dpo", "grpo": "prompts"}[name]].open()]
    clock = StepClock()
    callback = type("Clock", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: clock.on_step_end(*a, **k)})()
    common = dict(output_dir=str(out), report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True,
                  dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                  logging_steps=10, disable_tqdm=True, seed=0, bf16=False)  # fp32, as ours
    model, tokenizer = load_policy(str(files["policy"])), load_tokenizer(str(files["policy"]))
    if name == "sft":
        data = Dataset.from_list([{"prompt": chat(r["prompt"]), "completion": chat(r["prompt"], r["response"])[1:]}
                                  for r in rows])
        config = trl.SFTConfig(per_device_train_batch_size=SFT["batch_size"], learning_rate=SFT["lr"],
                               num_train_epochs=1, max_length=SFT["max_length"], completion_only_loss=True,
                               **common)
        trainer = trl.SFTTrainer(model, args=config, train_dataset=data, processing_class=tokenizer,
                                 callbacks=[callback])
    elif name == "dpo":
        data = Dataset.from_list([{"prompt": chat(r["prompt"]), "chosen": chat(r["prompt"], r["chosen"])[1:],
                                   "rejected": chat(r["prompt"], r["rejected"])[1:]} for r in rows])
        config = trl.DPOConfig(per_device_train_batch_size=DPO["batch_size"], learning_rate=DPO["lr"],
                               num_train_epochs=1, beta=DPO["beta"], max_length=DPO["max_length"],
                               precompute_ref_log_probs=True, **common)
        trainer = trl.DPOTrainer(model, args=config, train_dataset=data, processing_class=tokenizer,
                                 callbacks=[callback])
    else:
        data = Dataset.from_list([{"prompt": chat(r["prompt"])} for r in rows])
        batch = GRPO["prompts_per_step"] * GRPO["samples_per_prompt"]
        config = trl.GRPOConfig(per_device_train_batch_size=batch, num_generations=GRPO["samples_per_prompt"],
                                max_completion_length=GRPO["max_new_tokens"], learning_rate=GRPO["lr"],
                                beta=GRPO["beta"], max_steps=GRPO["iterations"], temperature=1.0, **common)
        trainer = trl.GRPOTrainer(model, reward_funcs=[gold_reward], args=config, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    return clock.per_step()


def bare_dpo(files: dict[str, Path]) -> float:
    """DPO as a plain loop: encoded once, reference log-probs precomputed, then forward, loss, backward, step."""
    from stages.algorithms import preference_loss
    from stages.text import encode_prompt, encode_response, pair_batch, response_logprobs

    model, tokenizer = load_policy(str(files["policy"])), load_tokenizer(str(files["policy"]))
    rows = [json.loads(line) for line in files["dpo"].open()]
    encoded = [(encode_prompt(tokenizer, r["prompt"]), encode_response(tokenizer, r["chosen"]),
                encode_response(tokenizer, r["rejected"])) for r in rows]

    def batch_logps(policy, part):
        prompts = [p for p, _, _ in part] * 2
        responses = [c for _, c, _ in part] + [r for _, _, r in part]
        batch = pair_batch(prompts, responses, tokenizer.pad_token_id)
        logps = response_logprobs(policy, batch)
        summed = (logps * batch.response_mask).sum(-1)
        return summed[:len(part)], summed[len(part):]

    size = DPO["batch_size"]
    batches = [encoded[i:i + size] for i in range(0, len(encoded), size)]
    with torch.no_grad():
        reference = [batch_logps(model, part) for part in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=DPO["lr"])
    clock = StepClock()
    for part, (ref_chosen, ref_rejected) in zip(batches, reference):
        chosen, rejected = batch_logps(model, part)
        loss = preference_loss(chosen, rejected, ref_chosen, ref_rejected, DPO["beta"])[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        clock.log(0, {})
    return clock.per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="rl4llm-vs-trl-") as tmp:
        root = Path(tmp)
        files = make_inputs(root)
        policy = DataInput(path=str(files["policy"]))
        cases: dict[str, Callable[[Path], float]] = {
            "sft (ours)": lambda out: ours("sft", {"base": policy, "data": DataInput(path=str(files["sft"]))}, dict(
                epochs=1, batch_size=SFT["batch_size"], lr=SFT["lr"], max_length=SFT["max_length"],
                holdout_fraction=0.0), out),
            "sft (TRL)": lambda out: trl_trainer("sft", files, out),
            "dpo (ours)": lambda out: ours("dpo", {"policy": policy, "comparisons": DataInput(path=str(files["dpo"]))},
                                           dict(epochs=1, batch_size=DPO["batch_size"], lr=DPO["lr"],
                                                beta=DPO["beta"], max_length=DPO["max_length"],
                                                eval_fraction=0.0), out),
            "dpo (TRL)": lambda out: trl_trainer("dpo", files, out),
            "dpo (bare loop)": lambda out: bare_dpo(files),
            "grpo (ours)": lambda out: ours("grpo", {"policy": policy,
                                                     "prompts": DataInput(path=str(files["prompts"]))},
                                            dict(iterations=GRPO["iterations"],
                                                 prompts_per_step=GRPO["prompts_per_step"],
                                                 samples_per_prompt=GRPO["samples_per_prompt"],
                                                 minibatch_size=GRPO["prompts_per_step"] * GRPO["samples_per_prompt"],
                                                 max_new_tokens=GRPO["max_new_tokens"], lr=GRPO["lr"],
                                                 kl_coef=GRPO["beta"],
                                                 rewards={"benchmarks.vs_trl:gold_reward": 1.0}), out),
            "grpo (TRL)": lambda out: trl_trainer("grpo", files, out),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.rounds):
            for i, (name, case) in enumerate(cases.items()):
                times[name].append(case(root / f"out{round_}_{i}"))
                print(f"round {round_ + 1}: {name:<16} {times[name][-1] * 1000:7.1f} ms/step", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    print("\nmedian time per step (GRPO: per iteration), one torch thread")
    for kind in ("sft", "dpo", "grpo"):
        ratio = median[f"{kind} (ours)"] / median[f"{kind} (TRL)"]
        ours_ms, trl_ms = median[f"{kind} (ours)"] * 1000, median[f"{kind} (TRL)"] * 1000
        print(f"  {kind:<5} ours {ours_ms:7.1f} ms   TRL {trl_ms:7.1f} ms   ours/TRL {ratio:.2f}x")
    print(f"  dpo   bare loop {median['dpo (bare loop)'] * 1000:7.1f} ms   ours/bare "
          f"{median['dpo (ours)'] / median['dpo (bare loop)']:.2f}x")


if __name__ == "__main__":
    main()
