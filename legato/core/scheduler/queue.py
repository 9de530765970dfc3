"""The communication priority queue: native when built, pure Python otherwise.

Contract (both implementations):
- tasks are (id, priority, bytes); lower priority is more urgent; FIFO among equal priorities;
- a credit window in bytes (`credit_bytes`, None for no limit) with two admission modes:
  `overshoot` starts the most urgent task while any credit is left (ByteScheduler), so bytes in
  flight stay below credit + the largest task; `fit` starts it only if it fits in the credit
  left (BytePS), and refuses at post time a task larger than the whole credit. Admission is
  strictly in priority order: a task that does not fit blocks the ones behind it. When nothing is
  in flight the most urgent task always starts;
- `complete(id)` returns the task's credit; completing an unknown or finished id is a ValueError;
- `start(executor)` runs a dispatcher thread that calls `executor(task)` for each admitted task;
  `pop`/`pop_many`/`try_pop` let a caller drive the queue itself;
- `shutdown(drain=True)` waits until every task has been dispatched and completed;
  `shutdown(drain=False)` stops dispatching and hands the queued tasks back. Nothing is dropped:
  if the executor raises, its task is recorded in `failures`, the dispatcher stops, and the
  rest stay queued for `shutdown(drain=False)`;
- `stats()`: queued, in_flight, bytes_in_flight, peak_bytes_in_flight, posted, dispatched,
  completed, failed, credit_bytes.
"""

from __future__ import annotations

from typing import Literal

from legato.core.scheduler._pyqueue import PythonPriorityQueue, QueueClosed, Task

try:
    from legato import _native
except ImportError:  # not built: the pure-Python queue serves
    _native = None

NATIVE_AVAILABLE = _native is not None

__all__ = ["NATIVE_AVAILABLE", "PythonPriorityQueue", "QueueClosed", "Task", "make_queue"]


def make_queue(credit_bytes: int | None = None, mode: str = "overshoot", *,
               impl: Literal["auto", "native", "python"] = "auto"):
    """Create a priority queue.

    Args:
        credit_bytes: bytes allowed in flight, or None for no limit.
        mode: "overshoot" or "fit" (see the module docstring).
        impl: "native" (error if not built), "python", or "auto" (native when built).
    Returns:
        A `legato._native.PriorityQueue` or a `PythonPriorityQueue`, with the same interface.
    """
    if impl not in ("auto", "native", "python"):
        raise ValueError(f"impl='{impl}' is unknown; pass 'auto', 'native' or 'python'")
    if impl == "native" and _native is None:
        from legato.core.errors import BackendUnavailable
        raise BackendUnavailable("legato._native is not built; reinstall legato from its wheel "
                                 "or source (`pip install .`, `make setup`) to compile it, or "
                                 "pass impl='python'")
    if impl == "python" or _native is None:
        return PythonPriorityQueue(credit_bytes, mode)
    return _native.PriorityQueue(credit_bytes, mode)
