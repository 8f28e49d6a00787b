"""Multi-turn rollouts that call tools (stages/multiturn.py) and the grpo stage with tools: the loss counts exactly
the policy's tokens, tools that fail are contained, budgets and turns hold, and rollouts repeat with a seed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError

from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import get_kind
from stages.models import build_tiny_llama, build_word_tokenizer, load_scalar_head_model, save
from stages.multiturn import multi_turn_sample
from stages.runs import grpo, ppo
from stages.spec import DataInput
from stages.text import Generation
from stages.tool_params import build_toolbox
from stages.tools import ToolBox
from tests.conftest import Tracker
from tests.real_layout import build_tokenizer

ROW = {"prompt": "capital of zorblax", "answer": "quenta"}
CALL = "<think> need capital </think> <search> capital of zorblax </search> never seen"  # cut after </search>
ANSWER = "<answer> quenta </answer>"
WORDS = [CALL, ANSWER, "<information> </information> quenta is the capital error: timed out failed word"]


def lookup(query: str, **columns: Any) -> str:
    """A toy tool: knows the row's answer."""
    return f"{columns['answer']} is the capital"


def recall(query: str, **_: Any) -> str:
    """A toy tool that ignores the row (tests/test_crash_safety.py's multi-turn stage)."""
    return "quenta is the capital"


def tool_policy(out: Path) -> None:
    """A tiny random policy over the tags and a few words: it closes tool calls by chance."""
    tokenizer = build_word_tokenizer([ROW["prompt"], *WORDS])
    torch.manual_seed(0)
    save(build_tiny_llama(len(tokenizer), 16, 1, 2, 128, tokenizer.pad_token_id, tokenizer.bos_token_id,
                          tokenizer.eos_token_id), tokenizer, out)


def answered(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    return [float(f"<answer> {a} </answer>" in c) for c, a in zip(completions, answer)]


def answer_rate(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    return {"answer_rate": sum(answered(completions, [r["answer"] for r in rows])) / len(rows)}


class ScriptedEngine:
    """A rollout engine writing `script[k]` (then EOS) after a prompt row holding k tool answers: an oracle of what
    the policy wrote."""

    name = "scripted"

    def __init__(self, script: list[str]):
        self.script = script

    def generate(self, model, tokenizer, prompt_ids, max_new_tokens, temperature, logprobs=False, what=""):
        turns = [min(tokenizer.decode(row).count("</information>"), len(self.script) - 1) for row in prompt_ids]
        return [Generation((tokenizer(self.script[k], add_special_tokens=False)["input_ids"]
                            + [tokenizer.eos_token_id])[:max_new_tokens]) for k in turns]

    def describe(self) -> dict[str, str]:
        return {"engine": self.name}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([ROW["prompt"], *WORDS])


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scripted(tokenizer, toolbox: ToolBox, script: list[str], max_turns: int = 2, max_new_tokens: int = 40, n=1):
    return multi_turn_sample(None, tokenizer, [ROW["prompt"]] * n, [ROW] * n, toolbox, max_turns, max_new_tokens,
                             engine=ScriptedEngine(script))


def test_the_mask_is_zero_on_exactly_the_appended_tool_tokens(tokenizer):
    queries = []

    def tool(query: str, **columns: Any) -> str:
        queries.append((query, columns))
        return lookup(query, **columns)

    out = scripted(tokenizer, ToolBox({"search": tool}), [CALL, ANSWER])
    r = out.rollouts[0]
    model_call = ids(tokenizer, CALL)[:-2]  # up to and including </search>
    tool_text = ids(tokenizer, "<information> quenta is the capital </information>")
    answer = ids(tokenizer, ANSWER) + [tokenizer.eos_token_id]
    assert r.response_ids == model_call + tool_text + answer
    assert r.loss_mask == [1] * len(model_call) + [0] * len(tool_text) + [1] * len(answer)
    assert queries == [("capital of zorblax", ROW)]
    assert (r.tool_calls, r.invalid_calls, r.failed_calls, r.turns) == (1, 0, 0, 2)
    assert out.completions == ["<think> need capital </think> <search> capital of zorblax </search> <information> "
                               "quenta is the capital </information> <answer> quenta </answer>"]


def assert_one_call_cut_and_masked(tokenizer) -> None:
    """A scripted call then answer, in `tokenizer`'s tokens: the call is cut right after `</search>` (however many
    tokens it spans), the completion text is exact, and the mask is 0 on exactly the tool's text."""
    out = multi_turn_sample(None, tokenizer, [ROW["prompt"]], [ROW], ToolBox({"search": lookup}), 2, 80,
                            engine=ScriptedEngine([CALL, ANSWER]))
    r = out.rollouts[0]
    assert out.completions == ["<think> need capital </think> <search> capital of zorblax </search> <information> "
                               "quenta is the capital </information> <answer> quenta </answer>"]
    appended = [t for t, written in zip(r.response_ids, r.loss_mask) if not written]
    assert tokenizer.decode(appended) == " <information> quenta is the capital </information> "
    call = r.loss_mask.index(0)  # the policy's call, then the tool's text, then the policy's answer
    assert tokenizer.decode(r.response_ids[:call]).endswith("</search>")
    assert r.loss_mask == [1] * call + [0] * len(appended) + [1] * (len(r.loss_mask) - call - len(appended))
    assert (r.tool_calls, r.invalid_calls, r.turns) == (1, 0, 2)


def test_a_call_whose_closing_tag_spans_several_subword_tokens_is_cut_after_its_last_one():
    bpe = build_tokenizer([ROW["prompt"], CALL, ANSWER, *WORDS] * 10, vocab_size=300)
    assert len(bpe.tokenize("</search>")) > 1 and len(bpe.tokenize(" </information>")) > 1
    assert_one_call_cut_and_masked(bpe)


def test_invalid_calls_are_counted_and_run_no_tool(tokenizer):
    box = ToolBox({"search": lookup})
    closed_only = scripted(tokenizer, box, ["capital </search>", ANSWER]).rollouts[0]
    empty = scripted(tokenizer, box, ["<search> </search>", ANSWER]).rollouts[0]
    unclosed = scripted(tokenizer, box, ["<search> capital of"]).rollouts[0]
    assert box.calls == 0
    for r in (closed_only, empty):  # an error answers the model (mask 0) and it goes on
        assert (r.tool_calls, r.invalid_calls, r.turns) == (0, 1, 2)
        assert 0 in r.loss_mask and r.response_ids[-1] == tokenizer.eos_token_id
    assert (unclosed.tool_calls, unclosed.invalid_calls, unclosed.turns) == (0, 1, 1)
    assert set(unclosed.loss_mask) == {1}


def test_max_turns_and_the_budget_hold(tokenizer):
    out = scripted(tokenizer, ToolBox({"search": lookup}), [CALL], max_turns=2, max_new_tokens=60)
    r = out.rollouts[0]
    assert (r.tool_calls, r.turns) == (2, 3)  # the third segment's call is not run: it writes on to EOS
    assert r.response_ids[-3:] == ids(tokenizer, "never seen") + [tokenizer.eos_token_id]
    for budget in (3, 9, 12, 18):
        r = scripted(tokenizer, ToolBox({"search": lookup}), [CALL, ANSWER], max_new_tokens=budget).rollouts[0]
        assert len(r.response_ids) == budget and len(r.loss_mask) == budget
        assert r.loss_mask == ([1] * 9 + [0] * 6 + [1] * 4)[:budget]


def raises(query: str, **_: Any) -> str:
    raise RuntimeError("index corrupt")


def hangs(query: str, **_: Any) -> str:
    time.sleep(30)
    return "late"


def floods(query: str, **_: Any) -> str:
    return "word " * 200_000  # 1 MB


@pytest.mark.parametrize("tool,failed", [(raises, 1), (hangs, 1), (floods, 0)])
def test_a_failing_tool_is_contained(tokenizer, tool, failed):
    box = ToolBox({"search": tool}, timeout_s=0.2, max_chars=400)
    start = time.monotonic()
    r = scripted(tokenizer, box, [CALL, ANSWER], max_new_tokens=200).rollouts[0]
    assert time.monotonic() - start < 5
    assert (r.tool_calls, r.failed_calls, box.failures, r.turns) == (1, failed, failed, 2)
    tool_tokens = len(r.loss_mask) - sum(r.loss_mask)
    assert 2 <= tool_tokens <= 2 + 400 // 5  # <information> … </information>, the text cut to 400 characters
    assert r.response_ids[-4:] == ids(tokenizer, ANSWER) + [tokenizer.eos_token_id]  # the rollout went on


def test_multi_turn_rollouts_repeat_with_a_seed(tokenizer):
    torch.manual_seed(0)
    model = build_tiny_llama(len(tokenizer), 16, 1, 2, 128, tokenizer.pad_token_id, tokenizer.bos_token_id,
                             tokenizer.eos_token_id)

    def roll(seed: int):
        torch.manual_seed(seed)
        out = multi_turn_sample(model, tokenizer, [ROW["prompt"]] * 32, [ROW] * 32, ToolBox({"search": lookup}),
                                2, 24)
        return [(r.response_ids, r.loss_mask) for r in out.rollouts], sum(r.tool_calls for r in out.rollouts)

    first, calls = roll(1)
    assert calls > 0  # the random policy does close calls, so the rollouts were multi-turn
    assert roll(1) == (first, calls)
    assert roll(2)[0] != first


def run_rl(kind_name: str, root: Path, tokenizer, engine, extra_inputs: dict[str, str] | None = None,
           **params) -> Tracker:
    """A grpo or ppo stage (ppo's reward model: the policy with a scalar head) on ROW, sampled by `engine`."""
    torch.manual_seed(0)
    model = build_tiny_llama(len(tokenizer), 16, 1, 2, 128, tokenizer.pad_token_id, tokenizer.bos_token_id,
                             tokenizer.eos_token_id)
    save(model, tokenizer, root / "policy")
    write_jsonl([ROW] * 4, root / "prompts.jsonl")
    inputs = {"policy": DataInput(path=str(root / "policy")), "prompts": DataInput(path=str(root / "prompts.jsonl")),
              "eval": DataInput(path=str(root / "prompts.jsonl"))}
    if kind_name == "ppo":
        save(load_scalar_head_model(str(root / "policy"), tokenizer.pad_token_id), tokenizer, root / "reward")
        inputs["reward"] = DataInput(path=str(root / "reward"))
    inputs |= {name: DataInput(path=path) for name, path in (extra_inputs or {}).items()}
    kind = get_kind(kind_name)
    tracker = Tracker()
    ctx = StageContext("test", kind_name, 0, kind.params(**params), inputs, {"model": root / "model"}, root, None,
                       Accelerator(cpu=True), tracker)
    ctx.opened["engine"] = engine
    try:
        tracker.final = kind.load_run()(ctx)
    finally:
        ctx.close()
    return tracker


def recording(masks: list[torch.Tensor], fn, position: int):
    """`fn`, recording the mask it is given as argument `position`."""
    def wrapped(*args, **kwargs):
        masks.append(args[position].clone())
        return fn(*args, **kwargs)
    return wrapped


POLICY_MASK = [1] * 9 + [0] * 6 + [1] * 4  # the scripted sample: the call, the tool's answer, the policy's answer
TOOL_COUNTS = {"tool_calls_per_sample": 1.0, "tool_call_rate": 1.0, "invalid_tool_calls": 0.0, "tool_failures": 0.0,
               "turns_per_sample": 2.0, "response_length": 13.0}


def test_grpo_with_tools_trains_only_the_policys_tokens_and_logs_tool_use(tokenizer, tmp_path, monkeypatch):
    masks = []  # every mask the policy loss and the KL term are aggregated over
    monkeypatch.setattr(grpo, "ppo_policy_loss", recording(masks, grpo.ppo_policy_loss, 3))
    monkeypatch.setattr(grpo, "aggregate_loss", recording(masks, grpo.aggregate_loss, 1))
    tracker = run_rl("grpo", tmp_path, tokenizer, ScriptedEngine([CALL, ANSWER]),
                     rewards={f"{__name__}:answered": 1.0}, tools={"search": f"{__name__}:lookup"}, iterations=2,
                     prompts_per_step=2, samples_per_prompt=2, minibatch_size=2, max_new_tokens=20, kl_coef=0.1,
                     evaluator=f"{__name__}:answer_rate", eval_max_new_tokens=20, eval_without_tools=True)
    assert len(masks) == 8  # 2 iterations × 2 minibatches × (policy loss, KL)
    for mask in masks:
        assert mask.tolist() == [POLICY_MASK] * 2
    logged = tracker.logged[-1]
    assert {k: logged[k] for k in [*TOOL_COUNTS, "reward"]} == {**TOOL_COUNTS, "reward": 1.0}
    # held out: with the tool the answer is found; sampled without it the script never answers
    assert tracker.final["answer_rate"] == 1.0 and tracker.final["notool_answer_rate"] == 0.0
    assert tracker.final["tool_calls_per_sample"] == 1.0 and tracker.final["initial_answer_rate"] == 1.0


def test_ppo_with_tools_masks_the_tools_text_from_every_loss_and_from_gae(tokenizer, tmp_path, monkeypatch):
    masks = {"policy": [], "value": [], "kl": [], "gae": []}
    monkeypatch.setattr(ppo, "ppo_policy_loss", recording(masks["policy"], ppo.ppo_policy_loss, 3))
    monkeypatch.setattr(ppo, "clipped_value_loss", recording(masks["value"], ppo.clipped_value_loss, 3))
    monkeypatch.setattr(ppo, "masked_sum", recording(masks["kl"], ppo.masked_sum, 1))
    monkeypatch.setitem(ppo.ADVANTAGE_ESTIMATORS, "gae", recording(masks["gae"], ppo.ADVANTAGE_ESTIMATORS["gae"], 1))
    tracker = run_rl("ppo", tmp_path, tokenizer, ScriptedEngine([CALL, ANSWER]), tools={"search": f"{__name__}:lookup"},
                     iterations=2, rollout_prompts=2, samples_per_prompt=2, minibatch_size=2, ppo_epochs=1,
                     max_new_tokens=20, evaluator=f"{__name__}:answer_rate", eval_max_new_tokens=20,
                     eval_without_tools=True)
    assert [len(masks[k]) for k in masks] == [4, 4, 2, 2]  # 2 iterations × 2 minibatches; the logged KL; GAE
    for mask in [m for ms in masks.values() for m in ms]:
        assert mask.tolist() == [POLICY_MASK] * len(mask)
    logged = tracker.logged[-1]
    assert {k: logged[k] for k in TOOL_COUNTS} == TOOL_COUNTS
    assert tracker.final["answer_rate"] == 1.0 and tracker.final["notool_answer_rate"] == 0.0
    with pytest.raises(ValueError, match="not with tools"):
        run_rl("ppo", tmp_path / "prm", tokenizer, ScriptedEngine([CALL, ANSWER]), {"prm": str(tmp_path / "reward")},
               tools={"search": f"{__name__}:lookup"})


def test_tool_params_are_checked_at_declaration():
    params = get_kind("grpo").params
    params(tools={"search": f"{__name__}:lookup"})
    with pytest.raises(ValidationError, match="not in tools"):
        params(tools={"search": f"{__name__}:lookup"}, tool_params={"calc": {}})
    with pytest.raises(ValidationError, match="no parameter"):
        params(tools={"search": f"{__name__}:lookup"}, tool_params={"search": {"top_k": 3}})
    with pytest.raises(ValidationError, match="cannot import"):
        params(tools={"search": "no_such_module:tool"})
    with pytest.raises(ValidationError, match="tis_cap"):
        params(tools={"search": f"{__name__}:lookup"}, rollout={"tis_cap": 2.0})
    with pytest.raises(ValidationError, match="needs tools"):
        params(eval_without_tools=True)


def indexed(query: str, *, index: str, top_k: int = 1, **_: Any) -> str:
    return f"{query} in {index} top {top_k}"


def test_the_index_input_is_bound_to_the_tools_taking_one():
    p = get_kind("grpo").params(tools={"search": f"{__name__}:indexed", "look": f"{__name__}:lookup"},
                                tool_params={"search": {"top_k": 2}})
    box = build_toolbox(p, "artifacts/index")
    assert box.call("search", "zorblax", ROW).text == "zorblax in artifacts/index top 2"
    assert box.call("look", "zorblax", ROW).text == "quenta is the capital"
    with pytest.raises(ValueError, match="give the stage an `index` input"):
        build_toolbox(p, None)
    get_kind("grpo").params(tools={"search": "search"}, tool_params={"search": {"top_k": 2}})  # the built-in


def test_rejection_sampling_with_tools_keeps_whole_trajectories_the_verifier_accepts(tokenizer, tmp_path):
    torch.manual_seed(0)
    save(build_tiny_llama(len(tokenizer), 16, 1, 2, 128, tokenizer.pad_token_id, tokenizer.bos_token_id,
                          tokenizer.eos_token_id), tokenizer, tmp_path / "policy")
    write_jsonl([ROW], tmp_path / "prompts.jsonl")
    kind = get_kind("rejection_sampling")
    params = kind.params(tools={"search": f"{__name__}:lookup"}, samples_per_prompt=2, max_new_tokens=20,
                         filters=["correct"], verifier=f"{__name__}:answered")
    inputs = {"policy": DataInput(path=str(tmp_path / "policy")),
              "prompts": DataInput(path=str(tmp_path / "prompts.jsonl"))}
    ctx = StageContext("test", "rejection_sampling", 0, params, inputs, {"sft": tmp_path / "sft.jsonl"}, tmp_path,
                       None, Accelerator(cpu=True), Tracker())
    ctx.opened["engine"] = ScriptedEngine([CALL, ANSWER])
    try:
        metrics = kind.load_run()(ctx)
    finally:
        ctx.close()
    kept = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    # the call, the environment's answer and the policy's answer: one trajectory, as SFT data
    assert kept == [{"prompt": ROW["prompt"], "response": "<think> need capital </think> <search> capital of "
                     "zorblax </search> <information> quenta is the capital </information> <answer> quenta </answer>"}]
    assert metrics["acceptance_rate"] == 1.0 and metrics["tool_calls_per_sample"] == 1.0
