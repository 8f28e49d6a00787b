"""The dpo stage kind on a tiny local Llama and an easy synthetic preference: chosen responses use "sunny" words,
rejected ones "rainy" words, so every loss should learn it and generalise to held-out prompts. And the reward model's
held-out accuracy on known scores."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest
import torch
from accelerate import Accelerator

from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import get_kind
from stages.models import build_tiny_llama, build_word_tokenizer, save
from stages.runs.dpo import Params, kto_examples, preference_pairs
from stages.spec import DataInput

GOOD = ["sunny", "warm", "bright", "calm", "clear"]
BAD = ["rainy", "cold", "dark", "stormy", "grey"]
N_PROMPTS = 40


class Tracker:
    def __init__(self):
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, step: int, metrics: dict[str, float], total: int | None = None, record: bool = True) -> None:
        self.logged.append((step, metrics))


def phrase(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choices(words, k=3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model runs fastest on one thread (and ~20x slower when 2 threads compete for busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny policy and three preference files over the same prompts: ranked (K = 3, the two rainy responses
    tied), chosen/rejected pairs, and KTO-style labelled completions."""
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(0)
    ranked, paired, labelled = [], [], []
    for i in range(N_PROMPTS):
        prompt = f"describe day d{i}"
        responses, ranks = [phrase(rng, GOOD), phrase(rng, BAD), phrase(rng, BAD)], [0, 1, 1]
        order = rng.sample(range(3), 3)
        ranked.append({"prompt": prompt, "responses": [responses[k] for k in order],
                       "ranks": [ranks[k] for k in order]})
        paired.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]})
        labelled += [{"prompt": prompt, "completion": responses[0], "label": True},
                     {"prompt": prompt, "completion": responses[1], "label": False}]
    for name, rows in (("ranked", ranked), ("paired", paired), ("labelled", labelled)):
        write_jsonl(rows, root / f"{name}.jsonl")
    write_jsonl([{"prompt": f"describe day e{i}"} for i in range(4)], root / "eval_prompts.jsonl")

    texts = [f"describe day d{i} e{i}" for i in range(N_PROMPTS)] + GOOD + BAD
    tokenizer = build_word_tokenizer(texts)
    torch.manual_seed(0)
    model = build_tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=2, max_positions=64,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    save(model, tokenizer, root / "policy")
    return root


def run_stage(root: Path, out: Path, comparisons: str = "ranked", eval_prompts: bool = False, **params):
    inputs = {"policy": DataInput(path=str(root / "policy")),
              "comparisons": DataInput(path=str(root / f"{comparisons}.jsonl"))}
    if eval_prompts:
        inputs["eval"] = DataInput(path=str(root / "eval_prompts.jsonl"))
    kind = get_kind("dpo")
    ctx = StageContext(
        pipeline="test", stage="dpo", seed=0,
        params=kind.params(**{"epochs": 4, "batch_size": 16, "lr": 3e-3, "eval_fraction": 0.25, **params}),
        inputs=inputs, outputs={name: out / rel for name, rel in kind.outputs.items()}, output_dir=out,
        model=None, accelerator=Accelerator(cpu=True), tracker=Tracker(),
    )
    torch.manual_seed(0)
    return kind.load_run()(ctx), ctx.tracker.logged


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------- data


def test_ranked_rows_become_all_non_tied_pairs():
    rows = [{"prompt": "q", "responses": ["b", "a", "c"], "ranks": [1, 0, 1]}]
    assert preference_pairs(rows) == [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                      {"prompt": "q", "chosen": "a", "rejected": "c"}]
    assert preference_pairs([{"prompt": "q", "chosen": "x", "rejected": "y"}]) == \
        [{"prompt": "q", "chosen": "x", "rejected": "y"}]


def test_labelled_rows_pair_desirable_with_undesirable_of_the_same_prompt():
    rows = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "r", "completion": "z", "label": False},
            {"prompt": "q", "completion": "b", "label": False}, {"prompt": "q", "completion": "c", "label": False}]
    assert preference_pairs(rows) == [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                      {"prompt": "q", "chosen": "a", "rejected": "c"}]


def test_kto_examples_unpair_and_draw_kl_completions_from_other_examples():
    pairs = [{"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(5)]
    examples = kto_examples(pairs, random.Random(0))
    assert [(e["prompt"], e["completion"], e["desirable"]) for e in examples] == \
        [(f"q{i}", f"{word}{i}", word == "good") for i in range(5) for word in ("good", "bad")]
    assert sorted(e["kl_completion"] for e in examples) == sorted(e["completion"] for e in examples)
    assert all(e["kl_completion"] != e["completion"] for e in examples)
    labelled = [{"prompt": "q", "completion": "a", "label": False}, {"prompt": "r", "completion": "b", "label": True}]
    assert [(e["completion"], e["desirable"], e["kl_completion"]) for e in kto_examples(labelled, random.Random(0))] \
        == [("a", False, "b"), ("b", True, "a")]


# --------------------------------------------------------------------------------------------- params


def test_params_reject_unknown_loss_and_misplaced_label_smoothing():
    with pytest.raises(pydantic.ValidationError, match="loss"):
        Params(loss="orpo")
    with pytest.raises(pydantic.ValidationError, match="cdpo"):
        Params(loss="cdpo")
    with pytest.raises(pydantic.ValidationError, match="cdpo"):
        Params(loss="sigmoid", label_smoothing=0.1)
    with pytest.raises(pydantic.ValidationError):
        Params(lr=1e-4, typo=1)
    assert Params(loss="cdpo", label_smoothing=0.1).label_smoothing == 0.1


# --------------------------------------------------------------------------------------------- the stage


def test_untrained_policy_equals_its_reference(setup, tmp_path):
    metrics, logged = run_stage(setup, tmp_path, epochs=0)
    assert logged == []
    assert abs(metrics["eval_margin"]) < 1e-4
    assert abs(metrics["kl"]) < 1e-4


@pytest.mark.parametrize("loss, extra", [("sigmoid", {}), ("ipo", {"beta": 0.5}),
                                         ("cdpo", {"label_smoothing": 0.1}), ("kto", {})])
def test_each_loss_learns_the_preference(setup, tmp_path, loss, extra):
    metrics, logged = run_stage(setup, tmp_path, loss=loss, eval_prompts=True, **extra)

    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["eval_margin"] > 0.1
    assert metrics["chosen_logps"] > metrics["rejected_logps"]
    assert math.isfinite(metrics["kl"])
    assert (tmp_path / "model" / "config.json").exists()

    first, last = logged[0][1], logged[-1][1]
    assert {"loss", "accuracy", "chosen_logps", "rejected_logps"} <= set(last)
    assert last["loss"] < first["loss"]

    # reference log-probs: one entry per training pair (KTO: per example), ten held-out prompts × 2 pairs each
    train = jsonl(tmp_path / "reference_logps" / "train.jsonl")
    held_out = jsonl(tmp_path / "reference_logps" / "eval.jsonl")
    n_pairs = (N_PROMPTS - 10) * 2
    assert len(train) == (2 * n_pairs if loss == "kto" else n_pairs)
    assert len(held_out) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    key = "ref_completion_logps" if loss == "kto" else "ref_chosen_logps"
    assert all(r[key] < 0 for r in train)


@pytest.mark.parametrize("comparisons", ["paired", "labelled"])
def test_kto_reads_pairs_and_labelled_rows(setup, tmp_path, comparisons):
    metrics, _ = run_stage(setup, tmp_path, comparisons=comparisons, loss="kto")
    assert metrics["eval_accuracy"] >= 0.9
    assert len(jsonl(tmp_path / "reference_logps" / "train.jsonl")) == (N_PROMPTS - 10) * 2


def test_reward_model_accuracy_counts_every_untied_pair(monkeypatch):
    from stages.runs import reward_model

    def last_token_id(model, ids, mask, bias=0.0):  # a known scorer: the score of a response is its token's id
        return ids.gather(1, (mask * torch.arange(ids.shape[1])).argmax(1, keepdim=True)).squeeze(1).float()

    monkeypatch.setattr(reward_model, "last_token_scores", last_token_id)
    rows = [([1], [[5], [3]], [0, 1]),  # 5 > 3: right (1 of 1 pair)
            ([1], [[2], [7]], [0, 1]),  # 2 < 7: wrong (0 of 1)
            ([1], [[9], [4], [6]], [0, 1, 2]),  # 9 > 4, 9 > 6 right, 4 < 6 wrong (2 of 3)
            ([1], [[1], [8], [8]], [0, 1, 1])]  # 1 < 8 twice: wrong; the tie is no pair (0 of 2)
    tokenizer = SimpleNamespace(pad_token_id=0)
    for batch_size in (1, 2, 8):  # 3 right of 7 pairs, however the comparisons are batched
        assert reward_model.accuracy(None, tokenizer, rows, "cpu", batch_size) == pytest.approx(3 / 7)
