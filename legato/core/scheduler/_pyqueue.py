"""The communication priority queue in pure Python: heapq plus threading.Condition.

Same interface and semantics as the native `legato._native.PriorityQueue` (see queue.py for
the contract). It serves where the native module is not built, and is the baseline the native
queue's benchmark is measured against.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import warnings
from typing import Callable, NamedTuple

__all__ = ["PythonPriorityQueue", "QueueClosed", "Task"]

_MODES = ("overshoot", "fit")


class QueueClosed(RuntimeError):
    """A task was posted after the queue was shut down."""


class Task(NamedTuple):
    """A communication task: (id, priority, bytes), a tuple with named fields."""

    id: int
    priority: int
    bytes: int


def _check_credit(credit_bytes: int | None) -> None:
    if credit_bytes is not None and (not isinstance(credit_bytes, int) or credit_bytes <= 0):
        raise ValueError(f"credit_bytes={credit_bytes!r} is invalid; pass a positive number of "
                         "bytes, or None for no credit limit")


def _check_timeout(timeout_s: float | None) -> float | None:
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s={timeout_s} is invalid; pass a non-negative number of "
                         "seconds or None")
    return timeout_s


def _check_max(max_tasks: int) -> int:
    if max_tasks <= 0:
        raise ValueError(f"max_tasks={max_tasks} is invalid; pass a positive count")
    return max_tasks


class PythonPriorityQueue:
    """Priority queue with a credit window, a pull API and an optional dispatcher thread."""

    def __init__(self, credit_bytes: int | None = None, mode: str = "overshoot") -> None:
        _check_credit(credit_bytes)
        if mode not in _MODES:
            raise ValueError(f"mode='{mode}' is unknown; pass mode='overshoot' (start while any "
                             "credit is left, as ByteScheduler) or mode='fit' (start only tasks "
                             "that fit, as BytePS)")
        self._mode = mode
        self._credit = credit_bytes
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # a task may have become admissible
        self._idle = threading.Condition(lock)  # queued + in flight may have reached zero
        self._heap: list[tuple[int, int, Task]] = []
        self._queued_ids: set[int] = set()
        self._in_flight: dict[int, int] = {}
        self._seq = itertools.count()
        self._returned_seq = 0
        self._closed = False
        self._interrupted = False
        self._stats = dict(queued=0, in_flight=0, bytes_in_flight=0, peak_bytes_in_flight=0,
                           posted=0, dispatched=0, completed=0)
        self._thread: threading.Thread | None = None
        self._done = False
        self._executor: Callable[[Task], object] | None = None
        self._batch = 64
        self._failures: list[tuple[Task, BaseException]] = []

    # -- producer side -------------------------------------------------------------------------
    def post(self, id: int, priority: int, bytes: int, /) -> None:  # noqa: A002 (as native)
        if id < 0:
            raise ValueError(f"task id={id} is invalid; ids are non-negative integers")
        if bytes < 0:
            raise ValueError(f"task {id}: bytes={bytes} is invalid; sizes are >= 0")
        with self._cv:
            if self._closed:
                raise QueueClosed(f"task {id} posted after the queue was closed; post before "
                                  "shutdown()")
            if self._mode == "fit" and self._credit is not None and bytes > self._credit:
                raise ValueError(f"task {id} has {bytes} bytes, more than credit_bytes="
                                 f"{self._credit}, so it could never start in fit mode; "
                                 "partition it or raise the credit")
            if id in self._queued_ids or id in self._in_flight:
                raise ValueError(f"task id={id} is already queued or in flight; ids must be "
                                 "unique until the task is completed")
            heapq.heappush(self._heap, (priority, next(self._seq), Task(id, priority, bytes)))
            self._queued_ids.add(id)
            self._stats["queued"] += 1
            self._stats["posted"] += 1
            self._cv.notify()

    # -- admission -----------------------------------------------------------------------------
    def _admissible(self) -> bool:
        if not self._heap:
            return False
        if self._stats["in_flight"] == 0 or self._credit is None:
            return True
        if self._mode == "overshoot":
            return self._stats["bytes_in_flight"] < self._credit
        return self._heap[0][2].bytes <= self._credit - self._stats["bytes_in_flight"]

    def _take_head(self) -> Task:
        task = heapq.heappop(self._heap)[2]
        self._queued_ids.discard(task.id)
        self._in_flight[task.id] = task.bytes
        s = self._stats
        s["queued"] -= 1
        s["in_flight"] += 1
        s["dispatched"] += 1
        s["bytes_in_flight"] += task.bytes
        if s["bytes_in_flight"] > s["peak_bytes_in_flight"]:
            s["peak_bytes_in_flight"] = s["bytes_in_flight"]
        return task

    def _wait_admissible(self, timeout_s: float | None) -> bool:
        def done() -> bool:
            return (self._admissible() or self._interrupted
                    or (self._closed and not self._heap))
        self._cv.wait_for(done, timeout_s)
        return self._admissible() and not self._interrupted

    # -- pull API --------------------------------------------------------------------------------
    def try_pop(self) -> Task | None:
        with self._cv:
            return self._take_head() if self._admissible() else None

    def try_pop_many(self, max_tasks: int) -> list[Task]:
        _check_max(max_tasks)
        with self._cv:
            out = []
            while len(out) < max_tasks and self._admissible():
                out.append(self._take_head())
            return out

    def pop(self, timeout_s: float | None = None) -> Task | None:
        self._require_pull("pop")
        _check_timeout(timeout_s)
        with self._cv:
            return self._take_head() if self._wait_admissible(timeout_s) else None

    def pop_many(self, max_tasks: int, timeout_s: float | None = None) -> list[Task]:
        self._require_pull("pop_many")
        _check_max(max_tasks)
        _check_timeout(timeout_s)
        return self._pop_many(max_tasks, timeout_s)

    def _pop_many(self, max_tasks: int, timeout_s: float | None) -> list[Task]:
        with self._cv:
            out: list[Task] = []
            if not self._wait_admissible(timeout_s):
                return out
            while len(out) < max_tasks and self._admissible():
                out.append(self._take_head())
            return out

    def complete(self, id: int, /) -> None:  # noqa: A002
        with self._cv:
            size = self._in_flight.pop(id, None)
            if size is None:
                state = ("it is still queued (pop or dispatch it first)" if id in self._queued_ids
                         else "it was never posted or was completed already")
                raise ValueError(f"complete({id}): task is not in flight; {state}")
            s = self._stats
            s["bytes_in_flight"] -= size
            s["in_flight"] -= 1
            s["completed"] += 1
            if self._heap:
                self._cv.notify_all()
            elif not s["in_flight"]:
                self._idle.notify_all()

    def _return(self, tasks: list[Task]) -> None:
        with self._cv:
            for task in reversed(tasks):
                size = self._in_flight.pop(task.id)
                s = self._stats
                s["in_flight"] -= 1
                s["bytes_in_flight"] -= size
                s["dispatched"] -= 1
                self._returned_seq -= 1
                heapq.heappush(self._heap, (task.priority, self._returned_seq, task))
                self._queued_ids.add(task.id)
                s["queued"] += 1
            self._cv.notify_all()
            self._idle.notify_all()

    def set_credit(self, credit_bytes: int | None) -> None:
        _check_credit(credit_bytes)
        with self._cv:
            if self._mode == "fit" and credit_bytes is not None:
                for _, _, task in self._heap:
                    if task.bytes > credit_bytes:
                        raise ValueError(
                            f"credit_bytes={credit_bytes} is smaller than queued task {task.id} "
                            f"({task.bytes} bytes), which could then never start in fit mode; "
                            "raise the credit or partition the task")
            self._credit = credit_bytes
            self._cv.notify_all()

    # -- dispatcher ------------------------------------------------------------------------------
    def start(self, executor: Callable[[Task], object], batch: int = 64) -> None:
        if self._thread is not None:
            raise RuntimeError("the dispatcher is already running; call start() once")
        if self._closed:
            raise RuntimeError("the queue is shut down; create a new queue to dispatch again")
        self._batch = _check_max(batch)
        self._executor = executor
        self._thread = threading.Thread(target=self._dispatch_loop, name="legato-dispatch",
                                        daemon=True)
        self._thread.start()

    def _dispatch_loop(self) -> None:
        assert self._executor is not None
        while True:
            batch = self._pop_many(self._batch, None)
            if not batch:
                break
            for i, task in enumerate(batch):
                try:
                    self._executor(task)
                except Exception as err:  # noqa: BLE001 (kept and re-raised by shutdown)
                    self.complete(task.id)
                    self._failures.append((task, err))
                    self._return(batch[i + 1:])
                    break
            if self._failures:
                break
        self._done = True
        if self._failures:  # wake shutdown() and wait_idle()
            with self._cv:
                self._interrupted = True
                self._cv.notify_all()
                self._idle.notify_all()

    def _require_pull(self, what: str) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{what}() competes with the running dispatcher for tasks; use "
                               "either start(executor) or the pull API, not both")

    def _failure_text(self) -> str:
        task, err = self._failures[0]
        return (f"executor raised on task {task.id}: {type(err).__name__}: {err}; the dispatcher "
                "stopped and queued tasks are kept: call shutdown(drain=False) to take them back")

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        with self._cv:
            self._interrupted = True
            self._cv.notify_all()
            self._idle.notify_all()
        self._thread.join()
        self._thread = None

    def shutdown(self, drain: bool = True, timeout_s: float | None = None) -> list[Task]:
        _check_timeout(timeout_s)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if not drain:
            self._stop_thread()
            with self._cv:
                out = [entry[2] for entry in sorted(self._heap)]
                self._heap.clear()
                self._queued_ids.clear()
                self._stats["queued"] = 0
                self._idle.notify_all()
                return out
        # Drain: the timeout covers dispatch and completion; a failing executor wakes us.
        self._raise_if_failed()
        self._wait_idle(timeout_s)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_if_failed()
        return []

    def wait_idle(self, timeout_s: float | None = None) -> None:
        _check_timeout(timeout_s)
        self._wait_idle(timeout_s)
        self._raise_if_failed()

    def _wait_idle(self, timeout_s: float | None) -> None:
        with self._cv:
            idle = self._idle.wait_for(
                lambda: (not self._heap and self._stats["in_flight"] == 0) or self._interrupted,
                timeout_s)
            if not idle:
                s = self._stats
                raise TimeoutError(f"queue not idle after {timeout_s} s: {s['queued']} queued, "
                                   f"{s['in_flight']} in flight ({s['bytes_in_flight']} bytes); "
                                   "were all dispatched tasks completed?")

    def _raise_if_failed(self) -> None:
        if self._failures:
            raise RuntimeError(self._failure_text())

    # -- introspection ---------------------------------------------------------------------------
    def stats(self) -> dict[str, int | None]:
        with self._cv:
            out: dict[str, int | None] = dict(self._stats)
        out["failed"] = len(self._failures)
        out["credit_bytes"] = self._credit
        return out

    @property
    def failures(self) -> list[tuple[Task, BaseException]]:
        return list(self._failures)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def credit_bytes(self) -> int | None:
        return self._credit

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done

    def __del__(self) -> None:
        try:
            if self._thread is not None:
                self._stop_thread()
            s = self._stats
            if s["queued"] or s["in_flight"]:
                warnings.warn(f"legato PriorityQueue destroyed with {s['queued']} queued and "
                              f"{s['in_flight']} in-flight tasks; call shutdown() first",
                              ResourceWarning, stacklevel=1)
        except AttributeError:  # construction failed before the fields existed
            pass

