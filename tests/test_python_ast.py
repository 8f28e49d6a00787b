import ast

import pytest

from stages import python_ast


def flaky_parse(failures: int, message: str = "AST constructor recursion depth mismatch (before=57, after=73)"):
    """ast.parse that raises `message` as a SystemError on its first `failures` calls, as a parse racing another
    thread's does on CPython 3.11."""
    calls = []
    real = ast.parse

    def parse(source: str, mode: str = "exec") -> ast.AST:
        calls.append(source)
        if len(calls) <= failures:
            raise SystemError(message)
        return real(source, mode=mode)
    return parse, calls


def test_a_parse_spoiled_by_another_thread_is_retried(monkeypatch):
    parse, calls = flaky_parse(failures=2)
    monkeypatch.setattr(python_ast.ast, "parse", parse)
    tree = python_ast.parse("1 + 2", mode="eval")
    assert isinstance(tree, ast.Expression) and len(calls) == 3


def test_parse_gives_up_after_its_attempts_and_never_hides_other_system_errors(monkeypatch):
    parse, calls = flaky_parse(failures=python_ast.ATTEMPTS)
    monkeypatch.setattr(python_ast.ast, "parse", parse)
    with pytest.raises(SystemError, match="recursion depth mismatch"):
        python_ast.parse("x = 1")
    assert len(calls) == python_ast.ATTEMPTS
    parse, calls = flaky_parse(failures=1, message="something else")
    monkeypatch.setattr(python_ast.ast, "parse", parse)
    with pytest.raises(SystemError, match="something else"):
        python_ast.parse("x = 1")
    assert len(calls) == 1
