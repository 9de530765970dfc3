"""legato's gloo transport: torch.distributed groups of its own, a CommBackend that all-reduces
gradient chunks on them, and an OrderChannel, used by the PyTorch adapter and, with DLPack
views of TensorFlow's gradients, by the TensorFlow adapter (legato.adapters.tensorflow.comm).

The groups are created collectively when an optimizer wrapper is built, so a user's own
collectives on the default group can never interleave with legato's. CUDA gradients may go
through legato's own NCCL communicator instead (legato.adapters.torch.comm, opt-in).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from legato._extras import require

require("torch", what="legato's gloo transport (legato.adapters.gloo: ScheduledOptimizer's "
        "backend='gloo', also from TensorFlow, runs on torch.distributed)")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.protocols import ANNOUNCE_SLOTS, Done, announcement_frames, frame_ids
from legato.core.scheduler.plan import Chunk

__all__ = ["TorchCommBackend", "TorchDistTransport", "TorchOrderChannel", "WriteCounts",
           "chunk_buffer", "copy_back"]

log = logging.getLogger(__name__)


class WriteCounts:
    """How many in-place writes a backend made to each gradient since it was last asked.

    A tensor's `_version` counts its in-place writes; the optimizer compares a gradient's
    version when it was handed over, plus the writes counted here, with its version once
    reduced, to find writes that were not legato's (see ScheduledOptimizer's [Note: gradients
    changed in flight]). Writes come from the dispatcher and the completion threads.
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}

    def add(self, key: int, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def take(self, key: int) -> int:
        with self._lock:
            return self._counts.pop(key, 0)


class TorchCommBackend:
    """All-reduces (sum, pre-divided by the world size, as DDP does) chunks of gradients.

    A single-part chunk of a contiguous gradient is reduced in place on a view of it (no copy).
    A merged chunk of contiguous gradients is copied into a flat buffer kept for that chunk
    (allocated once, not every step), and when `set_grad` is given the reduced gradients become
    views of that buffer instead of being copied back ([Note: gradients as bucket views]);
    otherwise, and for parts of non-contiguous gradients, the buffer is copied back.

    [Note: gradients as bucket views] A merged chunk's buffer is overwritten by the next step's
    copy, which starts only once every member's gradient of that step exists, i.e. after each
    member's backward, after its forward, after its previous update (dependency proxies, or
    plain's blocking step), and every update ends by dropping `.grad`. So no view of the
    buffer is alive when it is overwritten. DDP's `gradient_as_bucket_view` saves the same
    copy the same way.

    With `compression` (torch.float16 or torch.bfloat16) a float32 or float64 chunk travels
    in that type, as DDP's fp16_compress_hook and bf16_compress_hook send it: cast, divided by
    the world size in the narrow type, summed, and cast back into the chunk; with
    `divide_after`, divided after the sum, as Horovod's Compression.fp16 with op=Average does
    (the two differ where a halved value is subnormal in the narrow type).

    Args:
        grads: returns the current gradient tensor of task `key`.
        group: the process group to reduce over.
        set_grad: set_grad(key, tensor) replaces task `key`'s gradient (see above).
        compression: the dtype on the wire, or None.
        divide_after: with compression, divide by the world size after the sum (Horovod's
            order) rather than before (DDP's).
    """

    def __init__(self, grads: Callable[[int], torch.Tensor], group,
                 set_grad: Callable[[int, torch.Tensor], None] | None = None,
                 compression: torch.dtype | None = None, divide_after: bool = False) -> None:
        self._grads = grads
        self._set_grad = set_grad
        self._compression = compression
        self._divide_after = divide_after
        self._group = group
        self.world = dist.get_world_size(group)
        self._scale = 1.0 / self.world
        self._buffers: dict[int, torch.Tensor] = {}
        self.writes = WriteCounts()
        # [Note: done means reduced]
        self._wait_device = "nccl" in str(dist.get_backend(group)).lower()
        # The collectives started, kept until they are waited for on the closing thread: a
        # Work holds its group, and a group whose last reference goes in one of its own worker
        # threads (a Work finishing after close) joins that thread and aborts the process.
        self._works: list = []

    def _merged_buffer(self, chunk: Chunk) -> torch.Tensor | None:
        """The chunk's kept buffer filled with its gradients, or None (not all contiguous)."""
        grads = [self._grads(p.key) for p in chunk.parts]
        if not all(g.is_contiguous() for g in grads):
            return None
        numel = sum(g.numel() for g in grads)
        buf = self._buffers.get(chunk.id)
        if (buf is None or buf.numel() != numel or buf.dtype != grads[0].dtype
                or buf.device != grads[0].device):
            buf = self._buffers[chunk.id] = torch.empty(numel, dtype=grads[0].dtype,
                                                        device=grads[0].device)
        torch.cat([g.view(-1) for g in grads], out=buf)
        return buf

    def start(self, chunk: Chunk, on_done: Done) -> None:
        views = False
        if chunk.merged and (buffer := self._merged_buffer(chunk)) is not None:
            direct, views = False, self._set_grad is not None
        else:
            buffer, direct = chunk_buffer(self._grads, chunk)
        wire = buffer
        if self._compression is not None and buffer.dtype in (torch.float32, torch.float64):
            wire = buffer.to(self._compression)
            if not self._divide_after:
                wire.div_(self.world)
        else:
            buffer.mul_(self._scale)
            if direct:  # a view of the gradient: this wrote to it (all_reduce bumps no version)
                self.writes.add(chunk.parts[0].key)
        work = dist.all_reduce(wire, group=self._group, async_op=True)
        self._works = [w for w in self._works if not w.is_completed()] + [work]

        def finished(fut: torch.futures.Future) -> None:
            try:
                fut.value()
                if wire is not buffer:
                    if self._divide_after:
                        wire.div_(self.world)
                    buffer.copy_(wire)
                    if direct:
                        self.writes.add(chunk.parts[0].key)
                if views:
                    pos = 0
                    for part in chunk.parts:
                        grad = self._grads(part.key)
                        n = grad.numel()
                        self._set_grad(part.key, buffer.narrow(0, pos, n).view_as(grad))
                        pos += n
                elif not direct:
                    copy_back(self._grads, chunk, buffer, self.writes)
                if self._wait_device and buffer.is_cuda:
                    torch.cuda.current_stream(buffer.device).synchronize()
            except BaseException as err:  # noqa: BLE001 (reported to the scheduler)
                on_done(err)
                return
            on_done(None)

        # [Note: done means reduced] The scheduler frees a chunk's credit, and the optimizer
        # updates its layer, once on_done(None) says the chunk is reduced. gloo completes its
        # future after the collective; for CUDA tensors its worker first makes the device's
        # default stream wait for gloo's copy back from host memory, and this callback's
        # copies and legato's updates are queued on that default stream after it: ordered.
        # NCCL (through torch.distributed) completes the future as soon as the collective is
        # enqueued: the callback runs at once, here, on a pool stream that waits for NCCL's,
        # and nothing would order the updater's stream after it. So on NCCL the callback waits
        # for its stream: one all-reduce in flight per rank (NCCL runs them one after another
        # on its stream anyway), and done means reduced.
        work.get_future().add_done_callback(finished)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait (on the calling thread, `timeout_s` at most each) for the collectives started,
        finished or failed, and drop them here (see `_works`)."""
        import datetime

        for work in self._works:
            try:
                work.wait(datetime.timedelta(seconds=timeout_s))
            except Exception:  # noqa: BLE001 (a failed collective is settled too)
                pass
        self._works = []


def chunk_buffer(grads: Callable[[int], torch.Tensor], chunk: Chunk) -> tuple[torch.Tensor, bool]:
    """The tensor to reduce for `chunk`, and whether it is a view of the gradient itself.

    A single part of a contiguous gradient is a view (no copy); a merged chunk or a part of a
    non-contiguous gradient is a new flat buffer, to be copied back with `copy_back`.
    """
    views = []
    for part in chunk.parts:
        grad = grads(part.key)
        flat = grad.view(-1) if grad.is_contiguous() else grad.reshape(-1)
        views.append(flat.narrow(0, part.offset // grad.element_size(),
                                 part.nbytes // grad.element_size()))
    if len(views) == 1 and grads(chunk.parts[0].key).is_contiguous():
        return views[0], True
    return torch.cat([v.reshape(-1) for v in views]), False


def copy_back(grads: Callable[[int], torch.Tensor], chunk: Chunk, buffer: torch.Tensor,
              writes: WriteCounts | None = None) -> None:
    """Scatter a reduced flat buffer back into the gradients its chunk came from (one in-place
    write per part, counted in `writes`)."""
    pos = 0
    for part in chunk.parts:
        grad = grads(part.key)
        if writes is not None:
            writes.add(part.key)
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
        self._buf = torch.zeros(ANNOUNCE_SLOTS + 1, dtype=torch.int64)
        self._src = dist.get_global_rank(group, 0) if hasattr(dist, "get_global_rank") else 0

    def announce(self, chunk_ids: Sequence[int]) -> None:
        for frame in announcement_frames(chunk_ids):
            dist.broadcast(torch.from_numpy(frame), src=self._src, group=self._group)

    def receive(self) -> list[int]:
        dist.broadcast(self._buf, src=self._src, group=self._group)
        return frame_ids(self._buf.numpy())


class TorchDistTransport:
    """legato's own groups over torch.distributed: one for gradients, one (gloo) for control."""

    name = "torch"

    def __init__(self, process_group, timeout_s: float) -> None:
        import datetime

        from legato.core.errors import BackendUnavailable

        if not dist.is_available() or not dist.is_initialized():
            raise BackendUnavailable("torch.distributed is not initialized; call "
                                     "torch.distributed.init_process_group(...) first (torchrun "
                                     "sets the environment it needs)")
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        timeout = datetime.timedelta(seconds=timeout_s)
        self.comm_group = dist.new_group(ranks=ranks, timeout=timeout,
                                         backend=dist.get_backend(process_group))
        self.ctrl_group = dist.new_group(ranks=ranks, timeout=timeout, backend="gloo")
        # The main thread's small collectives (mixed precision's overflow flag) while the
        # scheduler's threads use the other two.
        self.flag_group = dist.new_group(ranks=ranks, timeout=timeout, backend="gloo")
        self.rank = dist.get_rank()
        self.group_rank = dist.get_rank(self.comm_group)
        self.world = dist.get_world_size(self.comm_group)
        self._nccl_tried = False
        self._nccl = None  # legato.adapters.torch.comm.NativeNcclCommBackend, once chosen
        self._backends: list[TorchCommBackend] = []  # the current one, settled before the
        # groups go

    def backend(self, grads: Callable[[int], torch.Tensor],
                device: torch.device | None = None,
                set_grad: Callable[[int, torch.Tensor], None] | None = None,
                compression: torch.dtype | None = None, divide_after: bool = False):
        """The backend for gradients on `device` (collective: every rank calls it).

        CUDA gradients go through legato's own NCCL communicator (NativeNcclCommBackend) when
        LEGATO_NATIVE_NCCL=1 on every rank and every rank can load NCCL (opt-in: that path has
        run on one GPU in legato's own tests, not yet across several); otherwise, and on CPU,
        through torch.distributed on the comm group (gloo, or NCCL through torch). The first
        call agrees the choice across ranks; the native communicator is kept across plans.
        """
        import os

        from legato.core.errors import ConfigError

        if not self._nccl_tried:
            self._nccl_tried = True
            want = (device is not None and device.type == "cuda"
                    and os.environ.get("LEGATO_NATIVE_NCCL", "0") == "1")
            wants = self.all_gather_object(want)
            if any(w != wants[0] for w in wants):
                raise ConfigError("ranks disagree on the native NCCL backend (LEGATO_NATIVE_NCCL"
                                  f"=1 and CUDA gradients, per rank: {wants}); set the same "
                                  "environment and devices on every rank")
            if want:
                from legato.adapters.torch.comm import make_nccl_backend

                if compression is not None:
                    raise ConfigError("compression is not built for the native NCCL backend "
                                      "(LEGATO_NATIVE_NCCL=1); unset that variable to compress "
                                      "through torch.distributed")
                self._nccl = make_nccl_backend(grads, self.ctrl_group, device)
        if self._nccl is not None:
            return self._nccl
        for old in self._backends:  # an earlier plan's (tuning): its collectives are done
            old.settle()
        backend = TorchCommBackend(grads, self.comm_group, set_grad, compression, divide_after)
        self._backends = [backend]
        return backend

    def order_channel(self) -> TorchOrderChannel:
        return TorchOrderChannel(self.ctrl_group)

    def all_gather_object(self, obj) -> list:
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.ctrl_group)
        return out

    def broadcast_object(self, obj):
        """Group rank 0's `obj`, on every rank (over the control group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.ctrl_group, 0),
                                   group=self.ctrl_group)
        return box[0]

    def any_flag(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set (a small all-reduce; every rank calls it)."""
        box = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(box, group=self.flag_group)
        return bool(box.item() > 0)

    @torch.no_grad()
    def broadcast_from_first(self, tensors) -> None:
        src = dist.get_global_rank(self.comm_group, 0)
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src, group=self.comm_group)

    def close(self, healthy: bool = True) -> None:
        """Destroy legato's own groups now, and drop every reference to them (after a failure,
        the native NCCL communicator is aborted rather than drained: a dead peer would never
        let its pending all-reduces finish).

        A gloo group that is still referenced at interpreter exit is destroyed by the final
        garbage collection, where its worker threads can abort the process ("terminate called
        without an active exception"); destroying it here, on the closing thread, cannot.
        """
        for backend in self._backends:
            backend.settle()
        self._backends = []
        nccl = self._nccl
        if nccl is not None:
            try:
                nccl.close() if healthy else nccl.abort()
            except Exception as err:  # noqa: BLE001 (closing: log and go on)
                log.warning("closing legato's NCCL communicator: %s", err)
            self._nccl = None
        for group in (self.comm_group, self.ctrl_group, self.flag_group):
            if group is None:
                continue
            try:
                if dist.is_initialized():
                    dist.destroy_process_group(group)
            except (RuntimeError, ValueError) as err:
                log.debug("destroying legato's process group: %s", err)
        self.comm_group = self.ctrl_group = self.flag_group = None
