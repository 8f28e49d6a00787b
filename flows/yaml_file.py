"""YAML the user wrote (pipelines.yaml, accelerate configs), read strictly: an alias bomb, a recursive alias or a key
twice in one mapping is refused, and every problem names its line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.error import MarkedYAMLError

from stages import data

MAX_ALIAS_NODES = 10_000  # nodes a YAML document may add through aliases (a "billion laughs" adds billions)


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """Nodes under `node` with every alias expanded, memoised per node (so the cost is the document's size)."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise yaml.YAMLError("a recursive alias: a node that contains itself")
        return sizes[id(node)]
    sizes[id(node)] = None
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _check_unique_keys(node: yaml.Node, path: str = "") -> None:
    """Raise a MarkedYAMLError at the second of two equal keys in one mapping under `node` (`path` names where it
    is: `pipelines.demo.stages[0].params`). Merged keys (`<<: *defaults`) may be overridden; they are not compared."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[tuple[str, str], yaml.Node] = {}
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
            continue
        if (key.tag, key.value) in first:
            where = f" in {path}" if path else ""
            raise MarkedYAMLError(problem=f"duplicate key {key.value!r}{where}, first on line "
                                          f"{first[key.tag, key.value].start_mark.line + 1}",
                                  problem_mark=key.start_mark)
        first[key.tag, key.value] = key
        _check_unique_keys(value, f"{path}.{key.value}".lstrip("."))


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects documents whose aliases expand to more than MAX_ALIAS_NODES extra nodes, and
    duplicate keys in a mapping (which YAML would resolve silently, the last one winning)."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        sizes: dict[int, int | None] = {}
        if _expanded_size(node, sizes) - len(sizes) > MAX_ALIAS_NODES:
            raise yaml.YAMLError(f"aliases expand to more than {MAX_ALIAS_NODES:,} nodes; an alias bomb?")
        _check_unique_keys(node)
        return node


def read_yaml(path: Path) -> Any:
    """The YAML document at `path`, or a ValueError saying why not (missing, a directory, not UTF-8, invalid YAML
    with its line and column, aliases expanding too far, a key twice in one mapping)."""
    try:
        return yaml.load(data.decode_utf8(path.read_bytes()), Loader=_Loader)
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except IsADirectoryError:
        raise ValueError("a directory, not a file") from None
    except yaml.YAMLError as e:
        raise ValueError(problem(e)) from None
    except RecursionError:
        raise ValueError("invalid YAML (nested too deeply)") from None



def problem(error: yaml.YAMLError) -> str:
    """A YAML error as `line L column C: invalid YAML (what)`."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
    return f"{where}invalid YAML ({getattr(error, 'problem', None) or error})"
