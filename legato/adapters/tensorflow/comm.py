"""How a TensorFlow process reduces gradient chunks: over Horovod's TensorFlow ops, or over
legato's gloo transport (torch.distributed), with tensors crossing as DLPack views.

[Note: gloo transport, DLPack] TensorFlow has no collective legato can issue asynchronously
outside a graph, so without Horovod the TensorFlow adapter uses the same transport as the
PyTorch adapter: torch.distributed on gloo groups of legato's own, with rank 0 deciding the
order (see legato.core.scheduler.core). Gradients cross from TensorFlow to torch and back as
DLPack views, never copies: each gradient is copied once into a buffer legato keeps per
parameter (TensorFlow may hand out one buffer as the gradient of two variables, and may cache
constant tensors, so reducing its tensors in place would be wrong), the buffer is reduced
there (a merged chunk through one flat buffer, as DDP's buckets), and TensorFlow reads the
reduced buffer through `tf.experimental.dlpack.from_dlpack`, with no copy. A buffer is reused
next step only after the update that read it (the dependency gates see to that).

[Note: Horovod from threads] horovod.tensorflow has no asynchronous op outside a graph: an eager
`hvd.allreduce` blocks its thread until every rank has submitted the same name. Chunks are
therefore reduced on a small pool of threads, submitted in the scheduler's dispatch order.

[Note: one order, Horovod] Horovod negotiates which collective runs when, but a credit window
on each rank decides which chunks a rank submits at all: if rank 0 submitted chunk A while
rank 1, whose gradients became ready in another interleaving, submitted chunk B, each would
wait for the other to submit its chunk before freeing the credit that would let it: a
deadlock. So, as over gloo, rank 0 decides the order and announces it (over a socket of
legato's own: legato.adapters.horovod_order [Note: order outside Horovod]), and every other
rank follows (see legato.core.scheduler.core).

[Note: Horovod names] Horovod matches tensors across ranks by the op's name, and TensorFlow
runs an eager op through a kernel cached by its attributes, where the name is not one: every
eager `hvd.allreduce` of one dtype would carry the first call's name. Each chunk's reduction is
therefore a `tf.function` of its own (Horovod's own eager path does the same), which also does
the chunk's slicing and merging in one graph.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from legato.adapters.horovod_order import horovod_order_channel
from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.protocols import Done
from legato.core.scheduler.plan import Chunk

__all__ = ["GlooTransport", "HorovodTFTransport"]

log = logging.getLogger(__name__)


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover (torch is in .venv)
        raise BackendUnavailable(f"backend='gloo' needs torch for its gloo transport ({err}); "
                                 "install torch, or use backend='horovod'") from err
    return torch


class GlooTransport:
    """legato's gloo groups over torch.distributed, fed by TensorFlow gradients via DLPack.

    torch.distributed is initialized here (gloo) from the environment torchrun and
    `legato.launch` set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless the process did it;
    then it is destroyed when the last transport that relies on it closes (a process may hold
    several ScheduledOptimizers: a GAN's two).
    """

    name = "gloo"
    _default_users = 0  # open transports on a default group legato initialized

    def __init__(self, timeout_s: float) -> None:
        torch = _torch()
        import datetime

        import torch.distributed as dist

        from legato.adapters.gloo import TorchDistTransport

        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                       if v not in os.environ]
            if missing:
                raise BackendUnavailable(
                    f"backend='gloo' finds torch.distributed not initialized and {missing} not "
                    "set; launch with `torchrun --nproc-per-node N train.py` (or set RANK, "
                    "WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or use backend='horovod' under "
                    "horovodrun")
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
            GlooTransport._default_users = 0
            self._owns_default = True
        else:
            self._owns_default = GlooTransport._default_users > 0
        if self._owns_default:
            GlooTransport._default_users += 1
        self._torch = torch
        self._inner = TorchDistTransport(None, timeout_s)
        self.rank = self._inner.rank
        self.group_rank = self._inner.group_rank
        self.world = self._inner.world
        self._buffers: list = []

    def backend(self, grads: Sequence[tf.Tensor | None], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[tf.DType], epoch: int,  # noqa: ARG002 (as Horovod's)
                compression: str | None = None):
        """The backend; `grads` is the adapter's list of this step's gradients, by key;
        `compression` ("fp16", "bf16" or None): the type float gradients travel in."""
        torch = self._torch
        if not self._buffers:
            self._buffers = [torch.empty(int(np.prod(s, dtype=np.int64)),
                                         dtype=_torch_dtype(torch, d)) for s, d in
                             zip(shapes, dtypes)]
        wire = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}[compression]
        # divided after the sum, as Horovod's Compression.fp16 with op=Average
        return self._inner.backend(lambda key: self._buffers[key], compression=wire,
                                   divide_after=True)

    def any_flag(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set (every rank calls it: a small all-reduce)."""
        return self._inner.any_flag(flag)

    def load(self, key: int, grad: tf.Tensor) -> None:
        """Copy this step's gradient of `key` into its buffer (the one copy; see the Note)."""
        view = self._torch.from_dlpack(tf.experimental.dlpack.to_dlpack(grad))
        self._buffers[key].copy_(view.reshape(-1))

    def reduced(self, key: int, shape: tuple[int, ...]) -> tf.Tensor:
        """The reduced gradient of `key` as a TensorFlow tensor over legato's buffer."""
        flat = tf.experimental.dlpack.from_dlpack(
            self._torch.utils.dlpack.to_dlpack(self._buffers[key]))
        return tf.reshape(flat, shape)

    def order_channel(self):
        return self._inner.order_channel()

    def all_gather_object(self, obj) -> list:
        return self._inner.all_gather_object(obj)

    def broadcast_object(self, obj):
        return self._inner.broadcast_object(obj)

    def broadcast_variables(self, variables: Sequence[tf.Variable]) -> None:
        values = self.broadcast_object([np.asarray(v.numpy()) for v in variables]
                                       if self.group_rank == 0 else None)
        if self.group_rank != 0:
            for v, value in zip(variables, values):
                v.assign(value)

    def close(self, healthy: bool = True) -> None:
        self._inner.close(healthy=healthy)
        self._buffers = []
        if self._owns_default:
            import torch.distributed as dist

            self._owns_default = False
            GlooTransport._default_users -= 1
            if GlooTransport._default_users == 0 and dist.is_initialized():
                dist.destroy_process_group()


def _torch_dtype(torch, dtype: tf.DType):
    try:
        return getattr(torch, dtype.name)
    except AttributeError:
        raise ConfigError(f"gradients of dtype {dtype.name} cannot cross to the gloo transport;"
                          " use float32, float64, float16 or bfloat16 variables") from None


class HorovodTFCommBackend:
    """All-reduces chunks with horovod.tensorflow on a thread pool (see [Note: Horovod from
    threads]); the reduced pieces go to `store(key, offset_bytes, tensor)`."""

    def __init__(self, hvd, grads: Sequence[tf.Tensor | None], epoch: int,
                 store: Callable[[int, int, tf.Tensor], None], threads: int = 8,
                 compression: str | None = None, prefix: str = "legato.") -> None:
        self._hvd = hvd
        self._grads = grads
        self._store = store
        self._wire = {None: None, "fp16": tf.float16, "bf16": tf.bfloat16}[compression]
        self._prefix = f"{prefix}p{epoch}.chunk."
        self._scale = 1.0 / hvd.size()
        self._fns: dict[int, Any] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                           thread_name_prefix="legato-hvd-tf")

    def _function(self, chunk: Chunk):
        """A tf.function reducing `chunk` (traced once per chunk; see [Note: Horovod names])."""
        fn = self._fns.get(chunk.id)
        if fn is not None:
            return fn
        hvd, name, scale = self._hvd, f"{self._prefix}{chunk.id}", self._scale
        parts, wire = chunk.parts, self._wire

        def reduce(*grads):
            pieces = []
            for part, grad in zip(parts, grads):
                size = grad.dtype.size
                flat = tf.reshape(grad, [-1])
                whole = part.offset == 0 and part.nbytes == flat.shape[0] * size
                pieces.append(flat if whole else
                              flat[part.offset // size:(part.offset + part.nbytes) // size])
            buffer = pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0)
            # compression as Horovod's Compression.fp16: cast, reduce, cast back
            narrow = wire is not None and buffer.dtype in (tf.float32, tf.float64)
            if narrow:  # divided after the sum, as Horovod's op=Average does
                reduced = tf.cast(hvd.allreduce(tf.cast(buffer, wire), op=hvd.Sum,
                                                postscale_factor=scale, name=name,
                                                ignore_name_scope=True), buffer.dtype)
            else:
                reduced = hvd.allreduce(buffer, op=hvd.Sum, prescale_factor=scale, name=name,
                                        ignore_name_scope=True)
            if len(pieces) == 1:
                return [reduced]
            return tf.split(reduced, [int(p.shape[0]) for p in pieces])

        fn = self._fns[chunk.id] = tf.function(reduce)
        return fn

    def start(self, chunk: Chunk, on_done: Done) -> None:
        grads = [self._grads[part.key] for part in chunk.parts]
        self._pool.submit(self._reduce, chunk, grads, on_done)

    def _reduce(self, chunk: Chunk, grads: list[tf.Tensor], on_done: Done) -> None:
        try:
            reduced = self._function(chunk)(*grads)
            for part, piece in zip(chunk.parts, reduced):
                self._store(part.key, part.offset, piece)
        except BaseException as err:  # noqa: BLE001 (reported to the scheduler)
            on_done(err)
            return
        on_done(None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


class HorovodTFTransport:
    """Horovod (horovod.tensorflow) as the transport: hvd.init() must have been called.

    Horovod matches tensors across ranks by name, so each transport (each ScheduledOptimizer
    of a process: a GAN's two) names its tensors with a prefix of its own, numbered in the
    order they are built (the same on every rank)."""

    name = "horovod"
    _created = itertools.count()

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s  # connecting the order channel
        try:
            import horovod.tensorflow as hvd
        except ImportError as err:
            raise BackendUnavailable(f"backend='horovod' needs horovod.tensorflow ({err}); build"
                                     " it with `make setup` (scripts/build_horovod.sh)") from err
        if not hvd.is_initialized():
            raise BackendUnavailable("Horovod has not been initialized; call hvd.init() before "
                                     "ScheduledOptimizer(..., backend='horovod')")
        self._hvd = hvd
        self._prefix = f"legato.o{next(HorovodTFTransport._created)}."
        self.rank = self.group_rank = hvd.rank()
        self.world = hvd.size()
        self._backend: HorovodTFCommBackend | None = None
        self._parts: dict[int, dict[int, tf.Tensor]] = {}
        self._flag_fn = None

    def backend(self, grads, shapes, dtypes, epoch: int,  # noqa: ARG002
                compression: str | None = None):
        if self._backend is not None:
            self._backend.close()
        self._backend = HorovodTFCommBackend(self._hvd, grads, epoch, self._store,
                                             compression=compression, prefix=self._prefix)
        return self._backend

    def any_flag(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set (every rank calls it: a small all-reduce)."""
        if self._flag_fn is None:
            hvd, name = self._hvd, f"{self._prefix}flag"

            def reduce(box):
                return hvd.allreduce(box, op=hvd.Sum, name=name, ignore_name_scope=True)
            self._flag_fn = tf.function(reduce)  # see [Note: Horovod names]
        return bool(self._flag_fn(tf.constant([1.0 if flag else 0.0])).numpy()[0] > 0)

    def load(self, key: int, grad: tf.Tensor) -> None:  # noqa: ARG002 (read in place)
        self._parts[key] = {}

    def _store(self, key: int, offset: int, tensor: tf.Tensor) -> None:
        self._parts[key][offset] = tensor

    def reduced(self, key: int, shape: tuple[int, ...]) -> tf.Tensor:
        parts = self._parts.pop(key)
        pieces = [parts[o] for o in sorted(parts)]
        flat = pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0)
        return tf.reshape(flat, shape)

    def order_channel(self):
        # see [Note: one order, Horovod] and [Note: order outside Horovod]
        return horovod_order_channel(self._hvd, self.broadcast_object, timeout_s=self.timeout_s)

    def all_gather_object(self, obj) -> list:
        return self._hvd.allgather_object(obj, name=f"{self._prefix}gather")

    def broadcast_object(self, obj):
        return self._hvd.broadcast_object(obj, root_rank=0, name=f"{self._prefix}decision")

    def broadcast_variables(self, variables: Sequence[tf.Variable]) -> None:
        # hvd.broadcast_variables assigns inside a tf.function, which Keras 3 variables do not
        # support; one eager broadcast per variable instead.
        for i, v in enumerate(variables):
            v.assign(self._hvd.broadcast(tf.convert_to_tensor(v), root_rank=0,
                                         name=f"{self._prefix}bcast.{i}"))

    def close(self, healthy: bool = True) -> None:  # noqa: ARG002
        if self._backend is not None:
            self._backend.close()
            self._backend = None
