"""The PyTorch adapter's transports beyond gloo: legato's own NCCL communicator for CUDA
gradients, and Horovod. The gloo transport (torch.distributed groups of legato's own) lives in
legato.adapters.gloo, shared with the TensorFlow adapter; its names are re-exported here.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from legato.adapters.gloo import (TorchCommBackend, TorchDistTransport, TorchOrderChannel,
                                  WriteCounts, chunk_buffer, copy_back)
from legato.adapters.horovod_order import horovod_order_channel
from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.protocols import Done
from legato.core.scheduler.plan import Chunk

__all__ = ["HorovodCommBackend", "HorovodTransport",
           "NativeNcclCommBackend", "TorchCommBackend", "TorchDistTransport", "TorchOrderChannel",
           "WriteCounts", "chunk_buffer", "copy_back", "make_nccl_backend",
           "native_nccl_status"]

log = logging.getLogger(__name__)


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


class HorovodCommBackend:
    """All-reduces chunks with Horovod's asynchronous ops; a poller thread reports completion.

    Horovod negotiates when each collective runs, but not which chunks a rank's credit window
    lets it submit: with a queue on every rank, rank 0 could hold chunk A in flight while rank 1
    holds chunk B, each waiting for the other to submit its chunk (a deadlock, seen with the
    priority policy's one-message window). So, as over torch.distributed, rank 0 decides the
    order and announces it, over a socket of legato's own (legato.adapters.horovod_order
    [Note: order outside Horovod]).
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


class HorovodTransport:
    """Horovod (horovod.torch) as legato's transport: hvd.init() must have been called.

    Horovod matches collectives across ranks by name, so each transport of a process (one per
    ScheduledOptimizer: a GAN's two, an A/B comparison's) names its tensors with a prefix of its
    own, numbered in creation order: every rank must create its optimizers in the same order,
    as it must under Horovod's own DistributedOptimizer.
    """

    name = "horovod"
    _created = itertools.count()

    def __init__(self, timeout_s: float = 300.0) -> None:
        from legato.core.errors import BackendUnavailable

        self.timeout_s = timeout_s  # connecting the order channel
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

    def order_channel(self):
        # see HorovodCommBackend and [Note: order outside Horovod]
        return horovod_order_channel(self._hvd, self.broadcast_object, timeout_s=self.timeout_s)

    def all_gather_object(self, obj) -> list:
        return self._hvd.allgather_object(obj, name=f"{self._prefix}gather")

    def broadcast_object(self, obj):
        return self._hvd.broadcast_object(obj, root_rank=0, name=f"{self._prefix}decision")

    def link_samples(self, sizes, repeats: int = 3) -> list[tuple[int, float]]:
        """(bytes, median seconds) of one Horovod all-reduce of float32 per size (a collective;
        the slowest rank's time counts), negotiation included, as each of legato's messages
        pays it: what the start-up simulator fits the link to (see profile.link_samples for
        torch.distributed)."""
        out = []
        for size in sizes:
            buf = torch.zeros(max(1, size // 4))
            times = []
            for i in range(repeats + 1):
                self._hvd.barrier()
                started = time.perf_counter()
                self._hvd.allreduce(buf, op=self._hvd.Sum, name=f"{self._prefix}link.{size}")
                elapsed = self._hvd.allreduce(
                    torch.tensor([time.perf_counter() - started], dtype=torch.float64),
                    op=self._hvd.Max, name=f"{self._prefix}link.max")
                if i:  # the first is a warm-up
                    times.append(float(elapsed))
            out.append((buf.numel() * 4, statistics.median(times)))
        return out

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
