"""The Search-R1 embedded task: the synthetic world, its rewards and evaluator, and the synthetic_search kind."""

from __future__ import annotations

import random
import re

import pytest

from stages import search_task as task
from stages.data import load_rows
from stages.kinds import get_kind
from stages.registry import EVALUATORS, REWARDS
from stages.spec import DataInput
from tests.test_r1_kinds import run_kind

INFO = "<information> zorblax is a country . its capital is quenta . </information>"
GOOD = (f"<think> i need the capital of zorblax </think> <search> capital of zorblax </search> {INFO} "
        f"<think> and its river </think> <search> river of zorblax </search> {INFO} <answer> quenta </answer>")


def world(seed: int) -> list[task.Entity]:
    return task.make_world(random.Random(seed), 40, 3, 10)


# --- the world --------------------------------------------------------------------------------------------------


def test_world_is_deterministic_per_seed_and_differs_across_seeds():
    assert world(0) == world(0)
    assert [e.name for e in world(0)] != [e.name for e in world(1)]


def test_every_answer_is_stated_by_exactly_its_country_passage():
    countries = world(3)
    passages = [task.passage(e) for e in countries]
    assert len({e.name for e in countries}) == len(countries)
    assert all(2 <= len(e.name.split()) <= 3 and set(e.name.split()) <= set(task.SYLLABLES) for e in countries)
    for entity in countries:
        assert len(entity.facts) == 3
        for row in task.questions(entity):
            fact = f"{row['entity']} is a country . "
            holders = [p for p in passages if p.startswith(fact) and f" the {row['attribute']} of {row['entity']} is {row['answer']} ."
                       in p]
            assert holders == [task.passage(entity)]
            assert task.exact_match_reward([task.trace(entity, row["attribute"])], [row["answer"]]) == [1.0]
            assert task.tool_format_reward([task.trace(entity, row["attribute"])]) == [0.0]


def test_world_rejects_more_attributes_than_it_has():
    with pytest.raises(ValueError, match="attributes"):
        task.make_world(random.Random(0), 3, len(task.ATTRIBUTES) + 1, 5)


# --- rewards ----------------------------------------------------------------------------------------------------


def test_exact_match_normalises_and_takes_the_last_answer():
    completions = ["<answer> Quenta. </answer>", "<answer>  quenta  </answer>", "<answer> mirel </answer>",
                   "quenta", "<answer> mirel </answer> <answer> quenta </answer>",
                   "<answer> quenta </answer> <answer> mirel </answer>", "<answer> quenta"]
    assert task.exact_match_reward(completions, ["quenta"] * len(completions)) == [1, 1, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("completion", [
    "<search> capital of zorblax <answer> quenta </answer>",  # unclosed search
    f"<search> </search> {INFO} <answer> quenta </answer>",  # empty query
    f"<search> capital of zorblax </search> {INFO} <answer> quenta </answer> <search> more </search>",  # not last
    "<answer> quenta </answer> <answer> quenta </answer>",  # two answers
    f"{INFO} <answer> quenta </answer>",  # an information block nobody asked for
    "<think> <search> capital of zorblax </search> </think> <answer> quenta </answer>",  # nested
    "<search> capital of zorblax </search>",  # no answer
    "<answer> quenta </answer> and more",  # text after the answer
])
def test_tool_format_penalises_malformed_trajectories(completion):
    assert task.tool_format_reward([completion]) == [task.FORMAT_PENALTY]
    assert task.parse_trajectory(completion).error is not None


def test_tool_format_accepts_multi_call_trajectories_with_environment_information():
    tool_text_with_tags = "<information> <answer> x </answer> <search> </information>"  # tags inside tool output
    no_call = "<think> i know it </think> <answer> quenta </answer>"
    with_tags = f"<search> capital of zorblax </search> {tool_text_with_tags} <answer> quenta </answer>"
    assert task.tool_format_reward([GOOD, no_call, with_tags, "<answer>quenta</answer>"]) == [0.0] * 4


def test_registry_names_the_rewards_and_evaluator():
    assert REWARDS.load("exact_match") is task.exact_match_reward
    assert REWARDS.load("tool_format") is task.tool_format_reward
    assert EVALUATORS.load("search") is task.evaluate


def test_evaluator_metrics_on_hand_made_completions():
    rows = [{"answer": "quenta"}] * 4
    completions = [GOOD,  # right, 2 searches, 26 own words
                   "<answer> mirel </answer>",  # wrong but well formed, no search, 3 words
                   "<search> capital of zorblax </search> <answer> quenta",  # unclosed answer: wrong, malformed; 1 search
                   f"<search> capital of zorblax </search> {INFO} <answer> QUENTA </answer>"]  # right, 1 search
    metrics = task.evaluate(rows, completions)
    assert metrics == pytest.approx({"accuracy": 0.5, "format_rate": 0.75, "search_rate": 0.75,
                                     "mean_searches": 1.0, "mean_response_length": (26 + 3 + 7 + 8) / 4})


# --- the kind ---------------------------------------------------------------------------------------------------

SMALL = dict(entities=60, attributes=3, values=8, known_entities=20, eval_entities=10, rl_prompts=50,
             eval_prompts=20, cold_start_traces=15, pretrain_documents=100)


def asked(prompt: str) -> str:
    """The country a question asks about ("what is the capital of zo bla ki ?" -> "zo bla ki")."""
    return prompt.split(" of ", 1)[1].removesuffix(" ?")


def outputs(tmp_path, seed_dir: str = "a") -> tuple[dict[str, float], dict[str, list[dict]]]:
    out = tmp_path / seed_dir
    metrics, _ = run_kind("synthetic_search", out, {}, **SMALL)
    return metrics, {name: load_rows(DataInput(path=str(out / rel)))
                     for name, rel in get_kind("synthetic_search").outputs.items()}


def test_synthetic_search_writes_every_output_and_keeps_eval_facts_out_of_pretraining(tmp_path):
    metrics, rows = outputs(tmp_path)
    columns = {"corpus": {"id", "text"}, "pretrain": {"text"}, "prompts": {"prompt", "answer", "entity", "attribute"},
               "eval": {"prompt", "answer", "entity", "attribute"}, "sft": {"prompt", "response", "answer"},
               "vocab": {"text"}}
    for name, expected in columns.items():
        assert rows[name] and expected <= set(rows[name][0]), name
    assert (len(rows["corpus"]), len(rows["prompts"]), len(rows["eval"]), len(rows["sft"])) == (60, 50, 20, 15)
    stated = {pair for r in rows["corpus"] for pair in re.findall(r"the (\w+) of [\w ]+? is (\w+) \.", r["text"])}
    assert metrics["pretrain_documents"] == len(rows["pretrain"]) == 60 + len(stated) + 100
    assert {r["answer"] for r in rows["eval"]} <= {w for r in rows["pretrain"] for w in r["text"].split()}
    pretrain = " \n ".join(r["text"] for r in rows["pretrain"])
    corpus = {r["text"].split(" is a country .")[0]: r["text"] for r in rows["corpus"]}
    for row in rows["eval"] + rows["prompts"]:  # RL and eval facts: in the corpus only
        fact = f"the {row['attribute']} of {row['entity']} is {row['answer']} ."
        assert fact in corpus[row["entity"]]
        assert f" of {row['entity']} is " not in pretrain and f" of {row['entity']} </search>" not in pretrain
    eval_entities = {r["entity"] for r in rows["eval"]}
    assert not eval_entities & {r["entity"] for r in rows["prompts"]}
    assert not eval_entities & {asked(r["prompt"]) for r in rows["sft"]}
    assert len({(r["entity"], r["attribute"]) for r in rows["eval"]}) == 20  # distinct held-out questions
    assert task.exact_match_reward([r["response"] for r in rows["sft"]], [r["answer"] for r in rows["sft"]]) == \
        [1.0] * 15
    for row in rows["sft"]:  # the gold passage first, then two others, as the search tool's top 3
        information = row["response"].split("<information> ")[1].split(" </information>")[0]
        assert information.startswith(corpus[asked(row["prompt"])]) and information.count(" is a country .") == 3
    vocabulary = {w for r in rows["vocab"] for w in r["text"].split()}
    assert {w for r in rows["eval"] + rows["sft"] for w in f"{r['prompt']} {r.get('response', '')}".split()} \
        <= vocabulary


def test_synthetic_search_is_deterministic_per_seed(tmp_path):
    _, first = outputs(tmp_path, "a")
    _, again = outputs(tmp_path, "b")
    assert first == again


def test_synthetic_search_rejects_a_world_without_rl_countries(tmp_path):
    with pytest.raises(ValueError, match="must exceed"):
        run_kind("synthetic_search", tmp_path, {}, **{**SMALL, "known_entities": 50})
