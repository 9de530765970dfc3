"""The small protocols adapters implement for the core (see ../shared DESIGN: the boundary).

Core types only cross them: chunks, ids, byte counts; never a framework tensor.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from legato.core.scheduler.plan import Chunk

__all__ = ["CommBackend", "OrderChannel"]

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
