"""Failures that `rl4llm` reports in one line, each with its own exit code (flows/cli.py): a broken pipelines.yaml
(or another file the user gave) names the file, pipeline, stage and key."""

from __future__ import annotations


class StageFailed(Exception):
    """A stage's command failed: `code` is its exit code (2: bad input), the message its one line of cause."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class DvcError(Exception):
    """DVC itself failed (a remote it cannot reach, a lock, a broken cache): what was asked, and DVC's cause."""


class ConfigError(Exception):
    """A broken pipelines.yaml: where (file, pipeline, stage, key) and what."""

    def __init__(self, file: str, message: str, pipeline: str | None = None, stage: str | None = None,
                 key: str | None = None):
        self.file, self.pipeline, self.stage, self.key = file, pipeline, stage, key
        where = [f"pipeline {pipeline!r}" if pipeline else "", f"stage {stage!r}" if stage else "",
                 f"key {key!r}" if key else ""]
        super().__init__(f"{file}: {', '.join(w for w in where if w)}: {message}".replace(": : ", ": "))


class ConfigErrors(ConfigError):
    """Several problems in pipelines.yaml, reported together (one per line); its place is the first one's."""

    def __init__(self, errors: list[ConfigError]):
        first = errors[0]
        super().__init__(first.file, "", first.pipeline, first.stage, first.key)
        self.errors = errors
        self.args = (f"{len(errors)} problems:\n" + "\n".join(f"  {e}" for e in errors),)


def raise_all(errors: list[ConfigError]) -> None:
    """Raise the one error, or all of them together."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
