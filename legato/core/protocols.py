"""The small protocols adapters implement for the core (see ../shared DESIGN: the boundary).

Core types only cross them: chunks, ids, byte counts; never a framework tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from legato.core.scheduler.plan import Chunk

__all__ = ["ANNOUNCE_SLOTS", "CommBackend", "OrderChannel", "TRANSPORT_METHODS", "Transport",
           "announcement_frames", "frame_ids"]

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


@runtime_checkable
class Transport(Protocol):
    """What an optimizer wrapper talks to besides its CommBackend: the ranks, a channel for
    the leader's order, small control collectives, and closing. Implemented by the gloo
    transport (legato.adapters.gloo, used by the PyTorch and TensorFlow adapters) and by the
    Horovod transports of both; each also makes the CommBackend for its framework's gradients
    (`backend(...)`, whose arguments are the framework's: tensors differ). MXNet's scheduled
    kvstore is its own backend and channel (a parameter server, not collectives).
    """

    name: str          # "torch" (gloo/NCCL groups), "gloo" (the same from TensorFlow), "horovod"
    rank: int          # this process's global rank
    group_rank: int    # its rank among the transport's ranks (0 leads the order)
    world: int         # how many ranks reduce

    def order_channel(self) -> OrderChannel:
        """The channel carrying group rank 0's dispatch order to the others."""

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order (a control collective)."""

    def broadcast_object(self, obj: Any) -> Any:
        """Group rank 0's `obj`, on every rank."""

    def close(self, healthy: bool = True) -> None:
        """Release the groups; after a failure (`healthy=False`) without waiting for peers."""


TRANSPORT_METHODS = ("order_channel", "all_gather_object", "broadcast_object", "close")

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
