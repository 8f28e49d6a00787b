"""The grpo stage kind on a tiny random policy: learning signal, DAPO dynamic sampling, overlong masking, params."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError

from stages import reasoning_task
from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import get_kind
from stages.loop import NonFinite
from stages.models import build_tiny_llama, build_word_tokenizer, save
from stages.process_rewards import rule_steps
from stages.rewards import RewardError, accuracy_reward, format_reward
from stages.rollout import HFEngine
from stages.runs import grpo
from stages.spec import DataInput
from stages.text import Generation, RolloutEngine
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
    return {"policy": DataInput(path=str(root / "policy")), "prompts": DataInput(path=str(root / "prompts.jsonl"))}


def run_grpo(inputs, out: Path, engine: RolloutEngine | None = None, **params) -> Tracker:
    kind = get_kind("grpo")
    tracker = Tracker()
    ctx = StageContext("test", "grpo", 0, kind.params(**params), inputs, {"model": out / "model"}, out, None,
                       Accelerator(cpu=True), tracker)
    if engine is not None:
        ctx.opened["engine"] = engine
    try:
        kind.load_run()(ctx)
    finally:
        ctx.close()
    return tracker


def test_grpo_raises_reward(inputs, tmp_path):
    # a random policy writes Latin and Greek words alike; the reward is the share in the prompt's script
    tracker = run_grpo(inputs, tmp_path, rewards={"language_consistency": 1.0}, iterations=10, prompts_per_step=8,
                       samples_per_prompt=8, max_new_tokens=6, lr=3e-3, kl_coef=0.0, ppo_epochs=2)
    rewards = [m["reward"] for m in tracker.logged]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert {"reward_language_consistency", "clip_fraction", "approx_kl", "ratio_mean", "entropy", "response_length",
            "dropped_groups"} <= set(tracker.logged[-1])
    assert not {"accuracy", "format_rate"} & set(tracker.logged[-1])  # no verifier, no format reward: not logged
    # means over both epochs' minibatches: the second epoch's policy has moved from π_old
    assert all(m["approx_kl"] > 0 for m in tracker.logged)
    assert (tmp_path / "model" / "config.json").exists()


class UnderconfidentEngine(HFEngine):
    """The hf engine, reporting each sampled token 4 times less likely than the trainer computes it (an engine that
    disagrees with the trainer: π_old / π_engine = 4)."""

    def generate(self, *args, **kwargs) -> list[Generation]:
        return [Generation(g.response_ids, None if g.logprobs is None else [lp - math.log(4) for lp in g.logprobs])
                for g in super().generate(*args, **kwargs)]


def test_tis_weights_each_tokens_loss_by_the_capped_engine_ratio(inputs, tmp_path):
    common = dict(rewards={"language_consistency": 1.0}, iterations=1, prompts_per_step=8, samples_per_prompt=4,
                  max_new_tokens=6, kl_coef=0.0, micro_batch_size=64)
    plain = run_grpo(inputs, tmp_path / "plain", UnderconfidentEngine(), **common).logged[0]
    weighted = run_grpo(inputs, tmp_path / "tis", UnderconfidentEngine(), rollout={"tis_cap": 2.0}, **common).logged[0]
    assert plain["pg_loss"] != 0
    assert weighted["pg_loss"] == pytest.approx(2 * plain["pg_loss"], rel=1e-4)  # every token weighted min(4, 2)
    assert weighted["logprob_gap_mean"] == pytest.approx(math.log(4), rel=1e-4) and "logprob_gap_mean" not in plain


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

    tokenizer, policy = load_tokenizer(inputs["policy"].path), load_policy(inputs["policy"].path)
    p = grpo.Params(rewards={"accuracy": 1.0}, samples_per_prompt=16, max_new_tokens=3, mask_truncated=True)
    samples = grpo.roll_out(policy, tokenizer, [{"prompt": "ana has 2 cats", "answer": "2"}], p,
                            grpo.build_rewards(p, None), "test/grpo")
    for s in samples:  # truncated = no EOS within max_new_tokens
        assert s["truncated"] == (s["response_ids"][-1] != tokenizer.eos_token_id)
    samples = [{"truncated": t} for t in (True, False, True)]
    mask = torch.ones(3, 4)
    assert grpo.loss_mask(samples, mask, True).tolist() == [[0] * 4, [1] * 4, [0] * 4]
    assert grpo.loss_mask(samples, mask, False).tolist() == [[1] * 4] * 3


def test_params_check_rewards_and_routes():
    with pytest.raises(ValidationError, match=r"unknown reward 'acuracy'; allowed: accuracy, .*format.*'reward_model'"):
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


def scored(components: dict[str, list[float]], rows: list[dict]) -> list[dict]:
    """Samples as `roll_out` returns them, with the given reward components."""
    return [{"row": row, "reward": sum(v[i] for v in components.values()), "truncated": False,
             **{f"reward_{name}": v[i] for name, v in components.items()}} for i, row in enumerate(rows)]


def test_logged_accuracy_is_the_stages_verifier():
    rows = [{"prompt": "q", "answer": "4"}] * 4
    p = grpo.Params(rewards={"format": 0.5, "math_verify": 1.0}, reward_params={"math_verify": {"mode": "lenient"}})
    metrics = grpo.rollout_metrics(scored({"format": [1, 0, 0, 0], "math_verify": [1, 1, 0, 1]}, rows), p)
    assert (metrics["accuracy"], metrics["format_rate"], metrics["reward_math_verify"]) == (0.75, 0.25, 0.75)
    p = grpo.Params(rewards={"reasoning_gym": 1.0})  # partial credit is not accuracy
    metrics = grpo.rollout_metrics(scored({"reasoning_gym": [1.0, 0.2, 0.0, 1.0]}, rows), p)
    assert metrics["accuracy"] == 0.5 and "format_rate" not in metrics
    p = grpo.Params(rewards={"language_consistency": 1.0, "tests.test_grpo:says_good": 1.0})
    metrics = grpo.rollout_metrics(scored({"language_consistency": [1] * 4, "tests.test_grpo:says_good": [0] * 4},
                                          rows), p)
    assert not {"accuracy", "format_rate"} & set(metrics)
    # routed: accuracy over the rows its verifier judges
    p = grpo.Params(rewards={"accuracy": 1.0, "reward_model": 1.0}, route_column="task",
                    routes={"reasoning": ["accuracy"], "general": ["reward_model"]})
    rows = [{"prompt": "q", "answer": "4", "task": "reasoning"}, {"prompt": "g", "answer": None, "task": "general"}]
    metrics = grpo.rollout_metrics(scored({"accuracy": [1.0, 0.0], "reward_model": [0.0, 3.0]}, rows), p)
    assert metrics["accuracy"] == 1.0


def test_a_verifier_reward_chooses_the_evaluator():
    assert grpo.Params(rewards={"reasoning_gym": 1.0, "format": 0.5}).evaluator == "reasoning_gym"
    assert grpo.Params(rewards={"format": 0.5, "math_verify": 1.0}).evaluator == "math_verify"
    assert grpo.Params(rewards={"math_verify": 1.0}, evaluator="reasoning").evaluator == "reasoning"  # told
    assert grpo.Params(rewards={"accuracy": 1.0}).evaluator is None  # the embedded task names its own
    with pytest.raises(ValidationError, match="mode must be one of strict, lenient"):
        grpo.Params(rewards={"math_verify": 1.0}, reward_params={"math_verify": {"mode": "loose"}})


def test_routed_rewards_score_each_row_by_its_route():
    p = grpo.Params(rewards={"accuracy": 1.0, "reward_model": 0.5}, route_column="task",
                    routes={"reasoning": ["accuracy"], "general": ["reward_model"]})
    fns = grpo.build_rewards(p, lambda prompts, texts: [float(len(t.split())) for t in texts])
    completions = ["<answer> 4 </answer>", "a b c d"]
    columns = {"prompt": ["q1", "q2"], "answer": ["4", None], "task": ["reasoning", "general"]}
    total, components = grpo.score("test/grpo", fns, p.rewards, completions, columns)
    assert components == {"accuracy": [1.0, 0.0], "reward_model": [0.0, 4.0]}
    assert total == [1.0, 2.0]


def test_score_weights_each_reward():
    completions = ["<think>r</think><answer>4</answer>", "<answer>4</answer>", "<think>r</think><answer>5</answer>"]
    total, parts = grpo.score("test/grpo", {"accuracy": accuracy_reward, "format": format_reward},
                              {"accuracy": 2.0, "format": 0.5}, completions, {"answer": ["4", "4", "4"]})
    assert parts == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert total == [2.5, 2.0, 0.5]


# --- a user's reward that misbehaves: named (as pipelines.yaml writes it), with the stage and the step ----------


def explodes(completions: list[str], **_) -> list[float]:
    raise RuntimeError("my reward exploded")


def says_good(completions: list[str], **_) -> list:
    return [0.5] + ["good"] * (len(completions) - 1)


def is_nan(completions: list[str], **_) -> list[float]:
    return [0.0, float("nan")] + [0.0] * (len(completions) - 2)


def one_short(completions: list[str], **_) -> list[float]:
    return [1.0] * (len(completions) - 1)


@pytest.mark.parametrize("reward, error, message", [
    ("explodes", RewardError, "reward 'tests.test_grpo:explodes' raised RuntimeError: my reward exploded"),
    ("says_good", RewardError, "reward 'tests.test_grpo:says_good' returned 'good' (str) for completion 1, "
                               "not a number"),
    ("is_nan", NonFinite, "non-finite reward 'tests.test_grpo:is_nan' completion 1=nan"),
    ("one_short", RewardError, "reward 'tests.test_grpo:one_short' returned 3 values for 4 completions"),
])
def test_a_bad_user_reward_is_named_with_the_stage_and_step(inputs, tmp_path, reward, error, message):
    with pytest.raises(error) as failure:
        run_grpo(inputs, tmp_path, rewards={"format": 1.0, f"tests.test_grpo:{reward}": 1.0}, iterations=2,
                 prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4)
    assert str(failure.value).startswith(f"test/grpo step 1/2: {message}")
    assert isinstance(failure.value, ValueError) == (error is RewardError)  # bad input: the stage exits 2, else 1
    if reward == "explodes":
        assert str(failure.value.__cause__) == "my reward exploded"


def test_call_reward_takes_any_sequence_of_real_numbers():
    assert grpo.call_reward("test/grpo", "r", lambda c, **_: (1, True, np.float32(0.5)), ["a", "b", "c"], {}) \
        == [1.0, 1.0, 0.5]
    with pytest.raises(RewardError, match=r"^test/grpo: reward 'r' returned 0.5 \(float\), not a list of 2 numbers"):
        grpo.call_reward("test/grpo", "r", lambda c, **_: 0.5, ["a", "b"], {})


def test_process_advantages_by_hand():
    tokens = "<think> 5 plus 3 is 8 , 8 minus 2 is 7 </think> <answer> 7 </answer>".split()
    assert reasoning_task.step_rewards(tokens) == [(5, 1.0), (11, 0.0)]
    # one group: A = a right step ending at token 5 and the outcome 1 at its last token 9; B = no step, outcome 0 at
    # token 2. Group rewards [1, 1, 0]: mean 2/3, unbiased std 1/sqrt(3) -> A's steps 1/sqrt(3), B's -2/sqrt(3);
    # A_t sums the normalised rewards of the steps ending at or after t
    vocab = "<think> 5 plus 3 is 8 </think> <answer> </answer> 9".split()
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda ids: [vocab[i] for i in ids])
    responses = ["<think> 5 plus 3 is 8 </think> <answer> 8 </answer>", "<answer> 9 </answer>"]
    samples = [{"response_ids": [vocab.index(w) for w in r.split()], "reward": reward}
               for r, reward in zip(responses, [1.0, 0.0])]
    for sample, steps in zip(samples, rule_steps(reasoning_task.step_rewards, tokenizer)(samples)):
        sample["steps"] = steps
    mask = torch.tensor([[1.0] * 10, [1.0] * 3 + [0.0] * 7])
    advantages = grpo.process_advantages(samples, mask, torch.tensor([0, 0]))
    s = 1 / 3 ** 0.5
    expected = torch.tensor([[2 * s] * 6 + [s] * 4, [-2 * s] * 3 + [0.0] * 7])
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)


def test_advantage_process_trains_on_process_advantages(inputs, tmp_path, monkeypatch):
    calls = []
    process_advantages = grpo.process_advantages
    monkeypatch.setattr(grpo, "process_advantages", lambda *args: calls.append(args[0]) or process_advantages(*args))
    tracker = run_grpo(inputs, tmp_path, advantage="process", step_reward="arithmetic_steps", iterations=2,
                       prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, advantage_estimator="drgrpo")
    assert [len(samples) for samples in calls] == [8, 8]  # every step's whole batch
    assert {"steps_per_sample", "step_reward_mean"} <= set(tracker.logged[-1])
