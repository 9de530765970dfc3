"""Worker 0's dispatch order, sent to the other workers over TCP connections of legato's own.

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
import os
import socket
import struct
import time
from typing import Callable, Sequence

from legato.core.errors import LegatoError

__all__ = ["SocketOrderChannel", "TraceGather", "local_host"]


def local_host() -> str:
    """This worker's address as the other workers reach it: DMLC_NODE_HOST when set (legato's
    launcher and MXNet's sets it), else the address that routes to the PS scheduler."""
    host = os.environ.get("DMLC_NODE_HOST")
    if host:
        return host
    root = os.environ.get("DMLC_PS_ROOT_URI", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((root, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("connection closed")
        data += part
    return bytes(data)


class SocketOrderChannel:
    """An `OrderChannel` (legato.core.protocols): worker 0 announces, the others receive.

    Building one is collective: `exchange(host, port)` must give every worker worker 0's
    address (worker 0 passes its own, the others pass None).

    Args:
        rank: this worker's rank (0 leads).
        num_workers: how many workers.
        exchange: exchange(address or None) -> worker 0's (host, port), on every worker.
        timeout_s: how long connecting and accepting may take.
    """

    def __init__(self, rank: int, num_workers: int,
                 exchange: Callable[[tuple[str, int] | None], tuple[str, int]], *,
                 timeout_s: float) -> None:
        self.rank = rank
        self._peers: list[socket.socket] = []
        self._sock: socket.socket | None = None
        self._closed = False
        if rank == 0:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                server.bind((local_host(), 0))
                server.listen(max(1, num_workers - 1))
                exchange(server.getsockname()[:2])
                server.settimeout(timeout_s)
                for _ in range(num_workers - 1):
                    try:
                        peer, _ = server.accept()
                    except socket.timeout as err:
                        raise LegatoError(
                            f"[rank 0] only {len(self._peers)} of {num_workers - 1} workers "
                            f"connected to legato's order channel within {timeout_s:g} s; are "
                            "all workers building the ScheduledTrainer?") from err
                    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    peer.settimeout(None)
                    self._peers.append(peer)
            finally:
                server.close()
        else:
            host, port = exchange(None)
            try:
                self._sock = socket.create_connection((host, port), timeout=timeout_s)
            except OSError as err:
                raise LegatoError(f"[rank {rank}] cannot connect to worker 0's order channel at "
                                  f"{host}:{port}: {err}; can the workers reach each other?"
                                  ) from err
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.settimeout(None)  # idle between steps for as long as the user likes

    def announce(self, chunk_ids: Sequence[int]) -> None:
        """Worker 0: the next chunks to start, in order; [] means no more."""
        ids = list(chunk_ids)
        message = struct.pack(f"<i{len(ids)}i", len(ids), *ids)
        for peer in self._peers:
            peer.sendall(message)
        if not ids:
            self.close()

    def receive(self) -> list[int]:
        """Other workers: block until worker 0's next announcement; [] when it has finished."""
        if self._sock is None:
            return []
        try:
            (count,) = struct.unpack("<i", _recv_exact(self._sock, 4))
            ids = list(struct.unpack(f"<{count}i", _recv_exact(self._sock, 4 * count)))
        except (ConnectionError, OSError) as err:
            if self._closed:
                return []
            raise LegatoError(f"[rank {self.rank}] lost worker 0's order channel ({err}); is "
                              "worker 0 alive?") from err
        if not ids:
            self.close()
        return ids

    def close(self) -> None:
        """Close the connections (wakes a follower blocked in `receive`, which returns [])."""
        self._closed = True
        for s in self._peers + ([self._sock] if self._sock is not None else []):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self._peers = []
        self._sock = None


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
                    rank, size = struct.unpack("<iq", _recv_exact(peer, 12))
                    got[rank] = json.loads(_recv_exact(peer, size))
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

