"""Framework-free stand-ins for the core's protocols, for tests and the simulator.

- `NullBackend`: completes every chunk (at once, or after a delay on a timer thread).
- `ThreadCollective`: N in-process "ranks" sharing one collective, which, like gloo, completes
  the k-th operation only when every rank has issued its k-th operation, and records an error
  if ranks issue different chunks at the same position (where gloo would hang or mix data).
- `LocalOrderChannel`: the leader's announcements delivered to in-process followers.
"""

from __future__ import annotations

import queue
import threading
from typing import Sequence

from legato.core.protocols import Done
from legato.core.scheduler.plan import Chunk

__all__ = ["LocalOrderChannel", "NullBackend", "ThreadCollective"]


class NullBackend:
    """Completes each chunk immediately, or after `delay_s` on a timer thread."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.started: list[int] = []

    def start(self, chunk: Chunk, on_done: Done) -> None:
        self.started.append(chunk.id)
        if self.delay_s <= 0:
            on_done(None)
        else:
            threading.Timer(self.delay_s, on_done, args=(None,)).start()


class ThreadCollective:
    """One collective shared by `world` in-process ranks; `backend(rank)` is a rank's view."""

    def __init__(self, world: int, delay_s: float = 0.0) -> None:
        self.world = world
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._ops: dict[int, list[tuple[int, int, Done]]] = {}
        self._count = [0] * world
        self.errors: list[str] = []
        self.sequence: list[int] = []  # chunk ids in completed order

    def backend(self, rank: int) -> "_RankView":
        return _RankView(self, rank)

    def _issue(self, rank: int, chunk: Chunk, on_done: Done) -> None:
        with self._lock:
            k = self._count[rank]
            self._count[rank] += 1
            entries = self._ops.setdefault(k, [])
            entries.append((rank, chunk.id, on_done))
            if len(entries) < self.world:
                return
            del self._ops[k]
            ids = {cid for _, cid, _ in entries}
            if len(ids) != 1:
                self.errors.append(f"operation {k}: ranks issued different chunks "
                                   f"{sorted((r, cid) for r, cid, _ in entries)}")
            self.sequence.append(entries[0][1])
        callbacks = [cb for _, _, cb in entries]
        err = RuntimeError(self.errors[-1]) if len(ids) != 1 else None

        def finish() -> None:
            for cb in callbacks:
                cb(err)

        if self.delay_s > 0:
            threading.Timer(self.delay_s, finish).start()
        else:
            finish()


class _RankView:
    def __init__(self, collective: ThreadCollective, rank: int) -> None:
        self._collective = collective
        self.rank = rank

    def start(self, chunk: Chunk, on_done: Done) -> None:
        self._collective._issue(self.rank, chunk, on_done)


class LocalOrderChannel:
    """The leader's announcements, fanned out to `followers` in-process queues."""

    def __init__(self, followers: int) -> None:
        self._queues = [queue.Queue() for _ in range(followers)]

    def leader(self) -> "LocalOrderChannel":
        return self

    def follower(self, index: int) -> "_FollowerEnd":
        return _FollowerEnd(self._queues[index])

    def announce(self, chunk_ids: Sequence[int]) -> None:
        for q in self._queues:
            q.put(list(chunk_ids))

    def receive(self) -> list[int]:  # the leader never receives
        raise RuntimeError("the leader does not receive announcements")


class _FollowerEnd:
    def __init__(self, q: queue.Queue) -> None:
        self._q = q

    def announce(self, chunk_ids: Sequence[int]) -> None:
        raise RuntimeError("a follower does not announce")

    def receive(self) -> list[int]:
        return self._q.get()
