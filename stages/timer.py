"""One wall-clock bound for untrusted work (a library verifier on model output, a tool a policy calls): a one-shot
SIGALRM timer. Signals reach the main thread only; elsewhere the work runs untimed, bounded by what its caller caps
(the length of what it is shown)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class OutOfTime(BaseException):
    """Raised by the timer; a BaseException so that the bounded code's `except Exception` cannot swallow it."""


def _expire(signum: int, frame: Any) -> None:
    raise OutOfTime


def within(fn: Callable[[], T], seconds: float) -> T:
    """`fn()`, or OutOfTime when it runs past `seconds` (wherever the one tick lands, up to the timer being
    stopped). Every exit path stops the timer and puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.signal(signal.SIGALRM, _expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
