"""Failures that `rl4llm` reports in one line, each with its own exit code (flows/cli.py)."""

from __future__ import annotations


class StageFailed(Exception):
    """A stage's command failed: `code` is its exit code (2: bad input), the message its one line of cause."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class DvcError(Exception):
    """DVC itself failed (a remote it cannot reach, a lock, a broken cache): what was asked, and DVC's cause."""
