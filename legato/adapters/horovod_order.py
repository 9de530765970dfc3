"""The leader's dispatch order for legato over Horovod (PyTorch and TensorFlow alike), carried
over a TCP connection of legato's own rather than Horovod's broadcast.

[Note: order outside Horovod] Horovod runs one collective at a time on its background thread,
after negotiating each with its coordinator. An order announcement sent as a Horovod broadcast
therefore waits for whichever all-reduce is running (the first layers' message, announced at
the end of backward, waited behind a 6 MiB weight's all-reduce on the VGG-style CNN) and pays
a negotiation round of its own, while the link idles. Over a socket the announcement arrives
at once; the chunks it names still run in Horovod's order of submission, which is the same on
every rank, as the deadlock argument needs (legato.adapters.torch.comm.HorovodCommBackend).
Rank 0's address is exchanged once per channel with Horovod's object broadcast.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from legato.core.order_socket import SocketOrderChannel, local_host

__all__ = ["horovod_order_channel"]


def horovod_order_channel(hvd, broadcast_object: Callable[[Any], Any], *,
                          timeout_s: float) -> SocketOrderChannel:
    """A socket order channel among Horovod's ranks (collective: every rank calls it in the
    same order). Rank 0 listens on the address that routes to Horovod's rendezvous server
    (horovodrun's gloo controller) or, without one, on loopback when every rank is on this host
    and on the host's own name's address otherwise (MPI)."""
    host = None
    if hvd.rank() == 0:
        rendezvous = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
        if rendezvous:
            host = local_host(toward=rendezvous)
        elif hvd.local_size() == hvd.size():
            host = "127.0.0.1"
        else:
            import socket

            host = socket.gethostbyname(socket.gethostname())
    return SocketOrderChannel(hvd.rank(), hvd.size(), broadcast_object, timeout_s=timeout_s,
                              host=host)
