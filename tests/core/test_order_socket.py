"""The socket order channel (legato.core.order_socket) that carries the leader's dispatch order
for MXNet's kvstore and for Horovod: real TCP connections on 127.0.0.1, ranks as threads."""

from __future__ import annotations

import queue
import threading

import pytest

from legato.adapters.horovod_order import horovod_order_channel
from legato.core.errors import LegatoError
from legato.core.order_socket import SocketOrderChannel


def _exchange_among(n: int):
    """exchange(address or None) -> the leader's address, for n ranks (threads)."""
    box: queue.Queue = queue.Queue()

    def exchange(address):
        if address is not None:
            for _ in range(n - 1):
                box.put(address)
            return address
        return box.get(timeout=10)
    return exchange


def _channels(n: int, timeout_s: float = 10.0) -> list[SocketOrderChannel]:
    exchange = _exchange_among(n)
    out: list = [None] * n
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(
        r, SocketOrderChannel(r, n, exchange, timeout_s=timeout_s, host="127.0.0.1")))
        for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(out), "a channel was not built"
    return out


@pytest.mark.timeout(60)
def test_every_follower_gets_the_leaders_announcements_in_order_then_the_end():
    leader, *followers = _channels(3)
    got: dict[int, list] = {1: [], 2: []}

    def follow(channel, rank):
        while ids := channel.receive():
            got[rank].append(ids)

    threads = [threading.Thread(target=follow, args=(c, r + 1)) for r, c in enumerate(followers)]
    for t in threads:
        t.start()
    sent = [[3, 1], [0], list(range(100, 400))]  # one longer than an announcement frame
    for ids in sent:
        leader.announce(ids)
    leader.announce([])
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert got == {1: sent, 2: sent}


@pytest.mark.timeout(60)
def test_a_follower_whose_leader_is_gone_gets_a_clear_error():
    leader, follower = _channels(2)
    for peer in leader._peers:  # the leader's process died: its sockets closed, no [] sent
        peer.close()
    with pytest.raises(LegatoError, match="lost worker 0's order channel"):
        follower.receive()
    follower.close()


@pytest.mark.timeout(60)
def test_a_leader_whose_followers_never_connect_says_so():
    with pytest.raises(LegatoError, match="only 0 of 1 workers connected"):
        SocketOrderChannel(0, 2, lambda address: address, timeout_s=0.5, host="127.0.0.1")


class _Ranks:
    """What horovod_order_channel asks of horovod (rank, size, local_size) for one rank."""

    def __init__(self, rank, size, local_size):
        self.rank, self.size, self.local_size = (lambda: rank), (lambda: size), \
            (lambda: local_size)


@pytest.mark.timeout(60)
def test_horovod_ranks_on_one_host_meet_on_loopback(monkeypatch):
    monkeypatch.delenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", raising=False)
    monkeypatch.delenv("DMLC_NODE_HOST", raising=False)
    exchange = _exchange_among(2)
    out: list = [None, None]
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, horovod_order_channel(
        _Ranks(r, 2, 2), exchange, timeout_s=10))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    leader, follower = out
    assert leader is not None and follower is not None
    assert follower._sock.getpeername()[0] == "127.0.0.1"
    leader.announce([7])
    assert follower.receive() == [7]
    leader.announce([])
    assert follower.receive() == []
