"""The DeepSeek-R1 stage kinds besides grpo: synthetic_reasoning, rejection_sampling, distill."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from stages import reasoning_task
from stages.context import StageContext
from stages.data import load_rows, write_jsonl
from stages.kinds import get_kind
from stages.models import build_tiny_llama, build_word_tokenizer, save
from stages.rewards import accuracy_reward, format_reward, language_consistency_reward, verify_answer
from stages.runs import rejection_sampling
from stages.spec import DataInput
from stages.text import Samples
from tests.conftest import Tracker


def run_kind(kind_name: str, out: Path, inputs: dict[str, str], **params) -> tuple[dict[str, float], Tracker]:
    kind = get_kind(kind_name)
    tracker = Tracker()
    ctx = StageContext("test", kind_name, 0, kind.params(**params), {k: DataInput(path=v) for k, v in inputs.items()},
                       {name: out / rel for name, rel in kind.outputs.items()}, out, None, Accelerator(cpu=True),
                       tracker)
    try:
        return kind.load_run()(ctx), tracker
    finally:
        ctx.close()


def tiny_model(texts: list[str], out: Path, hidden: int = 32) -> Path:
    tokenizer = build_word_tokenizer(texts)
    torch.manual_seed(0)
    save(build_tiny_llama(len(tokenizer), hidden, 1, 2, 64, tokenizer.pad_token_id, tokenizer.bos_token_id,
                          tokenizer.eos_token_id), tokenizer, out)
    return out


def solve(prompt: str) -> int:
    """The answer of a problem read back from its words: start amount, then a gain or a loss twice."""
    words = prompt.split()
    signs = {w: 1 for ws in reasoning_task.GAINS.values() for w in ws} | \
            {w: -1 for ws in reasoning_task.LOSSES.values() for w in ws}
    changes = [signs[w] * int(words[i + 1]) for i, w in enumerate(words) if w in signs]
    return int(words[2]) + sum(changes)


# --- synthetic_reasoning ----------------------------------------------------------------------------------------


def test_synthetic_reasoning_writes_verifiable_data(tmp_path):
    metrics, _ = run_kind("synthetic_reasoning", tmp_path, {}, pretrain_documents=200, general_documents=50,
                          rl_prompts=100, eval_prompts=20, general_prompts=30)
    columns = {"pretrain": {"text"}, "prompts": {"prompt", "answer", "language", "task"},
               "eval": {"prompt", "answer", "language", "task"}, "general": {"prompt", "response", "language", "task"},
               "general_prompts": {"prompt", "language", "task"}, "mixed_prompts": {"prompt", "language", "task"}}
    outputs = get_kind("synthetic_reasoning").outputs
    rows = {name: load_rows(DataInput(path=str(tmp_path / rel))) for name, rel in outputs.items()}
    for name, expected in columns.items():
        assert rows[name] and expected <= set(rows[name][0]), name
    for row in rows["prompts"] + rows["eval"]:
        assert verify_answer(str(solve(row["prompt"])), row["answer"])
        assert 0 <= int(row["answer"]) <= reasoning_task.MAX_VALUE
    assert {r["language"] for r in rows["prompts"]} == {"en", "el"}
    assert {r["task"] for r in rows["mixed_prompts"]} == {"reasoning", "general"}
    assert len(rows["pretrain"]) == metrics["pretrain_documents"] == 250


def test_clean_solution_scores_full_marks_and_sloppy_ones_do_not():
    rng = random.Random(0)
    problem = reasoning_task.make_problem(rng, "el")
    clean = reasoning_task.solution(problem["steps"], "el", rng)
    assert clean.split()[0] == "<think>" and clean.split()[-1] == "</answer>"
    assert accuracy_reward([clean], [problem["answer"]]) == [1.0]
    assert format_reward([clean]) == [1.0]
    assert language_consistency_reward([clean], language=["el"]) == [1.0]
    assert [r for _, r in reasoning_task.step_rewards(clean.split())] == [1.0, 1.0]
    mixed = reasoning_task.solution(problem["steps"], "el", rng, mix_rate=1.0)
    assert language_consistency_reward([mixed], language=["el"]) == [0.0]
    sloppy = [reasoning_task.solution(problem["steps"], "el", rng, 0.5, 0.5) for _ in range(50)]
    assert 0.2 < sum(accuracy_reward(sloppy, [problem["answer"]] * 50)) / 50 < 0.9
    assert 0.2 < sum(format_reward(sloppy)) / 50 < 0.9


def test_general_labeler_ranks_by_gold_score():
    ranks = reasoning_task.rank_general("name two fruits", ["apple pear", "apple red", "μηλο συκο", "apple pear"])
    assert ranks == [0, 1, 2, 0]


# --- rejection_sampling ---------------------------------------------------------------------------------------

GOOD = "<think> 2 plus 3 is 5 , 5 minus 1 is 4 </think> <answer> 4 </answer>"
WRONG = "<think> 2 plus 3 is 6 , 6 minus 1 is 5 </think> <answer> 5 </answer>"
UNFORMATTED = "2 plus 3 is 5 , 5 minus 1 is 4 <answer> 4 </answer>"
MIXED = "<think> 2 συν 3 ειναι 5 , 5 minus 1 is 4 </think> <answer> 4 </answer>"
LOOP = "<think> 2 plus 3 is 5 2 plus 3 is 5 2 plus 3 is 5 </think> <answer> 4 </answer>"


@pytest.mark.parametrize("name, expected", [
    ("correct", [True, False, True, True, True, True]),
    ("formatted", [True, True, False, True, True, True]),
    ("language_consistent", [True, True, True, False, True, True]),
    ("not_repetitive", [True, True, True, True, False, True]),
    ("dedup", [True, True, True, True, True, False]),
])
def test_each_filter(name, expected):
    completions = [GOOD, WRONG, UNFORMATTED, MIXED, LOOP, GOOD]
    columns = {"prompt": ["q"] * 6, "answer": ["4"] * 6, "language": ["en"] * 6}
    p = rejection_sampling.Params(filters=[name])
    assert rejection_sampling.FILTERS[name](completions, columns, p) == expected
    keep, rates = rejection_sampling.accept(completions, columns, p)
    assert keep == expected and rates == {f"pass_{name}": sum(expected) / 6}


@pytest.mark.parametrize("verifier, params, expected", [
    ("accuracy", {}, [True, False, False, False]),  # the built-in: <answer> tags or \\boxed{}
    ("math_verify", {"mode": "strict"}, [True, False, False, False]),
    ("math_verify", {"mode": "lenient"}, [True, False, True, False]),
    ("reasoning_gym", {"mode": "lenient"}, [True, False, True, False]),
])
def test_correct_filter_by_a_named_verifier(verifier, params, expected):
    completions = ["<answer> 42 </answer>", "<answer> 41 </answer>", "17 + 25 = 42", "I do not know"]
    row = {"prompt": "17 + 25 =", "answer": "42", "task": "chain_sum",
           "metadata": '{"expression": "17 + 25", "num_terms": 2}'}
    columns = {key: [value] * 4 for key, value in row.items()}
    p = rejection_sampling.Params(filters=["correct"], verifier=verifier, verifier_params=params)
    assert rejection_sampling.FILTERS["correct"](completions, columns, p) == expected


def test_correct_filter_threshold_and_bad_verifiers():
    columns = {"prompt": ["q"] * 2, "answer": ["2"] * 2}
    p = rejection_sampling.Params(verifier="tests.test_r1_kinds:half_credit", min_score=0.5)
    assert rejection_sampling.FILTERS["correct"](["a", "b"], columns, p) == [True, True]
    p = p.model_copy(update={"min_score": 0.6})
    assert rejection_sampling.FILTERS["correct"](["a", "b"], columns, p) == [False, False]
    with pytest.raises(ValueError, match="unknown reward 'math_verfy'"):
        rejection_sampling.Params(verifier="math_verfy")
    with pytest.raises(ValueError, match="mode must be one of strict, lenient"):
        rejection_sampling.Params(verifier="math_verify", verifier_params={"mode": "loose"})


def half_credit(completions: list[str], **_) -> list[float]:
    return [0.5] * len(completions)


def test_rejection_sampling_run(tmp_path, monkeypatch):
    write_jsonl([{"prompt": f"q{i}", "answer": "4", "language": "en"} for i in range(3)], tmp_path / "prompts.jsonl")
    write_jsonl([{"prompt": "name two fruits", "response": "apple pear"}], tmp_path / "general.jsonl")
    policy = tiny_model(["q0 q1 q2"], tmp_path / "policy")
    # two samples per prompt: q0 [GOOD, GOOD (a duplicate)], q1 [WRONG, WRONG], q2 [GOOD, MIXED]
    completions = [GOOD, GOOD, WRONG, WRONG, GOOD, MIXED]
    monkeypatch.setattr(rejection_sampling, "sample",
                        lambda model, tokenizer, prompts, *args, **kwargs: Samples(prompts, completions, None, []))
    metrics, _ = run_kind("rejection_sampling", tmp_path / "rs",
                          {"policy": str(policy), "prompts": str(tmp_path / "prompts.jsonl"),
                           "general": str(tmp_path / "general.jsonl")}, samples_per_prompt=2)
    assert metrics["acceptance_rate"] == pytest.approx(2 / 6)
    assert (metrics["kept"], metrics["prompts_without_sample"], metrics["general"]) == (2, 1, 1)
    assert metrics["pass_correct"] == pytest.approx(4 / 6)
    rows = load_rows(DataInput(path=str(tmp_path / "rs" / "sft.jsonl")))
    assert rows == [{"prompt": "q0", "response": GOOD}, {"prompt": "q2", "response": GOOD},
                    {"prompt": "name two fruits", "response": "apple pear"}]



def test_rejection_sampling_shows_demonstrations_when_sampling_and_keeps_the_prompt_without_them(tmp_path,
                                                                                                 monkeypatch):
    system = {"role": "system", "content": "answer in tags"}
    write_jsonl([{"prompt": [system, {"role": "user", "content": "q0"}], "answer": "4", "language": "en"}],
                tmp_path / "prompts.jsonl")
    policy = tiny_model(["q0 q1"], tmp_path / "policy")
    demonstrations = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": GOOD}]
    shown = []

    def fake_sample(model, tokenizer, prompts, *args, **kwargs):
        shown.extend(prompts)
        return Samples(prompts, [GOOD] * len(prompts), None, [])

    monkeypatch.setattr(rejection_sampling, "sample", fake_sample)
    run_kind("rejection_sampling", tmp_path / "rs", {"policy": str(policy), "prompts": str(tmp_path / "prompts.jsonl")},
             samples_per_prompt=1, demonstrations=demonstrations)
    assert shown == [[system, *demonstrations, {"role": "user", "content": "q0"}]]  # after the system turn
    rows = load_rows(DataInput(path=str(tmp_path / "rs" / "sft.jsonl")))
    assert rows == [{"prompt": [system, {"role": "user", "content": "q0"}], "response": GOOD}]


@pytest.mark.parametrize("turns, error", [
    ([{"role": "assistant", "content": "a"}], "turn 1 must be {role: user"),
    ([{"role": "user", "content": "q"}], "the last demonstration turn must be the assistant's"),
    ([{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}], "turn 1 must be"),
])
def test_demonstrations_must_alternate_user_then_assistant(turns, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        rejection_sampling.Params(demonstrations=turns)

# --- distill ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        problem = reasoning_task.make_problem(rng, rng.choice(reasoning_task.LANGUAGES))
        rows.append({"prompt": problem["prompt"], "response": reasoning_task.solution(problem["steps"],
                                                                                     problem["language"], rng)})
    write_jsonl(rows, root / "traces.jsonl")
    texts = [r["prompt"] + " " + r["response"] for r in rows]
    tiny_model(texts, root / "student", hidden=16)
    tiny_model(texts, root / "teacher", hidden=32)
    tiny_model(texts + ["an extra word"], root / "other")
    return root


def test_distill_trains_the_student(traces, tmp_path):
    inputs = {"student": str(traces / "student"), "data": str(traces / "traces.jsonl"),
              "teacher": str(traces / "teacher")}
    metrics, tracker = run_kind("distill", tmp_path, inputs, epochs=4, batch_size=16, lr=1e-2, kd_coef=0.5)
    losses = [m["loss"] for m in tracker.logged]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert "kd_loss" in tracker.logged[0] and "eval_loss" in metrics
    assert (tmp_path / "model" / "config.json").exists()


def test_cosine_schedule_sets_each_steps_learning_rate(traces, tmp_path):
    inputs = {"student": str(traces / "student"), "data": str(traces / "traces.jsonl")}
    _, tracker = run_kind("distill", tmp_path, inputs, epochs=2, batch_size=16, lr=1e-2, lr_scheduler="cosine",
                          warmup_ratio=0.25)
    rates = [m["lr"] for m in tracker.logged]
    total, warmup = 8, 2  # 58 training rows (6 held out) in batches of 16: 4 steps an epoch; ceil(0.25 * 8)
    # linear warm-up from 0, then half a cosine period down to 0: lr · ½(1 + cos(π (s − warmup) / (total − warmup)))
    expected = [1e-2 * s / warmup if s < warmup else
                1e-2 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(total)]
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_distill_refuses_kd_across_vocabularies(traces, tmp_path):
    inputs = {"student": str(traces / "student"), "data": str(traces / "traces.jsonl"),
              "teacher": str(traces / "other")}
    with pytest.raises(ValueError, match="share a vocabulary"):
        run_kind("distill", tmp_path, inputs, kd_coef=0.5)
    del inputs["teacher"]
    with pytest.raises(ValueError, match="needs the `teacher` input"):
        run_kind("distill", tmp_path, inputs, kd_coef=0.5)


def test_held_out_loss_is_the_one_batch_token_mean_however_batched(tiny_model_dir: Path):
    from stages.models import load_policy, load_tokenizer
    from stages.text import encode_row, pair_batch
    from stages.training import held_out_loss, sft_loss

    model, tokenizer = load_policy(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    rows = [encode_row(tokenizer, {"prompt": "name " * (i % 3 + 1), "response": "cat dog " * (i % 4 + 1)})
            for i in range(7)]  # responses of 3 to 9 tokens: a per-batch mean of means would differ

    def batch(part: list):
        return pair_batch([q for q, _, _ in part], [r for _, r, _ in part], tokenizer.pad_token_id)

    with torch.no_grad():
        one_batch = sft_loss(model, batch(rows)).item()
    for size in (1, 2, 3, 7):
        batched = held_out_loss(model, (batch(rows[s:s + size]) for s in range(0, len(rows), size)))
        assert batched == pytest.approx(one_batch, rel=1e-6)
