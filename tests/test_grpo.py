"""The grpo stage kind on a tiny random policy: learning signal, DAPO dynamic sampling, overlong masking, params."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError

from stages import reasoning_task
from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import get_kind
from stages.models import build_tiny_llama, build_word_tokenizer, save
from stages.runs import grpo
from tests.conftest import Tracker


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, dict[str, str]]:
    """A random tiny policy whose vocabulary is the reasoning task's (Latin and Greek words), and RL prompts."""
    root = tmp_path_factory.mktemp("grpo")
    rng = random.Random(0)
    rows = [{k: v for k, v in reasoning_task.make_problem(rng, language).items() if k != "steps"}
            for language in reasoning_task.LANGUAGES for _ in range(16)]
    tokenizer = build_word_tokenizer([r["prompt"] for r in rows] + [" ".join(reasoning_task.TAGS)])
    torch.manual_seed(0)
    model = build_tiny_llama(len(tokenizer), 32, 1, 2, 64, tokenizer.pad_token_id, tokenizer.bos_token_id,
                             tokenizer.eos_token_id)
    save(model, tokenizer, root / "policy")
    write_jsonl(rows, root / "prompts.jsonl")
    return {"policy": {"path": str(root / "policy")}, "prompts": {"path": str(root / "prompts.jsonl")}}


def run_grpo(inputs, out: Path, **params) -> Tracker:
    kind = get_kind("grpo")
    tracker = Tracker()
    ctx = StageContext("test", "grpo", 0, kind.params(**params), inputs, {"model": out / "model"}, out, None,
                       Accelerator(cpu=True), tracker)
    kind.load_run()(ctx)
    return tracker


def test_grpo_raises_reward(inputs, tmp_path):
    # a random policy writes Latin and Greek words alike; the reward is the share in the prompt's script
    tracker = run_grpo(inputs, tmp_path, rewards={"language_consistency": 1.0}, iterations=10, prompts_per_step=8,
                       samples_per_prompt=8, max_new_tokens=6, lr=3e-3, kl_coef=0.0, ppo_epochs=2)
    rewards = [m["reward"] for m in tracker.logged]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert {"reward_language_consistency", "accuracy", "format_rate", "clipfrac", "entropy", "response_length",
            "dropped_groups"} <= set(tracker.logged[-1])
    assert (tmp_path / "model" / "config.json").exists()


def fake_samples(group_rewards: list[list[float]]) -> list[dict]:
    return [{"row": {"prompt": f"q{g}"}, "reward": r} for g, rewards in enumerate(group_rewards) for r in rewards]


def collect(params: grpo.Params):
    ctx = StageContext("test", "grpo", 0, params, {}, {}, Path("."), None, Accelerator(cpu=True), Tracker())
    return grpo.collect(ctx, torch.nn.Linear(1, 1), None, [{"prompt": "q"}] * 3, random.Random(0), {})


def test_dynamic_sampling_drops_groups_without_signal(monkeypatch):
    rounds = iter([[[1, 1], [0, 1], [0, 0]], [[1, 0], [1, 1], [0, 1]]])  # two rounds of 3 groups of G = 2
    monkeypatch.setattr(grpo, "roll_out", lambda *args: fake_samples(next(rounds)))
    p = grpo.Params(prompts_per_step=3, samples_per_prompt=2, dynamic_sampling=True, max_sampling_rounds=5)
    samples, dropped = collect(p)
    assert dropped == 3  # two in round 1, one in round 2; round 2 fills the batch, so no third round
    assert [s["reward"] for s in samples] == [0, 1, 1, 0, 0, 1]

    rounds = iter([[[1, 1], [0, 0], [1, 1]]] * 2)
    monkeypatch.setattr(grpo, "roll_out", lambda *args: fake_samples(next(rounds)))
    samples, dropped = collect(p.model_copy(update={"max_sampling_rounds": 2}))
    assert (samples, dropped) == ([], 6)  # capped at max_sampling_rounds

    p = p.model_copy(update={"dynamic_sampling": False})
    rounds = iter([[[1, 1], [0, 1], [0, 0]]])
    samples, dropped = collect(p)
    assert (len(samples), dropped) == (6, 0)


def test_all_groups_dropped_is_logged(inputs, tmp_path):
    # a random policy never follows the R1 template: every group scores all zeros and is dropped
    tracker = run_grpo(inputs, tmp_path, rewards={"format": 1.0}, iterations=1, prompts_per_step=4,
                       samples_per_prompt=2, max_new_tokens=4, dynamic_sampling=True, max_sampling_rounds=2)
    assert tracker.logged == [{"dropped_groups": 8}]


def test_mask_truncated_zeroes_truncated_samples(inputs):
    from stages.models import load_policy, load_tokenizer

    tokenizer, policy = load_tokenizer(inputs["policy"]["path"]), load_policy(inputs["policy"]["path"])
    p = grpo.Params(rewards={"accuracy": 1.0}, samples_per_prompt=16, max_new_tokens=3, mask_truncated=True)
    samples = grpo.roll_out(policy, tokenizer, [{"prompt": "ana has 2 cats", "answer": "2"}], p,
                            grpo.build_rewards(p, None))
    for s in samples:  # truncated = no EOS within max_new_tokens
        assert s["truncated"] == (s["response_ids"][-1] != tokenizer.eos_token_id)
    samples = [{"truncated": t} for t in (True, False, True)]
    mask = torch.ones(3, 4)
    assert grpo.loss_mask(samples, mask, True).tolist() == [[0] * 4, [1] * 4, [0] * 4]
    assert grpo.loss_mask(samples, mask, False).tolist() == [[1] * 4] * 3


def test_params_check_rewards_and_routes():
    with pytest.raises(ValidationError, match=r"unknown reward 'acuracy'; allowed: accuracy, format.*'reward_model'"):
        grpo.Params(rewards={"acuracy": 1.0})
    with pytest.raises(ValidationError, match="overlong.*no parameter"):
        grpo.Params(rewards={"overlong": 1.0}, reward_params={"overlong": {"max_len": 3}})
    with pytest.raises(ValidationError, match="in no route"):
        grpo.Params(rewards={"accuracy": 1.0, "reward_model": 1.0}, route_column="task",
                    routes={"reasoning": ["accuracy"]})
    with pytest.raises(ValidationError, match="allowed"):
        grpo.Params(advantage_estimator="gae")
    assert grpo.Params(advantage_estimator="drgrpo").agg_mode == "seq-mean-token-sum-norm"
    assert grpo.Params().agg_mode == "seq-mean-token-mean"


def test_routed_rewards_score_each_row_by_its_route():
    p = grpo.Params(rewards={"accuracy": 1.0, "reward_model": 0.5}, route_column="task",
                    routes={"reasoning": ["accuracy"], "general": ["reward_model"]})
    fns = grpo.build_rewards(p, lambda prompts, texts: [float(len(t.split())) for t in texts])
    completions = ["<answer> 4 </answer>", "a b c d"]
    columns = {"prompt": ["q1", "q2"], "answer": ["4", None], "task": ["reasoning", "general"]}
    from stages.rewards import score_components

    total, components = score_components(fns, p.rewards, completions, **columns)
    assert components == {"accuracy": [1.0, 0.0], "reward_model": [0.0, 4.0]}
    assert total == [1.0, 2.0]


def test_process_supervision(inputs, tmp_path):
    tokens = "<think> 5 plus 3 is 8 , 8 minus 2 is 7 </think> <answer> 7 </answer>".split()
    assert reasoning_task.step_rewards(tokens) == [(5, 1.0), (11, 0.0)]
    tracker = run_grpo(inputs, tmp_path, advantage="process", step_reward="arithmetic_steps", iterations=1,
                       prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, advantage_estimator="drgrpo",
                       clip_high=0.28)
    assert tracker.logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # one update: π_old = π_ref when it is scored
