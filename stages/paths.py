"""Where a stage writes: its own folders of the project, reached through no symbolic link (stdlib only).

A stage replaces its output directory whole, and removes its staging directory and checkpoints. A symbolic link on
the way would send those writes and deletions elsewhere: into another project, or into DVC's cache. So a link that
*is* a folder the stage replaces (its output or staging directory) is removed, the link alone and never what it
points to; a link above one (`artifacts/`, `artifacts/<pipeline>/`, the state folder) makes the intent unclear and
is refused, naming the link and its target.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ARTIFACTS = "artifacts"  # stage outputs: artifacts/<pipeline>/<stage>/


class LinkedPath(ValueError):
    """A symbolic link where a stage would write through it (bad input: the stage exits 2)."""


def output_dir(pipeline: str, stage: str) -> str:
    """A stage's output directory, relative to the project."""
    return f"{ARTIFACTS}/{pipeline}/{stage}"


def within(root: Path, path: str | Path) -> Path:
    """`path` (relative to `root`, or absolute) made absolute and normalised, no link followed."""
    return Path(os.path.normpath(os.path.join(root, path)))


def links_to(root: Path, path: Path) -> list[Path]:
    """The symbolic links among `path` and the folders above it, below `root` (nothing resolved)."""
    relative = within(root, path).relative_to(root)
    found, current = [], root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            found.append(current)
    return found


def claim(root: Path, folder: Path, replaceable: bool = True) -> Path:
    """Make `folder` (a folder the stage writes, under `root`) safe to write and delete: a link at `folder` itself is
    removed when `replaceable` (the link only; its target is untouched), a link above it refused (`LinkedPath`).
    Returns the absolute, unresolved path."""
    folder = within(root, folder)
    links = links_to(root, folder)
    if links and links[-1] == folder and replaceable:
        target = os.readlink(folder)
        folder.unlink()
        print(f"{folder.relative_to(root)} was a symbolic link to {target}: removed the link (its target is "
              "untouched); the stage writes a directory there", file=sys.stderr, flush=True)
        links.pop()
    if links:
        link = links[0]
        raise LinkedPath(f"{link.relative_to(root)} is a symbolic link to {os.readlink(link)}: a stage writes, "
                         f"renames and deletes nothing through a link (in {folder.relative_to(root)}); replace the "
                         "link with a directory")
    return folder
