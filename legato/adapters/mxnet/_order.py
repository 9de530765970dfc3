"""Worker 0's dispatch order, sent to the other workers over TCP connections of legato's own
(`SocketOrderChannel`, legato.core.order_socket), and the workers' timelines gathered the same way.

[Note: why not the kvstore] An announcement carried on a kvstore key needs every worker to push
that key each round, so a follower always has a pull in MXNet's engine waiting for worker 0's
next announcement; any `mx.nd.waitall()` in the user's loop would then wait for worker 0's next
step, while worker 0 waits for this worker's gradients: a deadlock. So the kvstore only carries
worker 0's address, once, at construction; announcements go over plain sockets (followers
connect to worker 0), outside the engine. A message is a little-endian int32 count followed by
that many int32 chunk ids; a count of 0 means "no more".
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Callable

from legato.core.errors import LegatoError
from legato.core.order_socket import SocketOrderChannel, local_host, recv_exact

__all__ = ["SocketOrderChannel", "TraceGather", "local_host"]


class TraceGather:
    """Every worker's timeline events onto worker 0, at close, over a connection of legato's
    own ([Note: why not the kvstore]: a worker that failed would leave the others waiting in a
    kvstore pull for ever; a socket gives up after a timeout). Building one is collective, at
    construction: worker 0 listens and `exchange` gives every worker its address.
    A message is the sender's int32 rank, an int64 byte count, then that many bytes of JSON."""

    def __init__(self, rank: int, num_workers: int,
                 exchange: Callable[[tuple[str, int] | None], tuple[str, int]]) -> None:
        self.rank = rank
        self._others = num_workers - 1
        self._server: socket.socket | None = None
        if rank == 0:
            self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._server.bind((local_host(), 0))
            self._server.listen(max(1, self._others))
            self._address = exchange(self._server.getsockname()[:2])
        else:
            self._address = exchange(None)

    def all_gather(self, events: list, timeout_s: float) -> list[list]:
        """Worker 0: its `events` first, then each other worker's that arrived within
        `timeout_s` (in rank order); the others send theirs and get []."""
        if self.rank != 0:
            data = json.dumps(events).encode()
            with socket.create_connection(self._address, timeout=timeout_s) as sock:
                sock.sendall(struct.pack("<iq", self.rank, len(data)) + data)
            return []
        got: dict[int, list] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(got) < self._others:
                self._server.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    peer, _ = self._server.accept()
                except socket.timeout:
                    break
                with peer:
                    peer.settimeout(max(0.1, deadline - time.monotonic()))
                    rank, size = struct.unpack("<iq", recv_exact(peer, 12))
                    got[rank] = json.loads(recv_exact(peer, size))
        finally:
            self.close()
        if len(got) < self._others:
            missing = sorted(set(range(1, self._others + 1)) - set(got))
            raise LegatoError(f"[rank 0] the timelines of workers {missing} did not arrive "
                              f"within {timeout_s:g} s; their spans are in their "
                              "<timeline>.rank<N>.partial.json")
        return [events] + [got[r] for r in sorted(got)]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

