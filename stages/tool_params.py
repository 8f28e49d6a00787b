"""Params of the kinds whose rollouts call tools (grpo, ppo, rejection_sampling): the tools by tag, their options, the
calls a sample may make and the bounds of each call; and the toolbox a stage builds from them (stages/tools.py).
Apart from stages/params.py so that only these kinds' code depends on the tools."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import Field, PositiveInt, model_validator

from stages.context import StageContext
from stages.kinds import Input
from stages.multiturn import ToolUse
from stages.params import RolloutSettings
from stages.registry import TOOLS
from stages.retrieval import load_index
from stages.tools import ToolBox, ToolFn, build_tool

INDEX_PARAM = "index"  # a tool's keyword-only parameter bound to the `index` input's path
INDEX_PLACEHOLDER = "<index>"  # what `index` is bound to when tools are checked at declaration
INDEX_INPUT = Input("a bm25_index stage's index, bound to the tools taking an `index` (the search tool)",
                    required=False)


class ToolSettings(RolloutSettings):
    """Kinds whose rollouts may call tools (multi-turn, stages/multiturn.py)."""

    tools: dict[str, str] = {}  # multi-turn rollouts: tag -> tool name or import path, e.g. {search: search}
    tool_params: dict[str, dict[str, Any]] = {}  # tag -> the tool's keyword params, e.g. search: {top_k: 3}
    max_turns: PositiveInt = 2  # tool calls a sample may make; after the last it writes on to EOS or the budget
    tool_timeout_s: float = Field(5.0, gt=0)  # a tool call still running after this answers an error
    tool_max_chars: PositiveInt = 400  # a tool's text is cut to this many characters

    @model_validator(mode="after")
    def known_tools(self) -> "ToolSettings":
        for tag in self.tool_params:
            if tag not in self.tools:
                raise ValueError(f"tool_params for '{tag}', which is not in tools {sorted(self.tools)}")
        for tag, name in self.tools.items():
            build_tool(name, **bound_params(name, self.tool_params.get(tag, {}), INDEX_PLACEHOLDER))
        if self.tools and self.rollout.tis_cap is not None:
            raise ValueError("rollout.tis_cap with tools: multi-turn rollouts carry no engine log-probs")
        return self


class PolicyToolSettings(ToolSettings):
    """RL kinds whose rollouts may call tools, and whose held-out evaluation samples with them."""

    eval_without_tools: bool = False  # with tools: also evaluate sampling without them (metrics prefixed notool_)

    @model_validator(mode="after")
    def compared_without_tools(self) -> "PolicyToolSettings":
        if self.eval_without_tools and not self.tools:
            raise ValueError("eval_without_tools needs tools")
        return self


def bound_params(name: str, params: dict[str, Any], index: str | None) -> dict[str, Any]:
    """The tool's `params`, with `index` (the `index` input's path) added when its signature takes an `index`."""
    fn = TOOLS.load(name)
    takes_index = any(p.name == INDEX_PARAM and p.kind is p.KEYWORD_ONLY
                      for p in inspect.signature(fn).parameters.values())
    if not takes_index:
        return params
    if index is None:
        raise ValueError(f"tool '{name}' searches an index: give the stage an `index` input (a bm25_index stage's "
                         "output)")
    return {**params, INDEX_PARAM: index}


def build_toolbox(p: ToolSettings, index: str | None) -> ToolBox:
    """The stage's tools by tag, each with its `tool_params` and the `index` input's path bound where it takes one."""
    tools: dict[str, ToolFn] = {tag: build_tool(name, **bound_params(name, p.tool_params.get(tag, {}), index))
                                for tag, name in p.tools.items()}
    return ToolBox(tools, p.tool_timeout_s, p.tool_max_chars)


def stage_tools(ctx: StageContext) -> ToolUse | None:
    """How the stage's rollouts use tools (`build_toolbox` with its `index` input, at most `max_turns` calls each);
    None without tools. The index is loaded now, not inside the first call's time bound (a large one takes seconds)."""
    p: ToolSettings = ctx.params
    if not p.tools:
        return None
    index = ctx.path("index") if ctx.has("index") else None
    if index is not None:
        load_index(index)
    return ToolUse(build_toolbox(p, index), p.max_turns)
