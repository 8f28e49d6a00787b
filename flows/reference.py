"""What a pipelines.yaml may say: every stage kind with its inputs, outputs and params (`rl4llm kinds`), and a JSON
schema of the whole file for editor completion (`rl4llm schema`). Both come from the declarations themselves: the
kinds' `Params`, `INPUTS`, `OUTPUTS`, and the comments on their fields."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from flows.schema import ConfigFile
from stages.kinds import BUILT_IN_KINDS, StageKind, get_kind, kind_module
from stages.registry import load_object


def describe_kind(kind: StageKind) -> str:
    """A kind's reference: its purpose (the module docstring's first paragraph), inputs, outputs, and each param
    with its type, default and description."""
    doc = (load_object(kind_module(kind.name)).__doc__ or "").strip().split("\n\n")[0]
    lines = [f"{kind.name}: {' '.join(doc.split())}".rstrip(), "  inputs:"]
    for name, declared in kind.inputs.items():
        columns = f" [{', '.join(declared.columns)}]" if declared.columns else ""
        lines.append(f"    {name:<12} {'' if declared.required else '(optional) '}{declared.doc}{columns}")
    lines += ["    (none)"] * (not kind.inputs)
    lines.append("  outputs: " + ", ".join(f"{name} ({path})" for name, path in kind.outputs.items()))
    rows = _param_rows(kind.params)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines.append("  params:")
    lines += [f"    {n:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {text}".rstrip() for n, t, d, text in rows]
    return "\n".join(lines)


def _param_rows(params: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of each param; a param whose default is a settings group (`rollout`)
    is followed by a row per setting, named `group.setting`."""
    schema, rows = params.model_json_schema(), []
    for name, field in params.model_fields.items():
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        grouped = isinstance(default, BaseModel)
        rows.append((prefix + name, _type(schema["properties"][name]),
                     "required" if field.is_required() else "(below)" if grouped else repr(default),
                     field.description or ""))
        if grouped:
            rows += _param_rows(type(default), f"{prefix}{name}.")
    return rows


def _type(prop: dict[str, Any] | bool) -> str:
    if not isinstance(prop, dict):  # `true`: anything
        return "any"
    if "enum" in prop:
        return "|".join(map(str, prop["enum"]))
    if "const" in prop:
        return repr(prop["const"])
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return "|".join(_type(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list[{_type(prop.get('items', {}))}]"
    if prop.get("type") == "object" and "additionalProperties" in prop:
        return f"dict[str, {_type(prop['additionalProperties'])}]"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "None",
            "object": "dict"}.get(prop.get("type", ""), "any")


def pipelines_schema(kinds: list[str] | None = None) -> dict[str, Any]:
    """JSON schema (draft 2020-12) of pipelines.yaml: the file's structure, and for a stage of each kind in `kinds`
    (default: the built-ins) its params with types, defaults and descriptions."""
    schema = ConfigFile.model_json_schema(ref_template="#/$defs/{model}")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rl4llm pipelines.yaml"
    defs = schema.setdefault("$defs", {})
    branches = []
    for name in kinds or list(BUILT_IN_KINDS):
        params = copy.deepcopy(get_kind(name).params.model_json_schema(ref_template="#/$defs/{model}"))
        defs.update(params.pop("$defs", {}))
        defs[f"params.{name}"] = params
        branches.append({"if": {"properties": {"kind": {"const": name}}, "required": ["kind"]},
                         "then": {"properties": {"params": {"$ref": f"#/$defs/params.{name}"}}}})
    defs["StageSpec"]["allOf"] = branches
    defs["StageSpec"]["properties"]["kind"]["examples"] = list(BUILT_IN_KINDS)
    return schema


def user_kinds(config: ConfigFile) -> list[str]:
    """The kinds of a config's stages that are a user's own (module paths)."""
    named = {stage.kind for spec in config.pipelines.values() for stage in spec.stages}
    return sorted(k for k in named if k not in BUILT_IN_KINDS)
