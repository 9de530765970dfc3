"""The scheduler: gradients ready -> chunks -> priority queue -> backend, same order everywhere.

[Note: one order on every rank] Collectives over gloo (and NCCL) must be issued in the same
order on all ranks, but gradients become ready at different times on different ranks, and the
priority queue's order depends on that timing. So one rank decides: the *leader* (rank 0) runs
the policy and the priority queue, and before it starts a chunk it announces the chunk's id on
an `OrderChannel`. Every other rank (a *follower*) has no queue: one thread takes the
announcements in order, waits until that chunk is ready locally, and starts it. The order is
thus the leader's, on every rank, whatever each rank's timing. A follower that is late only
delays the collective, never reorders it; a chunk cannot be announced before its step's
previous chunks were, so there is no cyclic wait. Horovod negotiates when collectives run but
not which ones each rank's window admits, so its adapters use an order channel too; `order=None`
(every rank its own leader) is only safe for a backend whose collectives never wait for peers.

[Note: batched announcements] An announcement is a small collective on the same network as
the gradients, so it can wait behind bulk data (on a shaped link, behind everything queued in
the token bucket). The queue's dispatcher therefore only hands admitted chunks to an announcer
thread, which sends everything admitted since its last announcement in one message and then
starts those chunks: when a window opens for several partitions at once they are announced,
and started, together rather than one link round trip apart.

Step boundaries need no message: every step communicates every chunk once, and a rank's next
step cannot produce a gradient before its previous step's updates are done (the dependency
proxies see to that; under `plain`, the blocking `step()`), so announcements of consecutive steps never interleave.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Callable

from legato.core._wait import wait_for
from legato.core.errors import LegatoError
from legato.core.protocols import CommBackend, OrderChannel
from legato.core.scheduler.plan import Chunk, ChunkPlan
from legato.core.scheduler.policy import SchedulerConfig, priority_of
from legato.core.scheduler.queue import make_queue

__all__ = ["CommFailed", "Scheduler"]

log = logging.getLogger(__name__)


class CommFailed(LegatoError):
    """A collective failed, a peer died, or the leader's order did not arrive in time."""


class Scheduler:
    """Schedules one model's gradient chunks, step after step.

    Args:
        plan: the chunks (same on every rank).
        config: the resolved policy settings.
        backend: starts collectives.
        order: the channel to the other ranks; None when the backend orders collectives itself.
        leader: whether this rank decides the order (rank 0), or follows it.
        on_chunk_done: called (on a backend thread) after each chunk's collective finished.
        rank: for messages.
        timeout_s: how long a follower waits for the leader's next decision and for a chunk it
            was told to start to become ready locally, before failing with a clear error.
        queue_impl: "auto", "native" or "python".
    """

    def __init__(self, plan: ChunkPlan, config: SchedulerConfig, backend: CommBackend, *,
                 order: OrderChannel | None, leader: bool,
                 on_chunk_done: Callable[[Chunk], None], rank: int = 0,
                 timeout_s: float = 300.0, queue_impl: str = "auto",
                 on_event: Callable[[str, int, float], None] | None = None) -> None:
        self.plan = plan
        self.config = config
        self.rank = rank
        self._backend = backend
        self._order = order
        self._leader = leader or order is None
        self._on_chunk_done = on_chunk_done
        self._on_event = on_event
        self._timeout_s = timeout_s
        self._needed = [len(c.parts) for c in plan.chunks]
        self._ready_parts = [0] * len(plan.chunks)
        self._lock = threading.Condition()
        self._ready: set[int] = set()  # follower: chunks ready locally, not yet started
        self._done_in_step = 0
        self.steps_done = 0
        self._error: BaseException | None = None
        self._arrival = itertools.count()
        self._closed = False
        # Chunk ids in the order this rank started them, for the last 64 steps (bounded: a
        # long training run must not grow it), and how many were started in all.
        self.issued: collections.deque[int] = collections.deque(
            maxlen=64 * max(1, len(plan.chunks)))
        self.issued_total = 0
        self._queue = None
        self._thread: threading.Thread | None = None
        self._to_announce: list[int] = []
        self._announcer: threading.Thread | None = None
        if self._leader:
            self._queue = make_queue(config.credit_bytes, "overshoot", impl=queue_impl)
            if self._order is not None:
                self._announcer = threading.Thread(target=self._announce_loop,
                                                   name=f"legato-announce-r{rank}", daemon=True)
                self._announcer.start()
            self._queue.start(self._dispatch)
        else:
            self._thread = threading.Thread(target=self._follow, name=f"legato-follow-r{rank}",
                                            daemon=True)
            self._thread.start()

    # -- input from the adapter ----------------------------------------------------------------
    def tensor_ready(self, key: int) -> None:
        """Task `key`'s gradient is complete for this step (called from the backward hook)."""
        self.raise_if_failed()
        for chunk_id in self.plan.chunks_of(key):
            with self._lock:
                self._ready_parts[chunk_id] += 1
                complete = self._ready_parts[chunk_id] == self._needed[chunk_id]
                if complete and not self._leader:
                    self._event("ready", chunk_id)
                    self._ready.add(chunk_id)
                    self._lock.notify_all()
            if complete and self._leader:
                chunk = self.plan.chunks[chunk_id]
                priority = priority_of(self.config, chunk, next(self._arrival))
                self._event("ready", chunk_id)
                self._queue.post(chunk_id, priority, chunk.nbytes)

    # -- leader --------------------------------------------------------------------------------
    def _dispatch(self, task) -> None:
        """Queue executor (dispatcher thread): start the collective, or with followers hand the
        chunk to the announcer (see [Note: batched announcements])."""
        if self._order is None:
            self._start(self.plan.chunks[task.id])
            return
        with self._lock:
            self._to_announce.append(task.id)
            self._lock.notify_all()

    def _announce_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._to_announce and not self._closed and self._error is None:
                        self._lock.wait()
                    if self._error is not None or (self._closed and not self._to_announce):
                        return
                    ids, self._to_announce = self._to_announce, []
                self._order.announce(ids)
                for chunk_id in ids:
                    self._start(self.plan.chunks[chunk_id])
        except BaseException as err:  # noqa: BLE001 (kept; raised to the training thread)
            self._fail(err if isinstance(err, LegatoError) else CommFailed(
                f"[rank {self.rank}] announcing or starting a message failed: "
                f"{type(err).__name__}: {err}"))

    def _start(self, chunk: Chunk) -> None:
        self.issued.append(chunk.id)
        self.issued_total += 1
        self._event("start", chunk.id)
        self._backend.start(chunk, lambda err, chunk=chunk: self._finished(chunk, err))

    # -- follower ------------------------------------------------------------------------------
    def _follow(self) -> None:
        try:
            while True:
                ids = self._order.receive()
                if not ids:
                    return
                for chunk_id in ids:
                    self._wait_ready(chunk_id)
                    self._start(self.plan.chunks[chunk_id])
        except BaseException as err:  # noqa: BLE001 (kept; raised to the training thread)
            self._fail(err if isinstance(err, LegatoError) else CommFailed(
                f"[rank {self.rank}] following the leader's order failed: "
                f"{type(err).__name__}: {err}"))

    def _wait_ready(self, chunk_id: int) -> None:
        def stopped() -> None:
            if self._error is not None or self._closed:
                raise CommFailed(f"[rank {self.rank}] stopped while waiting for chunk "
                                 f"{chunk_id}")

        def late() -> CommFailed:
            names = ", ".join(self.plan.task(k).name for k in self.plan.chunks[chunk_id].keys)
            return CommFailed(
                f"[rank {self.rank}] the leader started chunk {chunk_id} ({names}) but its "
                f"gradient was not ready here after {self._timeout_s:g} s; do all ranks run the"
                " same model and call backward on every step?")

        with self._lock:
            wait_for(self._lock, lambda: chunk_id in self._ready, self._timeout_s, stopped, late,
                     poll_s=1.0)
            self._ready.discard(chunk_id)

    # -- completion ----------------------------------------------------------------------------
    def _finished(self, chunk: Chunk, err: BaseException | None) -> None:
        if err is not None:
            self._fail(CommFailed(f"[rank {self.rank}] collective for chunk {chunk.id} "
                                  f"({', '.join(self.plan.task(k).name for k in chunk.keys)}) "
                                  f"failed: {type(err).__name__}: {err}"))
            return
        self._event("done", chunk.id)
        if self._queue is not None:
            self._queue.complete(chunk.id)
        with self._lock:
            self._ready_parts[chunk.id] = 0
        try:
            self._on_chunk_done(chunk)
        except BaseException as cb_err:  # noqa: BLE001
            self._fail(cb_err)
            return
        with self._lock:
            self._done_in_step += 1
            if self._done_in_step == len(self.plan.chunks):
                self._done_in_step = 0
                self.steps_done += 1
                self._lock.notify_all()

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
                log.error("%s", err)
            self._lock.notify_all()

    def _event(self, kind: str, chunk_id: int) -> None:
        if self._on_event is not None:
            self._on_event(kind, chunk_id, time.perf_counter())

    # -- control -------------------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        return self._error

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def wait_steps(self, steps: int, timeout_s: float | None = None) -> None:
        """Block until `steps` steps have completed all their chunks, or raise."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        with self._lock:
            wait_for(self._lock, lambda: self.steps_done >= steps, timeout, self.raise_if_failed,
                     lambda: CommFailed(
                         f"[rank {self.rank}] step {steps - 1} not finished after {timeout:g} s:"
                         f" {self._done_in_step} of {len(self.plan.chunks)} messages done; is a"
                         " peer rank dead or stuck?"), poll_s=1.0)
        self.raise_if_failed()

    def set_credit(self, credit_bytes: int | None) -> None:
        """Change the window at a step boundary (leader only; followers have none)."""
        if self._queue is not None:
            self._queue.set_credit(credit_bytes)

    def close(self, timeout_s: float = 30.0, abort: bool = False) -> None:
        """Stop: the leader drains its queue and tells followers; followers stop following.

        `abort` (the optimizer failed: messages in flight may never complete when a peer
        stopped too, as Horovod's wait for every rank's submission): the drain waits 5 s at
        most. It still waits that long, since tearing down a group while a collective runs on
        it aborts the process (gloo)."""
        if self._closed:
            return
        drain_s = min(timeout_s, 5.0) if abort else timeout_s
        if self._queue is not None:
            try:
                self._queue.shutdown(drain=self._error is None, timeout_s=drain_s)
            except (RuntimeError, TimeoutError) as err:
                log.warning("[rank %d] closing the scheduler: %s", self.rank, err)
                self._queue.shutdown(drain=False)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        # A thread still inside a collective on the control group after its join would race
        # any later use of that group (the final announcement, a tuning decision): fail instead.
        if self._announcer is not None:
            self._announcer.join(timeout_s)
            if self._announcer.is_alive():
                self._fail(CommFailed(f"[rank {self.rank}] the announcer did not stop within "
                                      f"{timeout_s:g} s (blocked in a broadcast: is a peer dead?)"))
        if self._queue is not None and self._order is not None and self._error is None:
            try:
                self._order.announce([])
            except Exception as err:  # noqa: BLE001 (a peer gone at the very end)
                self._fail(CommFailed(f"[rank {self.rank}] telling the other ranks to stop "
                                      f"failed: {type(err).__name__}: {err}"))
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._fail(CommFailed(f"[rank {self.rank}] still waiting for the leader's next "
                                      f"message after {timeout_s:g} s; is rank 0 alive?"))
        # Drop the backend and channel (and the process groups they hold) now, not at exit.
        self._backend = self._order = None  # type: ignore[assignment]
