"""Communication over torch.distributed: a CommBackend for gradient chunks, an OrderChannel.

Both run on process groups of their own, created collectively when the optimizer wrapper is
built, so a user's own collectives on the default group can never interleave with legato's.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.protocols import ANNOUNCE_SLOTS, Done, announcement_frames, frame_ids
from legato.core.scheduler.plan import Chunk

__all__ = ["HorovodCommBackend", "HorovodOrderChannel", "HorovodTransport",
           "NativeNcclCommBackend", "TorchCommBackend", "TorchDistTransport", "TorchOrderChannel",
           "make_nccl_backend", "native_nccl_status"]

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
    the world size in the narrow type, summed, and cast back into the chunk.

    Args:
        grads: returns the current gradient tensor of task `key`.
        group: the process group to reduce over.
        set_grad: set_grad(key, tensor) replaces task `key`'s gradient (see above).
        compression: the dtype on the wire, or None.
    """

    def __init__(self, grads: Callable[[int], torch.Tensor], group,
                 set_grad: Callable[[int, torch.Tensor], None] | None = None,
                 compression: torch.dtype | None = None) -> None:
        self._grads = grads
        self._set_grad = set_grad
        self._compression = compression
        self._group = group
        self.world = dist.get_world_size(group)
        self._scale = 1.0 / self.world
        self._buffers: dict[int, torch.Tensor] = {}
        self.writes = WriteCounts()

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
            wire = buffer.to(self._compression).div_(self.world)
        else:
            buffer.mul_(self._scale)
            if direct:  # a view of the gradient: this wrote to it (all_reduce bumps no version)
                self.writes.add(chunk.parts[0].key)
        work = dist.all_reduce(wire, group=self._group, async_op=True)

        def finished(fut: torch.futures.Future) -> None:
            try:
                fut.value()
                if wire is not buffer:
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
            except BaseException as err:  # noqa: BLE001 (reported to the scheduler)
                on_done(err)
                return
            on_done(None)

        work.get_future().add_done_callback(finished)


# The torch dtypes NCCL reduces, by the names legato._native.NcclComm.all_reduce takes.
_NCCL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def native_nccl_status() -> dict:
    """Whether legato._native can issue NCCL all-reduces here: legato._native.nccl_status().

    Returns:
        {"available", "reason", "version", "version_text", "nccl_library", "cudart_library"};
        the first call loads NCCL and the CUDA runtime (after `import torch`, the copies torch
        loaded are reused).
    """
    try:
        from legato import _native
    except ImportError as err:
        reason = f"legato._native is not built ({err}); run `pip install -e .`"
    else:
        if hasattr(_native, "nccl_status"):
            return _native.nccl_status()
        reason = "this build of legato._native predates NCCL support; run `pip install -e .`"
    return {"available": False, "reason": reason, "version": None, "version_text": None,
            "nccl_library": None, "cudart_library": None}


def _local_nccl_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the gradients are on {device}, not a CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    status = native_nccl_status()
    return None if status["available"] else status["reason"]


class NativeNcclCommBackend:
    """All-reduces (avg) chunks of CUDA gradients with NCCL calls issued by legato._native.

    The same interface as TorchCommBackend, on a communicator of legato's own: rank 0 of `group`
    makes the NCCL unique id and `group` carries it to the others. Each all-reduce runs on the
    communicator's stream after the work already queued on the calling thread's current stream;
    a native poller thread reports completion, and a merged chunk is copied back on that same
    current stream. Construction is collective over `group`: if any rank cannot use NCCL, every
    rank raises BackendUnavailable naming the ranks and reasons.

    Args:
        grads: returns the current gradient tensor of task `key` (on `device`).
        group: a process group that broadcasts Python objects, e.g. TorchDistTransport's gloo
            ctrl_group; its ranks are the communicator's ranks.
        device: the CUDA device of the gradients (an index, "cuda:1" or a torch.device).
    """

    def __init__(self, grads: Callable[[int], torch.Tensor], group, device) -> None:
        self._grads = grads
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        problems: list = [None] * self.world
        dist.all_gather_object(problems, _local_nccl_problem(self._device), group=group)
        bad = [f"rank {r}: {why}" for r, why in enumerate(problems) if why]
        if bad:
            raise BackendUnavailable("the native NCCL backend is unavailable (" + "; ".join(bad) +
                                     "); use TorchCommBackend, or fix the cause on those ranks")
        from legato import _native

        holder: list = [None]
        if self.rank == 0:
            try:
                holder[0] = _native.nccl_unique_id()
            except RuntimeError as err:  # tell the other ranks instead of leaving them waiting
                holder[0] = f"ncclGetUniqueId failed on rank 0: {err}"
        src = 0 if group is None or group is dist.group.WORLD else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(holder, src=src, group=group)
        if isinstance(holder[0], str):
            raise BackendUnavailable(holder[0])
        self._comm = _native.NcclComm(holder[0], self.rank, self.world, self._device.index)
        self.writes = WriteCounts()
        log.debug("[rank %d] native NCCL communicator of %d ranks on %s", self.rank, self.world,
                  self._device)

    def start(self, chunk: Chunk, on_done: Done) -> None:
        buffer, direct = chunk_buffer(self._grads, chunk)
        dtype = _NCCL_DTYPES.get(buffer.dtype)
        if dtype is None or buffer.device != self._device:
            raise ConfigError(f"chunk {chunk.id} is {buffer.dtype} on {buffer.device}; the native "
                              f"NCCL backend reduces {sorted(_NCCL_DTYPES.values())} on "
                              f"{self._device}")
        stream = torch.cuda.current_stream(self._device)

        def finished(err: BaseException | None) -> None:
            # On the native poller thread, GIL held. The closure keeps `buffer` alive until now.
            if err is None and not direct:
                try:
                    with torch.cuda.stream(stream):
                        copy_back(self._grads, chunk, buffer, self.writes)
                except BaseException as copy_err:  # noqa: BLE001 (reported to the scheduler)
                    err = copy_err
            on_done(err)

        self._comm.all_reduce(buffer.data_ptr(), buffer.numel(), dtype, "avg", stream=0,
                              wait_stream=stream.cuda_stream, callback=finished)

    def close(self) -> None:
        """Wait for pending all-reduces, then destroy the communicator."""
        self._comm.close()

    def abort(self) -> None:
        """Abort the communicator; pending chunks report an error to the scheduler."""
        self._comm.abort()


def make_nccl_backend(grads: Callable[[int], torch.Tensor], group,
                      device) -> NativeNcclCommBackend | None:
    """NativeNcclCommBackend when every rank of `group` can use it, else None (reason logged).

    Collective over `group` (call it on every rank); every rank gets the same answer. The
    condition is: the gradients are on a CUDA device and native_nccl_status()["available"].
    """
    try:
        return NativeNcclCommBackend(grads, group, device)
    except BackendUnavailable as err:
        log.info("[rank %d] not using the native NCCL backend: %s", dist.get_rank(), err)
        return None


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
        self._nccl: NativeNcclCommBackend | None = None

    def backend(self, grads: Callable[[int], torch.Tensor],
                device: torch.device | None = None,
                set_grad: Callable[[int, torch.Tensor], None] | None = None,
                compression: torch.dtype | None = None):
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
                if compression is not None:
                    raise ConfigError("compression is not built for the native NCCL backend "
                                      "(LEGATO_NATIVE_NCCL=1); unset that variable to compress "
                                      "through torch.distributed")
                self._nccl = make_nccl_backend(grads, self.ctrl_group, device)
        if self._nccl is not None:
            return self._nccl
        return TorchCommBackend(grads, self.comm_group, set_grad, compression)

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


class HorovodCommBackend:
    """All-reduces chunks with Horovod's asynchronous ops; a poller thread reports completion.

    Horovod negotiates when each collective runs, but not which chunks a rank's credit window
    lets it submit: with a queue on every rank, rank 0 could hold chunk A in flight while rank 1
    holds chunk B, each waiting for the other to submit its chunk (a deadlock, seen with the
    priority policy's one-message window). So, as over torch.distributed, rank 0 decides the
    order and announces it on a HorovodOrderChannel.
    """

    def __init__(self, hvd, grads: Callable[[int], torch.Tensor], epoch: int = 0,
                 prefix: str = "legato.", compression: torch.dtype | None = None) -> None:
        import threading

        self._hvd = hvd
        self._compression = compression
        # Horovod matches tensors across ranks by name; a new plan (tuning) gets new names, and
        # each optimizer of a process its own `prefix`.
        self._prefix = f"{prefix}p{epoch}.chunk."
        self._grads = grads
        self._scale = 1.0 / hvd.size()
        self.writes = WriteCounts()  # allreduce_async_ writes in C++, bumping no version
        self._pending: list = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._poll_loop, name="legato-hvd-poll",
                                        daemon=True)
        self._thread.start()

    def start(self, chunk: Chunk, on_done: Done) -> None:
        buffer, direct = chunk_buffer(self._grads, chunk)
        wire = buffer
        if self._compression is not None and buffer.dtype in (torch.float32, torch.float64):
            wire = buffer.to(self._compression)  # as TorchCommBackend's compression
        handle = self._hvd.allreduce_async_(wire, name=f"{self._prefix}{chunk.id}",
                                            op=self._hvd.Sum, prescale_factor=self._scale)
        with self._cv:
            self._pending.append((handle, chunk, buffer, wire, direct, on_done))
            self._cv.notify()

    def _poll_loop(self) -> None:
        import time

        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop and not self._pending:
                    return
                pending = list(self._pending)
            finished = []
            for entry in pending:
                handle = entry[0]
                try:
                    done = self._hvd.poll(handle)
                except BaseException as err:  # noqa: BLE001
                    finished.append((entry, err))
                    continue
                if done:
                    finished.append((entry, None))
            if not finished:
                time.sleep(0.0002)
                continue
            with self._cv:
                for entry, _ in finished:
                    self._pending.remove(entry)
            for (handle, chunk, buffer, wire, direct, on_done), err in finished:
                if err is None:
                    try:
                        self._hvd.synchronize(handle)
                        if wire is not buffer:
                            buffer.copy_(wire)
                            if direct:
                                self.writes.add(chunk.parts[0].key)
                        if not direct:
                            copy_back(self._grads, chunk, buffer, self.writes)
                    except BaseException as sync_err:  # noqa: BLE001
                        err = sync_err
                on_done(err)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(10)


class HorovodOrderChannel:
    """Rank 0's dispatch decisions, broadcast over Horovod (one broadcast at a time, by the
    scheduler's announcer or follower thread)."""

    def __init__(self, hvd, prefix: str = "legato.") -> None:
        self._hvd = hvd
        self._name = f"{prefix}order"
        self._buf = torch.zeros(ANNOUNCE_SLOTS + 1, dtype=torch.int64)

    def announce(self, chunk_ids: Sequence[int]) -> None:
        for frame in announcement_frames(chunk_ids):
            self._hvd.broadcast_(torch.from_numpy(frame), root_rank=0, name=self._name)

    def receive(self) -> list[int]:
        self._hvd.broadcast_(self._buf, root_rank=0, name=self._name)
        return frame_ids(self._buf.numpy())


class HorovodTransport:
    """Horovod (horovod.torch) as legato's transport: hvd.init() must have been called.

    Horovod matches collectives across ranks by name, so each transport of a process (one per
    ScheduledOptimizer: a GAN's two, an A/B comparison's) names its tensors with a prefix of its
    own, numbered in creation order: every rank must create its optimizers in the same order,
    as it must under Horovod's own DistributedOptimizer.
    """

    name = "horovod"
    _created = itertools.count()

    def __init__(self) -> None:
        from legato.core.errors import BackendUnavailable

        try:
            import horovod.torch as hvd
        except ImportError as err:
            raise BackendUnavailable(f"backend='horovod' needs horovod.torch ({err}); build it "
                                     "with `make setup` (scripts/build_horovod.sh)") from err
        if not hvd.is_initialized():
            raise BackendUnavailable("Horovod has not been initialized; call hvd.init() before "
                                     "ScheduledOptimizer(..., backend='horovod')")
        self._hvd = hvd
        self.rank = hvd.rank()
        self.group_rank = hvd.rank()
        self.world = hvd.size()
        self._backend: HorovodCommBackend | None = None
        self._epoch = 0
        self._prefix = f"legato.o{next(HorovodTransport._created)}."

    def backend(self, grads: Callable[[int], torch.Tensor],
                compression: torch.dtype | None = None) -> HorovodCommBackend:
        if self._backend is not None:  # a new plan (tuning): stop the previous poller
            self._backend.close()
        self._epoch += 1
        self._backend = HorovodCommBackend(self._hvd, grads, epoch=self._epoch,
                                           prefix=self._prefix, compression=compression)
        return self._backend

    def order_channel(self) -> HorovodOrderChannel:
        return HorovodOrderChannel(self._hvd, self._prefix)  # see HorovodCommBackend

    def all_gather_object(self, obj) -> list:
        return self._hvd.allgather_object(obj, name=f"{self._prefix}gather")

    def broadcast_object(self, obj):
        return self._hvd.broadcast_object(obj, root_rank=0, name=f"{self._prefix}decision")

    def any_flag(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set (a small all-reduce; every rank calls it)."""
        total = self._hvd.allreduce(torch.tensor([1.0 if flag else 0.0]), op=self._hvd.Sum,
                                    name=f"{self._prefix}flag")
        return bool(total.item() > 0)

    @torch.no_grad()
    def broadcast_from_first(self, tensors) -> None:
        for i, tensor in enumerate(tensors):
            self._hvd.broadcast_(tensor.data, root_rank=0, name=f"{self._prefix}bcast.{i}")

    def close(self, healthy: bool = True) -> None:  # noqa: ARG002 (same call as torch's)
        if self._backend is not None:
            self._backend.close()
