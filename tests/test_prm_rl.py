"""RL against a trained process reward model: GRPO process supervision with `step_reward: prm` (DeepSeekMath
§4.1.3) and PPO with the PRM's step scores as token rewards (Math-Shepherd §4)."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages.algorithms import ADVANTAGE_ESTIMATORS
from stages.data import write_jsonl
from stages.models import build_word_tokenizer, load_scalar_head_model, load_tokenizer, save
from stages.process_rewards import prm_step_rewards, prm_steps, step_token_rewards
from stages.runs import grpo, ppo
from stages.steps import split_steps
from stages.verifiers import load_verifier, verifier_config
from tests.test_r1_kinds import run_kind, tiny_model

SEPARATOR = " , "


# --- the PRM's step scores on the policy's tokens ---------------------------------------------------------------


def stub_prm(scores: dict[str, float], seen: list[str]) -> SimpleNamespace:
    """A Verifier-like PRM scoring each step by its text, recording the solutions it is shown."""
    def step_scores(prompts: list, completions: list[str]) -> list[list[float]]:
        seen.extend(completions)
        return [[scores[step] for step in split_steps(c, SEPARATOR)] for c in completions]

    return SimpleNamespace(separator=SEPARATOR, step_scores=step_scores)


def test_process_advantages_put_the_prm_scores_on_the_step_ends_and_keep_the_outcome():
    texts = ["<think> 5 plus 3 is 8 , 8 minus 2 is 7 </think> <answer> 7 </answer>", "<answer> 9 </answer>"]
    tokenizer = build_word_tokenizer(texts + [SEPARATOR])
    seen: list[str] = []
    prm = stub_prm({"<think> 5 plus 3 is 8": 0.9, "8 minus 2 is 7 </think> <answer> 7 </answer>": 0.2,
                    "<answer> 9 </answer>": 0.5}, seen)
    samples = [{"row": {"prompt": "q"}, "response_ids": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id],
                "reward": reward} for t, reward in zip(texts, [1.0, 0.0])]
    steps = prm_steps(prm, tokenizer)(samples)
    assert seen == texts  # the PRM reads the decoded response
    # A: "8" (token 5) ends step 1, the EOS (token 16) step 2; B: one step ending on its EOS (token 3)
    assert steps == [[(5, 0.9), (16, 0.2)], [(3, 0.5)]]
    for sample, row in zip(samples, steps):
        sample["steps"] = row
    mask = torch.tensor([[1.0] * 17, [1.0] * 4 + [0.0] * 13])
    advantages = grpo.process_advantages(samples, mask, torch.tensor([0, 0]))
    # oracle: the group's steps are A's 0.9, 0.2 and outcome 1.0 and B's 0.5 and outcome 0.0, normalised together;
    # a token's advantage sums the normalised rewards of its sample's steps ending at or after it
    step_rewards = [0.9, 0.2, 1.0, 0.5, 0.0]
    mean, std = statistics.mean(step_rewards), statistics.stdev(step_rewards)
    n = {r: (r - mean) / (std + 1e-6) for r in step_rewards}
    expected = torch.tensor([[n[0.9] + n[0.2] + n[1.0]] * 6 + [n[0.2] + n[1.0]] * 11,
                             [n[0.5] + n[0.0]] * 4 + [0.0] * 13])
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)


def test_a_step_count_mismatch_is_an_error_not_a_misplaced_score():
    tokenizer = build_word_tokenizer(["a b , c"])
    prm = SimpleNamespace(separator=SEPARATOR, step_scores=lambda prompts, texts: [[0.5]])
    with pytest.raises(RuntimeError, match="the PRM scored 1 steps but 2 end on the policy's tokens"):
        prm_step_rewards(prm, tokenizer, ["q"], [tokenizer("a b , c")["input_ids"]])


def test_step_token_rewards_by_hand():
    rewards = step_token_rewards([[(1, 0.5), (3, 0.25)], [], [(0, 1.0), (0, 2.0)]], 4)
    assert rewards.tolist() == [[0, 0.5, 0, 0.25], [0, 0, 0, 0], [3.0, 0, 0, 0]]


# --- GRPO and PPO stages with a tiny trained-format PRM ---------------------------------------------------------


def scalar_head(policy: Path, out: Path, config: dict | None = None) -> Path:
    """The tiny policy with a scalar head, saved as a reward model or, with a verifier `config`, a PRM."""
    tokenizer = load_tokenizer(str(policy))
    model = load_scalar_head_model(str(policy), tokenizer.pad_token_id)
    model.config.update(config or {})
    save(model, tokenizer, out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A random tiny policy over a few words and the step separator (so that its samples have several steps), a
    reward model and a PRM made from it, and prompts."""
    root = tmp_path_factory.mktemp("prm_rl")
    policy = tiny_model(["a b c d , q r"], root / "policy")
    write_jsonl([{"prompt": f"q {w}"} for w in "abcd"], root / "prompts.jsonl")
    return {"policy": str(policy), "prompts": str(root / "prompts.jsonl"),
            "reward": str(scalar_head(policy, root / "reward")),
            "prm": str(scalar_head(policy, root / "prm", verifier_config("process", SEPARATOR)))}


def test_grpo_with_step_reward_prm_trains_on_the_prms_scores(models, tmp_path, monkeypatch):
    seen = []
    process_advantages = grpo.process_advantages
    monkeypatch.setattr(grpo, "process_advantages", lambda *args: seen.append(args[0]) or process_advantages(*args))
    inputs = {k: models[k] for k in ("policy", "prompts", "prm")}
    _, tracker = run_kind("grpo", tmp_path, inputs, rewards={"format": 1.0}, advantage="process",
                          step_reward="prm", iterations=2, prompts_per_step=2, samples_per_prompt=4,
                          max_new_tokens=10, kl_coef=0.0)
    assert len(seen) == 2 and all(len(samples) == 8 for samples in seen)
    # each sample's steps are the PRM's scores of its decoded response, on increasing tokens, the last on its EOS
    prm, tokenizer = load_verifier(models["prm"], torch.device("cpu"), expected="process"), load_tokenizer(
        models["policy"])
    samples = seen[-1]
    texts = [tokenizer.decode(s["response_ids"], skip_special_tokens=True) for s in samples]
    scores = prm.step_scores([s["row"]["prompt"] for s in samples], texts)
    for sample, row in zip(samples, scores):
        ends = [end for end, _ in sample["steps"]]
        assert [score for _, score in sample["steps"]] == pytest.approx(row, abs=1e-6)
        assert ends == sorted(set(ends)) and ends[-1:] in ([], [len(sample["response_ids"]) - 1])
    assert max(len(row) for row in scores) >= 2  # several steps: the step ends are exercised
    logged = tracker.logged[-1]
    assert 0 < logged["prm_step_score_mean"] < 1
    assert logged["steps_per_sample"] == pytest.approx(sum(map(len, scores)) / len(scores))
    assert (tmp_path / "model" / "config.json").exists()


@pytest.mark.parametrize("step_reward, inputs, message", [
    ("prm", ("policy", "prompts"), "step_reward: prm and the `prm` input go together"),
    ("arithmetic_steps", ("policy", "prompts", "prm"), "step_reward: prm and the `prm` input go together"),
])
def test_step_reward_prm_and_the_prm_input_go_together(models, tmp_path, step_reward, inputs, message):
    with pytest.raises(ValueError, match=message):
        run_kind("grpo", tmp_path, {k: models[k] for k in inputs}, advantage="process", step_reward=step_reward)


def test_unknown_step_reward_names_prm_too():
    with pytest.raises(ValueError, match="unknown step reward 'prn'.*or 'prm'"):
        grpo.Params(advantage="process", step_reward="prn")
    with pytest.raises(ValueError, match="advantage: process needs a step_reward"):
        grpo.Params(advantage="process")


def test_ppo_token_rewards_carry_the_prm_scores_at_the_step_ends(models, tmp_path, monkeypatch):
    captured = {}
    gae = ADVANTAGE_ESTIMATORS["gae"]
    step_rewards = ppo.prm_step_rewards

    def capture_steps(*args):
        captured["steps"] = step_rewards(*args)
        return captured["steps"]

    def capture_rewards(token_rewards, mask, **kwargs):
        captured["token_rewards"], captured["mask"] = token_rewards.clone(), mask.clone()
        return gae(token_rewards, mask, **kwargs)

    monkeypatch.setattr(ppo, "prm_step_rewards", capture_steps)
    monkeypatch.setitem(ADVANTAGE_ESTIMATORS, "gae", capture_rewards)
    _, tracker = run_kind("ppo", tmp_path, models, iterations=1, rollout_prompts=4, samples_per_prompt=2,
                          ppo_epochs=1, minibatch_size=8, max_new_tokens=10, kl_coef=0.0, prm_coef=0.5)
    steps, rewards, mask = captured["steps"], captured["token_rewards"], captured["mask"]
    assert max(map(len, steps)) >= 2
    # with no KL term, a token's reward is 0.5 × the PRM's score of the step ending on it, plus the reward model's
    # score on the last token: nothing else anywhere
    from_prm = 0.5 * step_token_rewards(steps, rewards.shape[1])
    last = mask.sum(1).long() - 1
    rest = rewards - from_prm
    assert all(0 < score < 1 for row in steps for _, score in row)
    for i, row in enumerate(steps):
        for end, score in row[:-1]:
            assert rewards[i, end].item() == pytest.approx(0.5 * score, abs=1e-6)
    rest[torch.arange(len(rest)), last] = 0.0
    assert rest.abs().max().item() < 1e-6
    logged = tracker.logged[-1]
    assert logged["steps_per_sample"] == pytest.approx(sum(map(len, steps)) / len(steps))
    assert logged["prm_step_score_mean"] == pytest.approx(
        statistics.mean(score for row in steps for _, score in row), abs=1e-6)
