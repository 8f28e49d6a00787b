"""Outcome verifiers (Cobbe et al. 2021): the `label_outcomes` kind (sampled solutions labelled by a verifier
reward), the `verifier` kind (an ORM trained with BCE), and the loss and metric they rest on."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages.algorithms import binary_auc, masked_bce_loss
from stages.data import load_rows, write_jsonl
from stages.models import load_tokenizer
from stages.rewards import accuracy_reward, build_reward
from stages.runs import label_outcomes, verifier
from stages.spec import DataInput
from stages.text import Samples, encode_prompt, encode_response
from stages.verifiers import load_verifier, outcome_batch
from tests.test_r1_kinds import run_kind, tiny_model

# --- masked_bce_loss and binary_auc -----------------------------------------------------------------------------


def test_masked_bce_loss_is_the_mean_over_the_masked_positions():
    logits = torch.tensor([[0.0, 2.0, 7.0], [-1.0, 5.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.5]])
    mask = torch.tensor([[1, 0, 0], [1, 0, 1]])
    # -log σ(0) = log 2; -log σ(-1) = log(1 + e); soft target 0.5 at -3: log(1 + e^3) - 0.5 · 3
    expected = (math.log(2) + math.log(1 + math.e) + math.log(1 + math.exp(3)) - 1.5) / 3
    assert masked_bce_loss(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)
    assert masked_bce_loss(logits, targets, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("scores, labels, expected", [
    ([0.9, 0.1], [1, 0], 1.0),
    ([0.1, 0.9], [1, 0], 0.0),
    ([0.5, 0.5], [1, 0], 0.5),  # a tie counts one half
    ([0.8, 0.4, 0.6, 0.2], [1, 1, 0, 0], 0.75),  # 3 of the 4 (positive, negative) pairs ordered right
    ([0.7, 0.3, 0.3, 0.1], [1, 1, 0, 0], 0.875),  # 3 right, 1 tied
])
def test_binary_auc(scores, labels, expected):
    assert binary_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)


def test_binary_auc_needs_both_classes():
    assert math.isnan(binary_auc(torch.tensor([0.2, 0.4]), torch.tensor([1, 1])))


# --- label_outcomes ---------------------------------------------------------------------------------------------

RIGHT = "<think> 2 plus 3 is 5 </think> <answer> 5 </answer>"
WRONG = "<think> 2 plus 3 is 6 </think> <answer> 6 </answer>"


def bonus_verifier(completions: list[str], answer: list[str], bonus: list[int], **_) -> list[float]:
    """Right answer: 1; wrong: the row's `bonus` column (so min_score and the extra columns both matter)."""
    return [1.0 if r == 1.0 else float(b) for r, b in zip(accuracy_reward(completions, answer), bonus)]


def test_label_outcomes_labels_by_the_verifier_and_splits_by_prompt(tmp_path, monkeypatch):
    prompts = [{"prompt": f"q{i}", "answer": "5", "bonus": int(i == 4), "language": "en"} for i in range(5)]
    write_jsonl(prompts, tmp_path / "prompts.jsonl")
    policy = tiny_model(["q0 q1 q2 q3 q4"], tmp_path / "policy")
    outcome = {"q0": [RIGHT, RIGHT], "q1": [RIGHT, WRONG], "q2": [WRONG, WRONG], "q3": [WRONG, RIGHT],
               "q4": [WRONG, WRONG]}  # q4's wrong answers get the bonus: correct at min_score 1
    sampled = []

    def fake_sample(model, tokenizer, shown, *args, **kwargs):
        sampled.extend(shown)
        return Samples(shown, [outcome[q][i % 2] for i, q in enumerate(shown)], None, [])

    monkeypatch.setattr(label_outcomes, "sample", fake_sample)
    metrics, _ = run_kind("label_outcomes", tmp_path / "lo", {"policy": str(policy),
                                                               "prompts": str(tmp_path / "prompts.jsonl")},
                          samples_per_prompt=2, eval_fraction=0.4, verifier="tests.test_verifier:bonus_verifier")
    assert sorted(sampled) == sorted(q for q in outcome for _ in range(2))
    train, held_out = (load_rows(DataInput(path=str(tmp_path / "lo" / f"{name}.jsonl"))) for name in ("train", "eval"))
    assert (len(train), len(held_out)) == (6, 4)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}  # no prompt on both sides
    for row in train + held_out:
        assert list(row)[:3] == ["prompt", "completion", "label"]
        assert {k: row[k] for k in ("answer", "bonus", "language")} == {k: v for k, v in prompts[int(row["prompt"][1])]
                                                                         .items() if k != "prompt"}
        assert row["label"] == (row["completion"] == RIGHT or row["prompt"] == "q4")
    assert metrics == {"samples": 10, "eval_samples": 4, "correct_rate": 0.6, "prompts_all_correct": 2,
                       "prompts_none_correct": 1}


def test_label_outcomes_samples_from_the_policy_deterministically(tmp_path):
    problems = [{"prompt": f"what is {a} plus {b}", "answer": str(a + b)} for a in range(3) for b in range(3)]
    write_jsonl(problems, tmp_path / "prompts.jsonl")
    policy = tiny_model(["what is plus 0 1 2 3 4"], tmp_path / "policy")  # a random policy: some answers right
    inputs = {"policy": str(policy), "prompts": str(tmp_path / "prompts.jsonl")}
    verifier = {"verifier": "math_verify", "verifier_params": {"mode": "lenient"}}  # the last number is the answer
    runs = []
    for out in ("a", "b"):
        metrics, _ = run_kind("label_outcomes", tmp_path / out, inputs, samples_per_prompt=4, prompts=5,
                              max_new_tokens=4, eval_fraction=0.2, **verifier)
        written = [load_rows(DataInput(path=str(tmp_path / out / f"{name}.jsonl"))) for name in ("train", "eval")]
        runs.append((metrics, written))
    assert runs[0] == runs[1]
    metrics, (train, held_out) = runs[0]
    assert (len(train), len(held_out), metrics["samples"]) == (16, 4, 20)
    rows = train + held_out
    scores = build_reward(verifier["verifier"], **verifier["verifier_params"])([r["completion"] for r in rows],
                                                                               answer=[r["answer"] for r in rows])
    assert [r["label"] for r in rows] == [s >= 1.0 for s in scores]
    assert 0 < metrics["correct_rate"] == sum(r["label"] for r in rows) / 20 < 1, metrics


# --- verifier ---------------------------------------------------------------------------------------------------

FILLER = ("red", "blue", "green", "pink", "cat", "dog", "fox", "owl")


def marked_rows(rng: random.Random, n: int) -> list[dict]:
    """Solutions whose correctness is written in them: `right` or `wrong` among filler words, at any place."""
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.sample(FILLER, 4)
        words.insert(rng.randrange(5), "right" if label else "wrong")
        rows.append({"prompt": "check " + " ".join(rng.sample(FILLER, 2)), "completion": " ".join(words),
                     "label": label})
    return rows


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verifier")
    rng = random.Random(0)
    write_jsonl(marked_rows(rng, 256), root / "train.jsonl")
    write_jsonl(marked_rows(rng, 64), root / "eval.jsonl")
    tiny_model(["check right wrong " + " ".join(FILLER)], root / "base")
    return root


def eval_rows(root: Path) -> list[dict]:
    return load_rows(DataInput(path=str(root / "eval.jsonl")))


@pytest.mark.parametrize("loss_on, lora", [("all_tokens", None), ("last_token", {"r": 8, "alpha": 16})])
def test_verifier_learns_and_loads_as_an_outcome_verifier(marked, tmp_path, loss_on, lora):
    inputs = {"base": str(marked / "base"), "data": str(marked / "train.jsonl"),
              "eval_data": str(marked / "eval.jsonl")}
    metrics, tracker = run_kind("verifier", tmp_path, inputs, epochs=3, batch_size=16, lr=1e-2, loss_on=loss_on,
                                lora=lora)
    assert metrics["initial_eval_auc"] < 0.75 and metrics["eval_auc"] >= 0.9, metrics
    assert metrics["eval_accuracy"] >= 0.8 and metrics["train_accuracy"] >= 0.8, metrics
    loaded = load_verifier(str(tmp_path / "model"), torch.device("cpu"), expected="outcome")
    rows = eval_rows(marked)
    scores = torch.tensor(loaded.outcome_scores([r["prompt"] for r in rows], [r["completion"] for r in rows]))
    labels = torch.tensor([r["label"] for r in rows])
    assert binary_auc(scores, labels) == pytest.approx(metrics["eval_auc"])
    assert ((scores >= 0.5) == labels).float().mean().item() == pytest.approx(metrics["eval_accuracy"])
    assert metrics["eval_positive_rate"] == pytest.approx(labels.float().mean().item())
    with pytest.raises(ValueError, match="is an outcome verifier, not a process one"):
        load_verifier(str(tmp_path / "model"), torch.device("cpu"), expected="process")
    assert not (tmp_path / "model" / "adapter_config.json").exists()  # LoRA is merged: the model dir loads alone


def test_training_rows_are_laid_out_as_outcome_batch(marked):
    tokenizer = load_tokenizer(str(marked / "base"))
    rows = eval_rows(marked)[:5]
    encoded = [(encode_prompt(tokenizer, r["prompt"]), encode_response(tokenizer, r["completion"]), r["label"])
               for r in rows]
    batch, labels = verifier.collate(encoded, tokenizer.pad_token_id)
    expected = outcome_batch(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert torch.equal(batch.ids, expected.ids) and torch.equal(batch.response_mask, expected.response_mask)
    assert labels.tolist() == [float(r["label"]) for r in rows]


class Values(torch.nn.Module):
    """A stand-in scalar-head model whose per-position outputs are one parameter [B, T], to read their gradients."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.values = torch.nn.Parameter(torch.zeros(shape))

    def forward(self, input_ids, attention_mask, position_ids):
        return SimpleNamespace(logits=self.values[..., None])


@pytest.mark.parametrize("loss_on, expected", [
    ("all_tokens", [[1, 1, 1], [1, 1, 0]]),
    ("last_token", [[0, 0, 1], [0, 1, 0]]),
])
def test_loss_only_at_the_loss_on_positions(loss_on, expected):
    batch, labels = verifier.collate([([5, 6], [7, 8, 2], True), ([5], [7, 2], False)], pad_id=0)
    assert verifier.loss_positions(batch.response_mask, loss_on).tolist() == expected
    model = Values(tuple(batch.ids.shape))
    loss, _ = verifier.outcome_loss(model, batch, labels, loss_on)
    loss.backward()
    gradient = model.values.grad[:, batch.prompt_len:]
    assert (gradient != 0).int().tolist() == expected  # no loss anywhere else (prompt, padding, other tokens)
    assert model.values.grad[:, :batch.prompt_len].abs().sum() == 0
    # at logit 0 every counted position's gradient is (σ(0) - label) / positions
    signs = torch.tensor([[-1.0], [1.0]]).expand_as(gradient)
    assert torch.allclose(gradient, signs * 0.5 / sum(map(sum, expected)) * torch.tensor(expected))


@pytest.mark.parametrize("label, error", [("yes", "label must be true or false"), (None, "label must be"),
                                          (0.5, "label must be")])
def test_verifier_refuses_a_bad_label_naming_its_line(marked, tmp_path, label, error):
    rows = [{"prompt": "check red", "completion": "right red", "label": True},
            {"prompt": "check red", "completion": "wrong red", "label": label}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=f"bad.jsonl line 2.*{error}"):
        run_kind("verifier", tmp_path / "out", {"base": str(marked / "base"), "data": str(tmp_path / "bad.jsonl")})

