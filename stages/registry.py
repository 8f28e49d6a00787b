"""The registries of code a pipelines.yaml names: rewards, step rewards, evaluators and labelers. Each name is a
built-in entry or a user's own function by import path.

An import path is `package.module:attribute` (`my_rewards:brevity`); a kind may also be a module
(`my_kinds.rank_filter`). User modules are found from the project directory (where pipelines.yaml lives, the
working directory of every stage). Built-in entries are import paths too, loaded on first use, so a stage imports
(and DVC tracks) only the code it names.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator


def is_import_path(name: str) -> bool:
    return ":" in name or "." in name


def use_project(root: str | Path) -> None:
    """Find the user's own modules in the project directory `root`."""
    if str(root) not in sys.path:
        sys.path.append(str(root))  # after the installed packages: a project folder never shadows one


def load_object(path: str) -> Any:
    """The object at `module:attribute` (or the module itself for a plain dotted path), searched for in the
    project (the working directory, or what `use_project` named). Raises ValueError naming what is missing."""
    module_name, _, attribute = path.partition(":")
    use_project(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # not found, or the module itself is broken (a SyntaxError, a NameError, …)
        raise ValueError(f"cannot import '{module_name}' (from '{path}'): {type(e).__name__}: {e}") from None
    if not attribute:
        return module
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"module '{module_name}' has no '{attribute}' (from '{path}')") from None


class Registry:
    """One registry of named code (rewards, evaluators, labelers): `{name: "module:attribute"}`."""

    def __init__(self, what: str, entries: dict[str, str]):
        self.what, self.entries = what, entries

    def __iter__(self):
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def import_path(self, name: str) -> str:
        """The entry's import path: a built-in's, or the name itself when it is one."""
        if name in self.entries:
            return self.entries[name]
        if is_import_path(name):
            return name
        raise ValueError(f"unknown {self.what} '{name}'; allowed: {', '.join(sorted(self.entries))}, or an import "
                         "path `module:function` of your own")

    def load(self, name: str) -> Callable:
        entry = load_object(self.import_path(name))
        if not callable(entry):
            raise ValueError(f"{self.what} '{name}' is not callable")
        return entry

    def checked_name(self) -> Any:
        """The type of a param naming an entry: a built-in name, or an import path that loads a callable."""
        def check(name: str) -> str:
            if name not in self.entries:
                self.load(name)
            return name

        return Annotated[str, AfterValidator(check)]


# (completions, **columns) -> one reward per completion (stages/rewards.py)
REWARDS = Registry("reward", {
    "accuracy": "stages.rewards:accuracy_reward",
    "format": "stages.rewards:format_reward",
    "language_consistency": "stages.rewards:language_consistency_reward",
    "overlong": "stages.rewards:overlong_reward",
    "reasoning_gym": "stages.rewards:reasoning_gym_reward",
    "math_verify": "stages.rewards:math_verify_reward",
    "exact_match": "stages.search_task:exact_match_reward",
    "tool_format": "stages.search_task:tool_format_reward",
})
# (response tokens) -> [(index of a step's last token, reward)], for process supervision
STEP_REWARDS = Registry("step reward", {"arithmetic_steps": "stages.reasoning_task:step_rewards"})
# (held-out rows, sampled completions) -> metrics, run after every policy-producing stage
EVALUATORS = Registry("evaluator", {
    "instruct_gold": "stages.instruct_task:evaluate",
    "reasoning": "stages.reasoning_task:evaluate",
    "reasoning_gym": "stages.rewards:evaluate_reasoning_gym",
    "math_verify": "stages.rewards:evaluate_math_verify",
    "search": "stages.search_task:evaluate",
})
# a reward that verifies answers -> the evaluator judging with the same verifier: a stage whose rewards include one
# is evaluated by it unless its `evaluator` says otherwise
VERIFIER_EVALUATORS = {"reasoning_gym": "reasoning_gym", "math_verify": "math_verify", "exact_match": "search"}
# rewards scoring an answer's correctness: an RL stage logs the first of these it uses as its `accuracy`
VERIFIER_REWARDS = ("accuracy", *VERIFIER_EVALUATORS)
# (prompt, K responses) -> ranks, 0 = best (equal ranks are ties): scripted stand-ins for human rankers
LABELERS = Registry("labeler", {
    "instruct_gold": "stages.instruct_task:rank_by_gold",
    "reasoning_general": "stages.reasoning_task:rank_general",
})
# (query, **columns) -> text shown to the model, called by its tag in a multi-turn rollout (stages/tools.py)
TOOLS = Registry("tool", {
    "search": "stages.retrieval:search",
    "calculator": "stages.calculator:calculator",
})
REGISTRIES = (REWARDS, STEP_REWARDS, EVALUATORS, LABELERS, TOOLS)
