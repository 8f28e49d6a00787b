"""`python -m stages.guard CMD ARG...`: run CMD and take every process it starts down with it.

A server a stage starts (vLLM's API server) starts processes of its own (its engine core) that outlive it when it
is killed. The stage starts this guard as the leader of a new process group, set to get SIGTERM when the stage dies
(`processes.die_with_parent`); CMD runs in the guard's group. When the guard is told to stop (SIGTERM, SIGINT, the
stage's death) or CMD exits, it sends the whole group SIGTERM, waits `GRACE_S` for CMD, then SIGKILLs the group,
itself included: no orphan is left, and no port stays bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

GRACE_S = 10.0  # how long CMD may take to stop cleanly after SIGTERM


class _Stop(Exception):
    pass


def _stop(_signum: int, _frame: object) -> None:
    raise _Stop


def main(cmd: list[str]) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    child = subprocess.Popen(cmd)
    try:
        child.wait()
    except _Stop:
        pass
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
