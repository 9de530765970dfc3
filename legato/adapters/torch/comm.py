"""Communication over torch.distributed: a CommBackend for gradient chunks, an OrderChannel.

Both run on process groups of their own, created collectively when the optimizer wrapper is
built, so a user's own collectives on the default group can never interleave with legato's.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from legato.core.protocols import Done
from legato.core.scheduler.plan import Chunk

__all__ = ["TorchCommBackend", "TorchOrderChannel"]

log = logging.getLogger(__name__)

# Announcements carry up to this many chunk ids; the first element is the count.
_ANNOUNCE_SLOTS = 64


class TorchCommBackend:
    """All-reduces (sum, pre-divided by the world size, as DDP does) chunks of gradients.

    A single-part chunk of a contiguous gradient is reduced in place on a view of it (no copy);
    a merged chunk, or a part of a non-contiguous gradient, goes through a flat buffer that is
    copied back when the collective has finished.

    Args:
        grads: returns the current gradient tensor of task `key`.
        group: the process group to reduce over.
    """

    def __init__(self, grads: Callable[[int], torch.Tensor], group) -> None:
        self._grads = grads
        self._group = group
        self.world = dist.get_world_size(group)
        self._scale = 1.0 / self.world

    def _views(self, chunk: Chunk) -> list[torch.Tensor]:
        views = []
        for part in chunk.parts:
            grad = self._grads(part.key)
            flat = grad.view(-1) if grad.is_contiguous() else grad.reshape(-1)
            start = part.offset // grad.element_size()
            views.append(flat.narrow(0, start, part.nbytes // grad.element_size()))
        return views

    def start(self, chunk: Chunk, on_done: Done) -> None:
        views = self._views(chunk)
        direct = len(views) == 1 and self._grads(chunk.parts[0].key).is_contiguous()
        if direct:
            buffer = views[0]
        else:
            buffer = torch.cat([v.reshape(-1) for v in views])
        buffer.mul_(self._scale)
        work = dist.all_reduce(buffer, group=self._group, async_op=True)

        def finished(fut: torch.futures.Future) -> None:
            try:
                fut.value()
                if not direct:
                    self._copy_back(chunk, buffer)
            except BaseException as err:  # noqa: BLE001 (reported to the scheduler)
                on_done(err)
                return
            on_done(None)

        work.get_future().add_done_callback(finished)

    def _copy_back(self, chunk: Chunk, buffer: torch.Tensor) -> None:
        pos = 0
        for part in chunk.parts:
            grad = self._grads(part.key)
            n = part.nbytes // grad.element_size()
            start = part.offset // grad.element_size()
            src = buffer.narrow(0, pos, n)
            if grad.is_contiguous():
                grad.view(-1).narrow(0, start, n).copy_(src)
            else:  # write through the strided gradient: a flat copy, then back
                flat = grad.reshape(-1).clone()
                flat.narrow(0, start, n).copy_(src)
                grad.copy_(flat.view_as(grad))
            pos += n


class TorchOrderChannel:
    """Rank 0's dispatch decisions, broadcast to the other ranks over a gloo group."""

    def __init__(self, group) -> None:
        self._group = group
        self._buf = torch.zeros(_ANNOUNCE_SLOTS + 1, dtype=torch.int64)
        self._src = dist.get_global_rank(group, 0) if hasattr(dist, "get_global_rank") else 0

    def announce(self, chunk_ids: Sequence[int]) -> None:
        ids = list(chunk_ids)
        for i in range(0, max(1, len(ids)), _ANNOUNCE_SLOTS):
            batch = ids[i:i + _ANNOUNCE_SLOTS]
            buf = torch.zeros(_ANNOUNCE_SLOTS + 1, dtype=torch.int64)
            buf[0] = len(batch)
            if batch:
                buf[1:len(batch) + 1] = torch.tensor(batch, dtype=torch.int64)
            dist.broadcast(buf, src=self._src, group=self._group)

    def receive(self) -> list[int]:
        dist.broadcast(self._buf, src=self._src, group=self._group)
        n = int(self._buf[0])
        return self._buf[1:n + 1].tolist()
