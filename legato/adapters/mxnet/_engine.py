"""Python functions run by MXNet's engine, after the operations on given NDArrays.

`after(reads, writes, fn)` pushes an operation to MXNet's dependency engine (the C API's
`MXEnginePushSyncND`) that calls `fn()` once every write issued earlier to `reads` and `writes`
and every read issued earlier to `writes` is done; operations issued later that touch `writes`
wait for it. It runs on the engine's CPU priority threads (FnProperty::kCPUPrioritized,
MXNET_CPU_PRIORITY_NTHREADS, 4 by default), so it is neither queued behind nor blocks the
computation on the CPU worker thread, unlike `NDArray.wait_to_read()` (whose engine operation
waits there at priority 0). This is how ByteScheduler's MXNet plugin learned that a gradient
was ready or a message was back. `fn` must be short and must not wait for the engine.

`copy_bytes` moves bytes between NDArrays' memory (CPU) from such a function, where the engine
has already ordered the copy after the writes it depends on.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
from typing import Callable, Sequence

import mxnet as mx
import numpy as np
from mxnet.base import NDArrayHandle, _LIB, check_call

__all__ = ["after", "copy_bytes", "copy_elements"]

log = logging.getLogger(__name__)

_SyncFunc = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)  # (RunContext*, param)


class _Context(ctypes.Structure):  # mxnet::Context
    _fields_ = [("dev_type", ctypes.c_int), ("dev_id", ctypes.c_int)]


_CPU = _Context(1, 0)  # Context::kCPU, device 0
_CPU_PRIORITIZED = ctypes.c_int(3)  # FnProperty::kCPUPrioritized
_NAME = ctypes.c_char_p(b"legato")
_pending: dict[int, Callable[[], None]] = {}
_lock = threading.Lock()
_tokens = itertools.count(1)


def _run(_rctx, param) -> None:
    with _lock:
        fn = _pending.pop(param, None)
    if fn is None:
        return
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 (an engine thread must not see it)
        log.error("legato: a function run by MXNet's engine failed: %s: %s",
                  type(err).__name__, err)


# One C trampoline for the life of the process: the engine may call it until it shuts down.
_TRAMPOLINE = _SyncFunc(_run)


def after(reads: Sequence[mx.nd.NDArray], writes: Sequence[mx.nd.NDArray],
          fn: Callable[[], None], priority: int = 0) -> None:
    """Have MXNet's engine call `fn()` after the pending operations on `reads` and `writes`
    (see the module docstring); returns at once. `fn` should catch its own errors."""
    token = next(_tokens)
    with _lock:
        _pending[token] = fn
    const = (NDArrayHandle * max(1, len(reads)))(*[a.handle for a in reads])
    mutable = (NDArrayHandle * max(1, len(writes)))(*[a.handle for a in writes])
    try:
        check_call(_LIB.MXEnginePushSyncND(
            _TRAMPOLINE, ctypes.c_void_p(token), None, ctypes.byref(_CPU), const,
            ctypes.c_int(len(reads)), mutable, ctypes.c_int(len(writes)),
            ctypes.byref(_CPU_PRIORITIZED), ctypes.c_int(priority), _NAME))
    except BaseException:
        with _lock:
            _pending.pop(token, None)
        raise


def _address(array: mx.nd.NDArray) -> int:
    ptr = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(ptr)))
    return ptr.value


def copy_bytes(dst: mx.nd.NDArray, dst_offset: int, src: mx.nd.NDArray, src_offset: int,
               nbytes: int) -> None:
    """memmove `nbytes` from `src`'s memory at `src_offset` to `dst`'s at `dst_offset` (CPU,
    contiguous; call it from a function run by `after` that reads `src` and writes `dst`)."""
    ctypes.memmove(_address(dst) + dst_offset, _address(src) + src_offset, nbytes)


def _view(array: mx.nd.NDArray, offset: int, count: int) -> np.ndarray:
    """`count` elements of `array`'s memory from element `offset`, as a numpy array (no copy)."""
    dtype = np.dtype(array.dtype)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(
        _address(array) + offset * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype, count=count)


def copy_elements(dst: mx.nd.NDArray, dst_offset: int, src: mx.nd.NDArray, src_offset: int,
                  count: int) -> None:
    """Copy `count` elements from `src` at element `src_offset` to `dst` at `dst_offset`,
    converting between their types when they differ (numpy's rounding: to nearest, ties to
    even, as MXNet's Cast); same contract as `copy_bytes`."""
    if dst.dtype == src.dtype:
        size = np.dtype(src.dtype).itemsize
        copy_bytes(dst, dst_offset * size, src, src_offset * size, count * size)
    else:
        _view(dst, dst_offset, count)[...] = _view(src, src_offset, count)

