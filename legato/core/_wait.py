"""Waiting on a condition variable with a deadline, errors checked while waiting."""

from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = ["wait_for"]


def wait_for(cv: threading.Condition, done: Callable[[], bool], timeout_s: float,
             check: Callable[[], None], timeout_error: Callable[[], BaseException],
             poll_s: float = 0.5) -> None:
    """Wait (holding `cv`) until `done()`; `check()` may raise; past `timeout_s` raise
    `timeout_error()`. Wakes at least every `poll_s` to re-check."""
    deadline = time.monotonic() + timeout_s
    while not done():
        check()
        left = deadline - time.monotonic()
        if left <= 0:
            raise timeout_error()
        cv.wait(min(left, poll_s))
