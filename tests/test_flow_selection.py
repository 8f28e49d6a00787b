"""Which stages `rl4llm run --stage X [--downstream]` selects, from the resolved input graph."""

from __future__ import annotations

from flows.config import input_graph, resolve, select_stages
from tests.conftest import REPO


def specs():
    return resolve(REPO / "pipelines.yaml").stages["instructgpt"]


def test_input_graph_follows_inputs():
    graph = input_graph(specs())
    assert graph["data"] == set()
    assert graph["reward_model"] == {"sft", "comparisons", "data"}
    assert graph["ppo"] == {"sft", "reward_model", "data"}


def test_select_all_one_or_downstream():
    order, graph = list(specs()), input_graph(specs())
    assert select_stages(order, graph, None, False) == order
    assert select_stages(order, graph, "reward_model", False) == ["reward_model"]
    assert select_stages(order, graph, "reward_model", True) == ["reward_model", "ppo", "ppo_without_ptx", "rloo"]
    assert select_stages(order, graph, "comparisons", True) == ["comparisons", "reward_model", "ppo",
                                                                  "ppo_without_ptx", "rloo"]
