"""The leader's dispatch order carried to the other ranks over TCP connections of legato's own,
for transports whose own collectives would queue it behind gradients: MXNet's kvstore (see
legato.adapters.mxnet._order [Note: why not the kvstore]) and Horovod (one collective at a time
on its background thread, so an announcement broadcast over Horovod waits for the all-reduce
before it, and each costs a negotiation round; see legato.adapters.horovod_order).

A message is a little-endian int32 count followed by that many int32 chunk ids; a count of 0
means "no more". Building a channel is collective: the leader listens, and an `exchange` of the
transport's own (a kvstore key, a Horovod object broadcast) gives every rank its address.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Callable, Sequence

from legato.core.errors import LegatoError

__all__ = ["SocketOrderChannel", "local_host", "recv_exact"]


def local_host(toward: str | None = None) -> str:
    """This rank's address as the other ranks reach it: DMLC_NODE_HOST when set (legato's
    launcher and MXNet's set it), else the address that routes to `toward` (a host every rank
    reaches: the PS scheduler, Horovod's rendezvous; default DMLC_PS_ROOT_URI, else
    127.0.0.1)."""
    host = os.environ.get("DMLC_NODE_HOST")
    if host:
        return host
    root = toward or os.environ.get("DMLC_PS_ROOT_URI", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((root, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def recv_exact(sock: socket.socket, n: int) -> bytes:
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
        host: the address worker 0 listens on (default: `local_host()`).
    """

    def __init__(self, rank: int, num_workers: int,
                 exchange: Callable[[tuple[str, int] | None], tuple[str, int]], *,
                 timeout_s: float, host: str | None = None) -> None:
        self.rank = rank
        self._peers: list[socket.socket] = []
        self._sock: socket.socket | None = None
        self._closed = False
        if rank == 0:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                server.bind((host or local_host(), 0))
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
                            "all workers building the scheduled optimizer?") from err
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
            (count,) = struct.unpack("<i", recv_exact(self._sock, 4))
            ids = list(struct.unpack(f"<{count}i", recv_exact(self._sock, 4 * count)))
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
