"""Math-Shepherd step labels (label_steps) and the process reward model (prm): labels from known continuations, the
loss at the step ends only, a TRL-format stepwise dataset trained unchanged, soft labels, and label_steps end to
end on a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from stages.data import load_rows, write_jsonl
from stages.distributed import seed_sampling
from stages.models import build_word_tokenizer, load_policy, load_scalar_head_model, load_tokenizer
from stages.rewards import build_reward
from stages.runs import label_steps, prm
from stages.spec import DataInput
from stages.steps import split_steps, step_token_ends
from stages.text import Generation, encode_prompt, sample
from stages.verifiers import load_verifier, step_batch
from tests.test_r1_kinds import run_kind, tiny_model

# --- label_steps: labels from known continuations ---------------------------------------------------------------


def test_soft_label_is_the_share_hard_any_and_the_last_step_the_solutions_own():
    outcomes = [[True, False, False, False], [False] * 4, [True] * 4]
    assert label_steps.step_labels(outcomes, False) == ([0.25, 0.0, 1.0, 0.0], [True, False, True, False])
    assert label_steps.step_labels(outcomes, True) == ([0.25, 0.0, 1.0, 1.0], [True, False, True, True])
    assert label_steps.step_labels([], True) == ([1.0], [True])  # one step: the solution itself


class ScriptedEngine:
    """A completer whose continuations are known: after a prefix ending in `a`, one right answer in every two
    continuations; after `b`, never. Records what it was asked."""

    name = "scripted"

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.count = tokenizer, [], 0

    def generate(self, model, tokenizer, prompt_ids, max_new_tokens, temperature, logprobs=False, what=""):
        self.calls.append((prompt_ids, max_new_tokens))
        out = []
        for row in prompt_ids:
            last = tokenizer.decode(row[-1:])
            self.count += 1
            right = last == "a" and self.count % 2
            text = "<answer> 4 </answer>" if right else "<answer> 3 </answer>"
            out.append(Generation(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]))
        return out


def test_continuations_start_at_each_step_end_and_label_it():
    tokenizer = build_word_tokenizer(["q a x , b , c <answer> 3 4 </answer>"])
    response = tokenizer("a , b , c", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = encode_prompt(tokenizer, "q")
    solution = label_steps.Solution({"prompt": "q", "answer": "4"}, prompt_ids, response, ["a", "b", "c"],
                                    step_token_ends(tokenizer, response, " , "), False)
    engine = ScriptedEngine(tokenizer)
    completer = label_steps.Completer(None, tokenizer, engine, 64)
    p = label_steps.Params(completions_per_step=4, step_separator=" , ", max_new_tokens=10)
    outcomes = label_steps.continue_steps(p, [solution], tokenizer, completer, build_reward("accuracy"))
    assert outcomes == [[[True, False, True, False], [False] * 4]]
    (rows, budget), = engine.calls  # one call for every continuation of the batch of solutions
    assert rows == [prompt_ids + response[:1]] * 4 + [prompt_ids + response[:3]] * 4  # up to each step's last token
    assert budget == 10 - 1  # the budget left after the shortest prefix
    row = label_steps.stepwise_row(solution, outcomes[0])
    assert row["labels"] == [True, False, False] and row["soft_labels"] == [0.5, 0.0, 0.0]
    assert row["completions"] == ["a", "b", "c"] and row["correct"] is False


# --- the PRM loss ------------------------------------------------------------------------------------------------

WORDS = "add the numbers we start so we are done 1 2 3 4 5 plus is ,"


def test_prm_loss_reaches_exactly_the_step_ends(tmp_path):
    path = tiny_model([WORDS], tmp_path / "base")
    tokenizer = load_tokenizer(str(path))
    model = load_scalar_head_model(str(path), tokenizer.pad_token_id)
    rows = [prm.Stepwise("add the numbers", ["we start", "2 plus 2 is 5", "so we are done"], [1.0, 0.0, 0.0],
                         [True, False, False]),
            prm.Stepwise("add the numbers", ["1 plus 1 is 2"], [1.0], [True])]
    per_row, values, positions = prm.step_values(model, tokenizer, rows, " , ", torch.device("cpu"))
    comma = tokenizer.convert_tokens_to_ids(",")
    ids = step_batch(tokenizer, [r.prompt for r in rows], [r.steps for r in rows], " , ")[0].response_ids
    assert positions == [[2, 8, 13], [5]]
    assert all(ids[i, pos] == comma for i, row in enumerate(positions) for pos in row)  # the separator after each
    values.retain_grad()
    loss = prm.prm_loss(values, positions, [r.targets for r in rows])
    loss.backward()
    _, mask = prm.step_targets(positions, [r.targets for r in rows], values.shape[1])
    assert torch.equal(values.grad != 0, mask.bool())  # the loss reaches the step ends and nothing else
    garbage = values.detach().clone()
    garbage[~mask.bool()] = 1e4
    assert prm.prm_loss(garbage, positions, [r.targets for r in rows]) == pytest.approx(loss.item())
    assert loss.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(
        torch.cat(per_row), torch.tensor([1.0, 0.0, 0.0, 1.0])).item())  # a mean over the 4 steps


def test_first_error_metrics_follow_processbench():
    probabilities = [[0.9, 0.2, 0.1], [0.9, 0.8, 0.3], [0.9, 0.9], [0.9, 0.4]]
    labels = [[True, False, False], [True, False, False], [True, True], [True, True]]
    metrics = prm.first_error_metrics("eval_", probabilities, labels)
    # erroneous: first error found at step 1 once, at step 2 once; correct: one called correct, one not
    assert metrics == {"eval_first_error_accuracy_erroneous": 0.5, "eval_first_error_accuracy_correct": 0.5,
                       "eval_first_error_f1": 0.5}
    assert prm.first_error_metrics("", [[0.9]], [[True]]) == {"first_error_accuracy_correct": 1.0}


# --- prm on a TRL-format stepwise dataset ------------------------------------------------------------------------

FILLER = ["we start", "we add the numbers", "so we are done"]
FACTS = [("2 plus 2 is 4", "2 plus 2 is 5"), ("1 plus 1 is 2", "1 plus 1 is 3")]


def stepwise_rows(n: int, seed: int) -> list[dict]:
    """Rows exactly like trl-lib/math_shepherd's: {prompt, completions, labels} and nothing else. A step is wrong
    iff it states a wrong sum; as in Math-Shepherd, every step from the first wrong one on is labelled false."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        steps = rng.sample(FILLER, 2)
        for _ in range(rng.randint(1, 2)):
            right, wrong = rng.choice(FACTS)
            steps.insert(rng.randint(0, len(steps)), wrong if rng.random() < 0.4 else right)
        wrong_at = next((i for i, s in enumerate(steps) if s in {w for _, w in FACTS}), len(steps))
        rows.append({"prompt": "add the numbers", "completions": steps,
                     "labels": [i < wrong_at for i in range(len(steps))]})
    return rows


def write_stepwise(tmp_path: Path) -> tuple[Path, Path]:
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(stepwise_rows(160, 0), train)
    write_jsonl(stepwise_rows(60, 1), held_out)
    return train, held_out


def test_prm_trains_on_a_trl_stepwise_dataset(tmp_path):
    train, held_out = write_stepwise(tmp_path)
    assert set(json.loads(train.read_text().splitlines()[0])) == {"prompt", "completions", "labels"}
    base = tiny_model([WORDS], tmp_path / "base")
    metrics, _ = run_kind("prm", tmp_path / "out", {"base": str(base), "data": str(train), "eval_data": str(held_out)},
                          epochs=3, lr=5e-3, batch_size=16, micro_batch_size=16)
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["eval_step_auc"] >= 0.9 > metrics["initial_eval_step_auc"]
    assert metrics["eval_step_accuracy"] >= 0.85 and metrics["eval_first_error_f1"] >= 0.8
    verifier = load_verifier(str(tmp_path / "out" / "model"), torch.device("cpu"), expected="process")
    assert verifier.separator == "\n"
    rows = load_rows(DataInput(path=str(held_out)))
    scores = verifier.step_scores([r["prompt"] for r in rows], ["\n".join(r["completions"]) for r in rows])
    correct = [(s >= 0.5) == label for row, ss in zip(rows, scores) for s, label in zip(ss, row["labels"])]
    assert sum(correct) / len(correct) == pytest.approx(metrics["eval_step_accuracy"])  # the saved model is the one


def test_prm_trains_on_soft_labels_and_refuses_them_missing(tmp_path):
    train, held_out = write_stepwise(tmp_path)
    base = tiny_model([WORDS], tmp_path / "base")
    inputs = {"base": str(base), "data": str(train), "eval_data": str(held_out)}
    with pytest.raises(ValueError, match=r"train.jsonl line 1: no 'soft_labels' column"):
        run_kind("prm", tmp_path / "refused", inputs, labels="soft")
    soft = tmp_path / "soft.jsonl"
    write_jsonl([row | {"soft_labels": [0.75 if label else 0.0 for label in row["labels"]]}
                 for row in load_rows(DataInput(path=str(train)))], soft)
    metrics, _ = run_kind("prm", tmp_path / "out", inputs | {"data": str(soft)}, labels="soft", epochs=3, lr=5e-3,
                          batch_size=16, micro_batch_size=16, lora={"r": 4, "merge": True})
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["eval_step_auc"] >= 0.9
    load_verifier(str(tmp_path / "out" / "model"), torch.device("cpu"), expected="process")


# --- label_steps end to end --------------------------------------------------------------------------------------

def last_number(completions: list[str], answer: list[str], **_) -> list[float]:
    """A lenient verifier for an untrained model: the last number of the completion is the answer."""
    return [float([w for w in c.split() if w.isdigit()][-1:] == [a]) for c, a in zip(completions, answer)]


PROBLEMS = [("what is 2 plus 2", "4"), ("what is 1 plus 2", "3"), ("what is 3 plus 1", "4"),
            ("what is 1 plus 1", "2"), ("what is 2 plus 1", "3"), ("what is 3 plus 2", "5")]


def test_label_steps_writes_stepwise_rows_of_the_sampled_solutions(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": q, "answer": a} for q, a in PROBLEMS], prompts)
    policy = tiny_model(["what is plus , <answer> </answer> 1 2 3 4 5"], tmp_path / "policy")
    params = dict(samples_per_prompt=3, completions_per_step=2, step_separator=" , ", max_new_tokens=16,
                  eval_fraction=0.34, verifier="tests.test_prm:last_number")
    metrics, _ = run_kind("label_steps", tmp_path / "out", {"policy": str(policy), "prompts": str(prompts)}, **params)
    print(metrics)
    assert 0 < metrics["step_positive_rate"] < 1
    train, held_out = (load_rows(DataInput(path=str(tmp_path / "out" / f"{name}.jsonl"))) for name in ("train", "eval"))
    rows = held_out + train  # the held-out prompts come first in the seed's order
    assert {r["prompt"] for r in held_out}.isdisjoint(r["prompt"] for r in train) and len(held_out) == 2 * 3
    # the rows are the policy's own solutions, split at the separator: sample them again from the same seed
    model, tokenizer = load_policy(str(policy)), load_tokenizer(str(policy))
    seed_sampling(0, Accelerator(cpu=True))
    order = random.Random(0).sample(range(len(PROBLEMS)), len(PROBLEMS))
    solutions = sample(model, tokenizer, [PROBLEMS[i][0] for i in order for _ in range(3)], 16).completions
    steps = [split_steps(s, " , ") for s in solutions]
    assert [r["completions"] for r in rows] == [s for s in steps if s]
    assert any(len(s) > 1 for s in steps)
    for row, solution in zip(rows, [s for s, st in zip(solutions, steps) if st]):
        assert " , ".join(row["completions"]) == " , ".join(split_steps(solution, " , "))
        assert len(row["labels"]) == len(row["soft_labels"]) == len(row["completions"])
        assert row["labels"][:-1] == [s > 0 for s in row["soft_labels"][:-1]]
        assert row["labels"][-1] == row["correct"] == (last_number([solution], [row["answer"]]) == [1.0])
        assert all(s in (0.0, 0.5, 1.0) for s in row["soft_labels"])
    assert metrics["solutions"] == len(rows) and metrics["steps"] == sum(len(r["labels"]) for r in rows)
    assert metrics["continuation_samples"] == 2 * (metrics["steps"] - metrics["solutions"])
    again, _ = run_kind("label_steps", tmp_path / "again", {"policy": str(policy), "prompts": str(prompts)}, **params)
    assert again == metrics and (tmp_path / "again" / "train.jsonl").read_bytes() == \
        (tmp_path / "out" / "train.jsonl").read_bytes()  # deterministic given the seed
    # a separate completer (here a copy of the policy, sampling in the stage) continues the same solutions
    separate, _ = run_kind("label_steps", tmp_path / "separate", {"policy": str(policy), "prompts": str(prompts),
                                                                  "completer": str(policy)}, **params)
    rows = load_rows(DataInput(path=str(tmp_path / "separate" / "eval.jsonl"))) + \
        load_rows(DataInput(path=str(tmp_path / "separate" / "train.jsonl")))
    assert [r["completions"] for r in rows] == [s for s in steps if s]
    assert separate["continuation_samples"] == metrics["continuation_samples"]
