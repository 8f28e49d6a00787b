"""Kind declarations: each field's description is the comment where it is declared; user code that does not load
is named, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import Field

from stages.kinds import BUILT_IN_KINDS, Input, StageParams, get_kind
from stages.registry import load_object


class Declared(StageParams):
    plain: int = 1  # a plain field
    spread: list[str] = Field(
        default_factory=list)  # declared over two lines
    bare: int = 3

    def helper(self) -> int:
        bare = 4  # a local's comment, not the field's
        return bare


class Redeclared(Declared):
    plain: int = 2


def test_a_fields_description_is_the_comment_ending_its_declaration():
    described = {name: field.description for name, field in Declared.model_fields.items()}
    assert described == {"plain": "a plain field", "spread": "declared over two lines", "bare": None}
    assert Redeclared.model_fields["plain"].description == "a plain field"  # kept from the parent


def test_a_broken_user_module_is_named_with_its_error(tmp_path: Path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def brevity(completions):\n    return [\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    with pytest.raises(ValueError, match="cannot import 'broken_rewards'.*SyntaxError"):
        load_object("broken_rewards:brevity")


def test_an_input_is_a_model_or_data_not_both():
    with pytest.raises(ValueError, match="a model has no columns"):
        Input("policy", model=True, columns=("prompt",))
    with pytest.raises(ValueError, match=r"gguf=True is for a model input"):
        Input("source", gguf=True)
    source = get_kind("import_model").inputs["source"]
    assert source.model and source.gguf and not source.columns


def test_every_built_in_kind_declares_its_inputs_and_params_with_descriptions():
    for name in BUILT_IN_KINDS:
        kind = get_kind(name)
        assert all(declared.doc for declared in kind.inputs.values()), name
        assert all(field.description for field in kind.params.model_fields.values()), name
