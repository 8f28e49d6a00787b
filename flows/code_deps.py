"""A stage's code dependencies: the project's files that shape its output, found by following imports (`ast`, no
import runs). DVC reruns a stage when one of them changes; bookkeeping code (logging, processes, checkpoints, the
stage command) is never followed, so editing it makes nothing stale."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

import stages
from stages import BOOKKEEPING, python_ast
from stages.kinds import get_kind, kind_module
from stages.registry import REGISTRIES
from stages.spec import ResolvedStage


def code_deps(root: Path, spec: ResolvedStage) -> list[str]:
    """The code that shapes the stage's output, as files of the project (relative to `root`): its kind's module and
    the modules of the code its params name (rewards, step reward, evaluator, labeler; built-in or the user's own),
    with what they import, transitively. `stages.BOOKKEEPING` modules are left out."""
    root = root.resolve()
    kind = get_kind(spec.kind)
    files = import_closure([kind_module(kind.name), *filter(None, [kind.run_module()]), *named_code(spec.params)],
                           root)
    return sorted(str(f.relative_to(root)) for f in files if f.is_relative_to(root))


def named_code(value: Any) -> list[str]:
    """Modules of the code that params name: registry entries, and `module:function` import paths."""
    if isinstance(value, dict):
        return [m for item in [*value, *value.values()] for m in named_code(item)]
    if isinstance(value, list):
        return [m for item in value for m in named_code(item)]
    if not isinstance(value, str):
        return []
    path = next((r.import_path(value) for r in REGISTRIES if value in r), value if ":" in value else None)
    return [path.partition(":")[0]] if path else []


def import_closure(modules: list[str], root: Path) -> set[Path]:
    """Files of `modules`, their parent packages and what they import, transitively: the project's modules (under
    `root`) and this package's; others (torch, …) are not followed."""
    package_parent = Path(stages.__file__).resolve().parents[1]
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        roots = [root, package_parent] if name.split(".")[0] == "stages" else [root]  # torch & co. not followed
        file = None if name in BOOKKEEPING else _module_file(name, roots)
        if file is None or file in seen:
            continue
        seen.add(file)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        package = parts if file.name == "__init__.py" else parts[:-1]
        for level, module, names in _imports(file, file.stat().st_mtime_ns):
            base = package[:len(package) - level + 1] if level else []
            full = ".".join([*base, *([module] if module else [])])
            todo += [full, *(f"{full}.{name}" for name in names)]  # `from m import x`: x may be a module
    return seen


@functools.lru_cache(maxsize=None)
def _imports(file: Path, _mtime_ns: int) -> list[tuple[int, str | None, list[str]]]:
    """The imports anywhere in a file but `if TYPE_CHECKING:` blocks: (level, module, names imported from it)."""
    found: list[tuple[int, str | None, list[str]]] = []
    tree = python_ast.parse(file.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        block.body = []  # imports for type annotations only: not code the module runs
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(0, alias.name, []) for alias in node.names]
    return found


def _module_file(name: str, roots: list[Path]) -> Path | None:
    parts = name.split(".")
    for root in roots:
        for file in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            if file.is_file():
                return file.resolve()
    return None

