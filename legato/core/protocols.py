"""The small protocols adapters implement for the core (see ../shared DESIGN: the boundary).

Core types only cross them: chunks, ids, byte counts; never a framework tensor.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from legato.core.scheduler.plan import Chunk

__all__ = ["ANNOUNCE_SLOTS", "CommBackend", "OrderChannel", "announcement_frames", "frame_ids"]

Done = Callable[[BaseException | None], None]


class CommBackend(Protocol):
    """Starts one asynchronous collective per chunk and reports its completion."""

    def start(self, chunk: Chunk, on_done: Done) -> None:
        """Begin reducing `chunk`; call `on_done(None)` when finished, `on_done(err)` on failure.

        Must not block on the collective itself. `on_done` may run on any thread.
        """


class OrderChannel(Protocol):
    """Carries the leader's dispatch decisions to the other ranks, in order."""

    def announce(self, chunk_ids: Sequence[int]) -> None:
        """Leader: the next chunks to start, in order. An empty list means "no more"."""

    def receive(self) -> list[int]:
        """Follower: block until the leader's next announcement; [] when it has closed."""


ANNOUNCE_SLOTS = 64


def announcement_frames(chunk_ids: Sequence[int], slots: int = ANNOUNCE_SLOTS):
    """An announcement as fixed-size int64 frames for a broadcast: [count, id, id, ..., 0 ...],
    `slots` ids at most per frame; an empty announcement ("no more") is one frame of count 0."""
    import numpy as np

    ids = list(chunk_ids)
    for i in range(0, max(1, len(ids)), slots):
        batch = ids[i:i + slots]
        frame = np.zeros(slots + 1, np.int64)
        frame[0] = len(batch)
        frame[1:len(batch) + 1] = batch
        yield frame


def frame_ids(frame) -> list[int]:
    """The chunk ids a received frame carries ([] for the last)."""
    return [int(v) for v in frame[1:int(frame[0]) + 1]]
