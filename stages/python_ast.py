"""`ast.parse` safe to call beside other threads.

CPython 3.11 keeps the AST constructor's recursion counter in interpreter-wide state: two threads building ASTs at
once (ours, or a library formatting a traceback, which parses the failing line) can make a sound parse raise
`SystemError: AST constructor recursion depth mismatch` (python/cpython gh-106905). Our parses take one lock, and a
parse spoiled by another thread's is retried: the source is the same, so the retry is the answer.
"""
from __future__ import annotations

import ast
import threading

ATTEMPTS = 5
_LOCK = threading.Lock()


def parse(source: str, mode: str = "exec") -> ast.AST:
    """`ast.parse(source, mode=mode)`, retried when another thread's parse corrupted the shared counter."""
    for _ in range(ATTEMPTS - 1):
        with _LOCK:
            try:
                return ast.parse(source, mode=mode)
            except SystemError as error:
                if "recursion depth mismatch" not in str(error):
                    raise
    with _LOCK:
        return ast.parse(source, mode=mode)
