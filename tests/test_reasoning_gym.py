"""The reasoning_gym data kind, its rows through jsonl back into the task's scorer, the verifier evaluators, and a
grpo stage rewarded and evaluated by the same verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError

from stages.context import StageContext
from stages.data import load_rows
from stages.kinds import get_kind
from stages.models import build_tiny_llama, build_word_tokenizer, save
from stages.registry import EVALUATORS
from stages.rewards import math_verify_reward, reasoning_gym_reward
from stages.spec import DataInput
from tests.conftest import Tracker

KIND = "stages.kinds.reasoning_gym"
CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 1-digit: repeats are common
SYSTEM = "Answer inside <answer></answer> tags."


def run_stage(kind_name: str, out: Path, inputs: dict[str, str] | None = None, stage_seed: int = 0,
              **params) -> tuple[dict[str, float], Tracker]:
    kind = get_kind(kind_name)
    tracker = Tracker()
    ctx = StageContext("test", "data", stage_seed, kind.params(**params),
                       {k: DataInput(path=v) for k, v in (inputs or {}).items()},
                       {name: out / rel for name, rel in kind.outputs.items()}, out, None, Accelerator(cpu=True),
                       tracker)
    return kind.load_run()(ctx), tracker


def columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


@pytest.fixture(scope="module")
def chain_sum(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rg")
    metrics, _ = run_stage(KIND, out, task="chain_sum", size=60, eval_size=40, config=CHAIN_SUM,
                           system_prompt=SYSTEM)
    assert metrics == {"rows": 60, "eval_rows": 40}
    return out


def test_rows_carry_chat_prompt_answer_task_and_metadata(chain_sum: Path):
    train = load_rows(DataInput(path=str(chain_sum / "prompts.jsonl")))
    held_out = load_rows(DataInput(path=str(chain_sum / "eval.jsonl")))
    assert (len(train), len(held_out)) == (60, 40)
    row = train[0]
    assert set(row) == {"prompt", "answer", "task", "metadata", "task_config"}
    system, user = row["prompt"]
    assert system == {"role": "system", "content": SYSTEM} and user["role"] == "user"
    assert user["content"].startswith("State the final answer") and row["task"] == "chain_sum"
    a, op, b = json.loads(row["metadata"])["expression"].split()
    assert str(int(a) + int(b) if op == "+" else int(a) - int(b)) == row["answer"]
    assert json.loads(row["task_config"]) == CHAIN_SUM
    # disjoint: no held-out question is a training one (1-digit sums repeat, so some generated ones were skipped)
    questions = [r["prompt"][-1]["content"] for r in train]
    held_questions = [r["prompt"][-1]["content"] for r in held_out]
    assert not set(questions) & set(held_questions) and len(set(held_questions)) == 40


def test_metadata_round_trips_into_the_tasks_scorer(chain_sum: Path):
    rows = load_rows(DataInput(path=str(chain_sum / "eval.jsonl")))
    right = [f"<answer>{r['answer']}</answer>" for r in rows]
    wrong = [f"<answer>{int(r['answer']) + 1}</answer>" for r in rows]
    assert reasoning_gym_reward(right, **columns(rows)) == [1.0] * 40
    assert reasoning_gym_reward(wrong, **columns(rows)) == [0.0] * 40
    assert math_verify_reward(right, **columns(rows)) == [1.0] * 40


def test_same_seed_same_rows_and_the_stage_seed_is_the_default(tmp_path: Path, chain_sum: Path):
    run_stage(KIND, tmp_path / "again", task="chain_sum", size=60, eval_size=40, config=CHAIN_SUM,
              system_prompt=SYSTEM)
    assert (tmp_path / "again" / "eval.jsonl").read_bytes() == (chain_sum / "eval.jsonl").read_bytes()
    run_stage(KIND, tmp_path / "seed1", stage_seed=1, task="chain_sum", size=60, eval_size=40, config=CHAIN_SUM)
    run_stage(KIND, tmp_path / "pinned", stage_seed=1, task="chain_sum", size=60, eval_size=40, config=CHAIN_SUM, seed=0)
    other, pinned = (load_rows(DataInput(path=str(tmp_path / d / "prompts.jsonl"))) for d in ("seed1", "pinned"))
    base = load_rows(DataInput(path=str(chain_sum / "prompts.jsonl")))
    assert [r["answer"] for r in pinned] == [r["answer"] for r in base] != [r["answer"] for r in other]
    assert len(other[0]["prompt"]) == 1  # no system prompt: the model's default


@pytest.mark.parametrize("params, message", [
    ({"task": "chain_sun"}, "test/data: task: unknown reasoning-gym task 'chain_sun'; did you mean chain_sum or"),
    ({"task": "chain_sum", "config": {"max_term": 2}},
     "test/data: config: task 'chain_sum' has no option max_term; options: allow_negation, max_digits, max_terms"),
    ({"task": "chain_sum", "config": {"min_terms": 5, "max_terms": 2}},
     "test/data: config: task 'chain_sum' refuses {'min_terms': 5, 'max_terms': 2}: max_terms must be >= min_terms"),
    ({"task": "chain_sum", "size": 300, "eval_size": 300, "config": CHAIN_SUM},  # 200 questions in all
     "fewer than eval_size=300 held-out questions unlike the 300 training ones"),
])
def test_bad_task_or_config_is_named_at_stage_start(tmp_path: Path, params: dict, message: str):
    with pytest.raises(ValueError) as error:
        run_stage(KIND, tmp_path, **params)
    assert message in str(error.value)


def test_params_refuse_the_stages_own_keys_in_config():
    with pytest.raises(ValidationError, match="config sets seed: use the stage's own `seed` param"):
        get_kind(KIND).params(task="chain_sum", config={"seed": 1})


# --- evaluators ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("evaluator", ["reasoning_gym", "math_verify"])
def test_evaluators_report_strict_and_lenient_accuracy(chain_sum: Path, evaluator: str):
    row = load_rows(DataInput(path=str(chain_sum / "eval.jsonl")))[0]
    answer = row["answer"]
    completions = [f"<think>easy</think><answer>{answer}</answer>",  # right, tagged, R1 template
                   f"<answer>{answer}</answer>",  # right, tagged
                   f"The answer is {answer}.",  # right, untagged
                   f"<answer>{int(answer) + 1}</answer>",  # wrong, tagged
                   "no idea"]
    metrics = EVALUATORS.load(evaluator)([row] * 5, completions)
    assert metrics == pytest.approx({"accuracy_strict": 2 / 5, "accuracy_lenient": 3 / 5, "tagged_rate": 3 / 5,
                                     "format_rate": 1 / 5, "mean_response_length": 9 / 5})


def test_grpo_rewarded_by_a_verifier_is_evaluated_by_it_before_and_after(chain_sum: Path, tmp_path: Path):
    train = load_rows(DataInput(path=str(chain_sum / "prompts.jsonl")))
    words = [r["prompt"][-1]["content"] for r in train] + [SYSTEM, "<answer> </answer> 0 1 2 3 4 5 6 7 8 9"]
    tokenizer = build_word_tokenizer(words)
    torch.manual_seed(0)
    save(build_tiny_llama(len(tokenizer), 32, 1, 2, 256, tokenizer.pad_token_id, tokenizer.bos_token_id,
                          tokenizer.eos_token_id), tokenizer, tmp_path / "policy")
    inputs = {"policy": str(tmp_path / "policy"), "prompts": str(chain_sum / "prompts.jsonl"),
              "eval": str(chain_sum / "eval.jsonl")}
    metrics, tracker = run_stage("grpo", tmp_path / "grpo", inputs, iterations=1, prompts_per_step=4,
                                 samples_per_prompt=2, max_new_tokens=4, eval_max_new_tokens=4,
                                 eval_samples_per_prompt=1, rewards={"reasoning_gym": 1.0},
                                 reward_params={"reasoning_gym": {"mode": "lenient"}})
    for prefix in ("", "initial_"):
        assert {f"{prefix}accuracy_strict", f"{prefix}accuracy_lenient", f"{prefix}format_rate"} <= set(metrics)
    assert {"accuracy", "reward_reasoning_gym"} <= set(tracker.logged[-1])
    assert "format_rate" not in tracker.logged[-1]
