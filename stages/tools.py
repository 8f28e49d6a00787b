"""Tools a policy calls during a multi-turn rollout (Search-R1, Jin et al. 2025): pure functions
`tool(query: str, **columns) -> str`, chosen by name (`TOOLS` in stages/registry.py) or import path, like rewards.

A tool's output goes back to the model, so it is bounded: a call runs at most `timeout_s` seconds (a one-shot
SIGALRM timer in the main thread, as the verifiers are bounded; elsewhere it runs untimed) and its text is cut to
`max_chars`. A tool that raises, runs out of time or returns anything but text answers the model with an error
string and is counted as failed; it never stops the stage.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.registry import TOOLS
from stages.timer import OutOfTime, within

ToolFn = Callable[..., str]  # (query, **columns) -> text shown to the model


@dataclass(frozen=True)
class ToolResult:
    text: str  # what the model is shown (cut to max_chars)
    ok: bool  # False: the tool raised, ran out of time or returned no text (the text says which)


def _call_bound(fn: ToolFn, params: dict[str, Any], shadowed: frozenset[str], query: str, /, **columns: Any) -> str:
    """`fn(query, **columns, **params)` less the columns in `shadowed`: a bound param wins over a row's column of its
    name (a dataset's `index` column must not redirect a search), and a column named like the query parameter is left
    out."""
    return fn(query, **{k: v for k, v in columns.items() if k not in shadowed}, **params)


def build_tool(name: str, **params: Any) -> ToolFn:
    """The tool `name` (a built-in of `TOOLS` or an import path) with its keyword-only `params` bound. Raises
    ValueError naming an unknown tool or parameter."""
    fn = TOOLS.load(name)
    signature = inspect.signature(fn).parameters.values()
    allowed = [p.name for p in signature if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"tool {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    query = next((p.name for p in signature if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)
    return functools.partial(_call_bound, fn, params, frozenset({query, *params} - {None}))


@dataclass
class ToolBox:
    """The tools of a rollout by tag (`<search>query</search>` calls `tools["search"]`), bounded and counted."""

    tools: dict[str, ToolFn]
    timeout_s: float = 5.0  # a call still running after this answers "error: timed out"
    max_chars: int = 2000  # a tool's text is cut to this many characters
    calls: int = 0
    failures: int = 0
    first_failure: str | None = None  # what the first failed call answered, for the stage's log

    def call(self, tag: str, query: str, columns: dict[str, Any]) -> ToolResult:
        """Run the tool of `tag` on `query` with the sample's row `columns`; never raises."""
        self.calls += 1
        try:
            text = within(lambda: self.tools[tag](query, **columns), self.timeout_s)
            if not isinstance(text, str):
                raise TypeError(f"returned {type(text).__name__}, not text")
            return ToolResult(text[:self.max_chars], True)
        except OutOfTime:
            message = f"error: {tag} timed out after {self.timeout_s:g} s"
        except Exception as e:  # a tool's bug is the model's bad luck, not the stage's end
            message = f"error: {tag} failed: {type(e).__name__}: {e}"[:self.max_chars]
        self.failures += 1
        self.first_failure = self.first_failure or message
        return ToolResult(message, False)
