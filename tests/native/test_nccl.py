"""legato._native's NCCL all-reduce (native/nccl.{h,cc}).

Without a GPU: the loader's messages, argument checks, and the communicator's completion,
error and shutdown paths against stand-in libnccl/libcudart built here from C (each scenario in
a fresh process, since the libraries are loaded once per process). With CUDA: real all-reduces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_native = pytest.importorskip("legato._native", reason="legato._native is not built; run "
                              "`pip install -e .`")

# Stand-ins with the real ABI (see [Note: declared types] in native/nccl.h). The "all-reduce"
# acts as if a second rank held the same float32 data: sum doubles it, avg keeps it. Events
# finish `delay_ms` after they are recorded; fake_set_* let a test steer them through ctypes.
_FAKE_NCCL = r"""
#include <stdlib.h>
#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
static volatile int async_error = 0;
void fake_set_async_error(int e) { async_error = e; }
int ncclGetVersion(int* v) { *v = 22105; return 0; }
int ncclGetUniqueId(ncclUniqueId* id) { memset(id->internal, 7, 128); return 0; }
int ncclCommInitRank(void** comm, int n, ncclUniqueId id, int rank) {
  if (id.internal[0] != 7 || n < 1 || rank >= n) return 4;
  *comm = malloc(8);
  return 0;
}
int ncclAllReduce(const void* s, void* r, size_t count, int dtype, int op, void* comm, void* st) {
  if (dtype != 7) return 4;
  float* f = (float*)r;
  if (op == 0) for (size_t i = 0; i < count; ++i) f[i] *= 2;
  return 0;
}
int ncclCommDestroy(void* c) { free(c); return 0; }
int ncclCommAbort(void* c) { free(c); return 0; }
int ncclCommGetAsyncError(void* c, int* e) { *e = async_error; return 0; }
const char* ncclGetErrorString(int r) {
  return r == 2 ? "unhandled system error (fake)" : r == 4 ? "invalid argument (fake)" : "?";
}
"""
_FAKE_CUDART = r"""
#include <stdlib.h>
#include <time.h>
static int device = 0;
static volatile long delay_ms = 0;
void fake_set_delay_ms(long ms) { delay_ms = ms; }
static long now_ms(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}
int cudaSetDevice(int d) { if (d > 1) return 101; device = d; return 0; }
int cudaGetDevice(int* d) { *d = device; return 0; }
int cudaStreamCreateWithFlags(void** s, unsigned f) { *s = malloc(8); return 0; }
int cudaStreamDestroy(void* s) { free(s); return 0; }
int cudaEventCreateWithFlags(long** e, unsigned f) { *e = calloc(1, sizeof(long)); return 0; }
int cudaEventRecord(long* e, void* s) { *e = now_ms() + delay_ms; return 0; }
int cudaEventQuery(long* e) { return now_ms() >= *e ? 0 : 600; }
int cudaEventDestroy(long* e) { free(e); return 0; }
int cudaStreamWaitEvent(void* s, void* e, unsigned f) { return 0; }
const char* cudaGetErrorString(int e) { return e == 101 ? "invalid device ordinal (fake)" : "?"; }
"""


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, Path]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build the stand-in libnccl and libcudart")
    out = tmp_path_factory.mktemp("fake_nccl")
    libs = {}
    sources = {"nccl": _FAKE_NCCL, "cudart": _FAKE_CUDART,
               "nccl_old": _FAKE_NCCL.replace("*v = 22105", "*v = 2708"),  # NCCL 2.7.8
               "nccl_partial": "int ncclGetVersion(int* v) { *v = 22105; return 0; }\n"}
    for name, code in sources.items():
        src = out / f"{name}.c"
        src.write_text(code)
        libs[name] = out / f"lib{name}.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(libs[name]), str(src)],
                       check=True, timeout=60)
    return libs


def _run(code: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter with `env` added; return its stdout."""
    full_env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _fake_env(fakes, nccl: str = "nccl") -> dict[str, str]:
    return {"LEGATO_NCCL_LIBRARY": str(fakes[nccl]),
            "LEGATO_CUDART_LIBRARY": str(fakes["cudart"])}


# -- everywhere ------------------------------------------------------------------------------


def test_module_has_the_nccl_api() -> None:
    for name in ("nccl_status", "nccl_unique_id", "NcclComm", "NcclError"):
        assert hasattr(_native, name), f"legato._native lacks {name}: rebuild with pip install -e ."
    assert issubclass(_native.NcclError, RuntimeError)
    assert _native.PriorityQueue is not None  # the queue is still there


def test_import_loads_nothing() -> None:
    out = _run("""
        import legato._native
        maps = open("/proc/self/maps").read()
        print("nccl" in maps, "cudart" in maps)
    """, {})
    assert out.split() == ["False", "False"]


@pytest.mark.timeout(120)
def test_status_without_nccl_names_the_library() -> None:
    status = _native.nccl_status()
    if status["available"]:
        pytest.skip(f"NCCL is installed here ({status['nccl_library']})")
    assert set(status) >= {"available", "reason", "version", "nccl_library", "cudart_library"}
    assert "libnccl" in status["reason"] and "LEGATO_NCCL_LIBRARY" in status["reason"]
    assert status["version"] is None


@pytest.mark.timeout(120)
def test_explicit_path_that_does_not_exist(tmp_path) -> None:
    missing = tmp_path / "libnccl.so.2"
    out = _run("""
        import legato._native as n
        s = n.nccl_status()
        print(s["available"]); print(s["reason"])
        for call in (n.nccl_unique_id, lambda: n.NcclComm(bytes(128), 0, 1, 0)):
            try:
                call()
            except RuntimeError as err:
                print(type(err).__name__, err)
    """, {"LEGATO_NCCL_LIBRARY": str(missing)})
    lines = out.splitlines()
    assert lines[0] == "False"
    assert f"LEGATO_NCCL_LIBRARY={missing} could not be loaded" in lines[1]
    assert len(lines) == 4 and all(line.startswith("NcclError NCCL is not available") and
                                   str(missing) in line for line in lines[2:])


@pytest.mark.parametrize("args, match", [
    ((b"short", 0, 1, 0), "128 bytes"),
    ((bytes(128), 1, 1, 0), "0 <= rank < world"),
    ((bytes(128), 0, 0, 0), "world >= 1"),
    ((bytes(128), 0, 1, -1), "device=-1"),
])
def test_bad_arguments_raise_value_error_before_loading(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        _native.NcclComm(*args)


@pytest.mark.timeout(120)
def test_construct_without_nccl_raises_a_clear_error() -> None:
    if _native.nccl_status()["available"]:
        pytest.skip("NCCL is installed here")
    with pytest.raises(RuntimeError, match=r"libnccl\.so\.2.*LEGATO_NCCL_LIBRARY"):
        _native.NcclComm(bytes(128), 0, 1, 0)


def test_torch_status_helper() -> None:
    comm = pytest.importorskip("legato.adapters.torch.comm")
    status = comm.native_nccl_status()
    assert status == _native.nccl_status()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_backend_refuses_on_every_rank_without_cuda(tmp_path) -> None:
    pytest.importorskip("torch")
    out = _run(f"""
        import torch, torch.distributed as dist
        from legato.adapters.torch.comm import NativeNcclCommBackend, make_nccl_backend
        from legato.core.errors import BackendUnavailable
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0,
                                world_size=1)
        grads = {{0: torch.zeros(4)}}.__getitem__
        assert make_nccl_backend(grads, dist.group.WORLD, "cpu") is None
        try:
            NativeNcclCommBackend(grads, dist.group.WORLD, "cpu")
        except BackendUnavailable as err:
            print(err)
        dist.destroy_process_group()
    """, {})
    assert "native NCCL backend is unavailable (rank 0: the gradients are on cpu" in out


# -- stand-in libraries ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_missing_symbol_is_named(fakes) -> None:
    out = _run("""
        import legato._native as n
        print(n.nccl_status()["reason"])
    """, _fake_env(fakes, "nccl_partial"))
    assert "ncclGetUniqueId is missing from" in out and "libnccl_partial.so" in out


@pytest.mark.timeout(120)
def test_all_reduce_completes_through_the_poller(fakes) -> None:
    out = _run("""
        import threading, numpy as np, legato._native as n
        s = n.nccl_status()
        assert s["available"] and s["version"] == 22105 and s["version_text"] == "2.21.5", s
        assert s["nccl_library"].endswith("libnccl.so") and s["cudart_library"], s
        uid = n.nccl_unique_id()
        assert len(uid) == 128
        x = np.arange(8, dtype=np.float32)
        results, done = [], threading.Event()
        def cb(err):
            results.append((err, threading.current_thread() is threading.main_thread()))
            done.set()
        with n.NcclComm(uid, 0, 1, 0) as comm:
            assert (comm.rank, comm.world, comm.device) == (0, 1, 0)
            comm.all_reduce(x.ctypes.data, x.size, "float32", "sum", wait_stream=1234, callback=cb)
            assert done.wait(10), "callback never ran"
        assert comm.closed and results == [(None, False)], results
        print(x.tolist())
    """, _fake_env(fakes))
    assert out.strip() == str([2.0 * i for i in range(8)])


@pytest.mark.timeout(120)
def test_close_waits_for_pending_and_refuses_new_work(fakes) -> None:
    _run("""
        import ctypes, os, numpy as np, legato._native as n
        ctypes.CDLL(os.environ["LEGATO_CUDART_LIBRARY"]).fake_set_delay_ms(300)
        comm = n.NcclComm(n.nccl_unique_id(), 0, 1, 1)
        x = np.ones(4, dtype=np.float32)
        calls = []
        for _ in range(3):
            comm.all_reduce(x.ctypes.data, 4, "float32", "avg", callback=calls.append)
        assert comm.pending == 3
        comm.close()  # waits about 300 ms for the three
        assert calls == [None, None, None], calls
        try:
            comm.all_reduce(x.ctypes.data, 4, "float32", "sum", callback=calls.append)
        except RuntimeError as err:
            assert "closed" in str(err), err
        else:
            raise AssertionError("all_reduce after close() did not raise")
    """, _fake_env(fakes))


@pytest.mark.timeout(120)
def test_abort_fails_pending_callbacks(fakes) -> None:
    _run("""
        import ctypes, os, numpy as np, legato._native as n
        ctypes.CDLL(os.environ["LEGATO_CUDART_LIBRARY"]).fake_set_delay_ms(60000)
        x = np.ones(4, dtype=np.float32)
        calls = []
        try:
            with n.NcclComm(n.nccl_unique_id(), 0, 1, 0) as comm:
                comm.all_reduce(x.ctypes.data, 4, "float32", "sum", callback=calls.append)
                raise KeyError("user error")  # __exit__ aborts instead of waiting a minute
        except KeyError:
            pass
        assert len(calls) == 1 and isinstance(calls[0], n.NcclError), calls
        assert "aborted" in str(calls[0]), calls
    """, _fake_env(fakes))


@pytest.mark.timeout(120)
def test_async_error_reaches_callbacks_and_blocks_new_work(fakes) -> None:
    _run("""
        import ctypes, os, threading, numpy as np, legato._native as n
        ctypes.CDLL(os.environ["LEGATO_CUDART_LIBRARY"]).fake_set_delay_ms(60000)
        comm = n.NcclComm(n.nccl_unique_id(), 0, 2, 0)
        x = np.ones(4, dtype=np.float32)
        calls, done = [], threading.Event()
        comm.all_reduce(x.ctypes.data, 4, "float32", "sum",
                        callback=lambda e: (calls.append(e), done.set()))
        ctypes.CDLL(os.environ["LEGATO_NCCL_LIBRARY"]).fake_set_async_error(2)
        assert done.wait(10)
        assert "asynchronous error" in str(calls[0]) and "rank 0 of 2" in str(calls[0]), calls
        assert "unhandled system error (fake)" in str(calls[0])
        try:
            comm.all_reduce(x.ctypes.data, 4, "float32", "sum", callback=calls.append)
        except n.NcclError as err:
            assert "abort()" in str(err), err
        else:
            raise AssertionError("all_reduce after an async error did not raise")
        comm.abort()
    """, _fake_env(fakes))


@pytest.mark.timeout(120)
def test_errors_from_nccl_and_cuda_and_bad_arguments(fakes) -> None:
    _run("""
        import gc, numpy as np, legato._native as n
        x = np.ones(4, dtype=np.float64)
        def expect(exc, text, fn, *args, **kw):
            try:
                fn(*args, **kw)
            except exc as err:
                assert text in str(err), (text, err)
            else:
                raise AssertionError(f"no {exc.__name__} for {text}")
        expect(n.NcclError, "cudaSetDevice(5) failed: invalid device ordinal (fake)",
               n.NcclComm, n.nccl_unique_id(), 0, 1, 5)
        expect(n.NcclError, "ncclCommInitRank (rank 0 of 1, device 0) failed: invalid argument",
               n.NcclComm, bytes(128), 0, 1, 0)
        comm = n.NcclComm(n.nccl_unique_id(), 0, 1, 0)
        # the stand-in only reduces float32: NCCL's own error comes through
        expect(n.NcclError, "ncclAllReduce (rank 0 of 1, device 0) failed: invalid argument",
               comm.all_reduce, x.ctypes.data, 4, "float64", "sum", callback=print)
        expect(ValueError, "dtype='int8'", comm.all_reduce, x.ctypes.data, 4, "int8",
               callback=print)
        expect(ValueError, "op='max'", comm.all_reduce, x.ctypes.data, 4, "float32", "max",
               callback=print)
        expect(ValueError, "count=-1", comm.all_reduce, x.ctypes.data, -1, "float32",
               callback=print)
        expect(TypeError, "callable", comm.all_reduce, x.ctypes.data, 4, "float32", callback=3)
        assert comm.pending == 0
        del comm
        gc.collect()  # destroyed without close(): closes itself
    """, _fake_env(fakes))


@pytest.mark.timeout(120)
def test_old_nccl_refuses_avg_and_bfloat16(fakes) -> None:
    _run("""
        import numpy as np, legato._native as n
        assert n.nccl_status()["version_text"] == "2.7.8"
        comm = n.NcclComm(n.nccl_unique_id(), 0, 1, 0)
        x = np.ones(4, dtype=np.float32)
        for dtype, op in (("float32", "avg"), ("bfloat16", "sum")):
            try:
                comm.all_reduce(x.ctypes.data, 4, dtype, op, callback=print)
            except n.NcclError as err:
                assert "no bfloat16 or avg" in str(err), err
            else:
                raise AssertionError(dtype + " " + op)
        comm.close()
    """, _fake_env(fakes, "nccl_old"))


@pytest.mark.timeout(120)
def test_callback_errors_are_reported_not_fatal(fakes) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import numpy as np, legato._native as n
        comm = n.NcclComm(n.nccl_unique_id(), 0, 1, 0)
        x = np.ones(4, dtype=np.float32)
        def bad(err):
            raise ZeroDivisionError("from the callback")
        comm.all_reduce(x.ctypes.data, 4, "float32", "sum", callback=bad)
        comm.close()
        print("survived")
    """)], env={**os.environ, **_fake_env(fakes)}, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr
    assert "ZeroDivisionError: from the callback" in proc.stderr


@pytest.mark.timeout(120)
def test_close_from_a_callback_and_last_reference_dropped_in_one(fakes) -> None:
    out = _run("""
        import threading, time, numpy as np, legato._native as n
        x = np.ones(4, dtype=np.float32)
        seen, done = [], threading.Event()
        holder = [n.NcclComm(n.nccl_unique_id(), 0, 1, 0)]
        def cb(err):
            try:
                holder[0].close()
            except n.NcclError as e:
                seen.append(str(e))
            holder.clear()  # the last reference: the comm is closed on another thread
            done.set()
        holder[0].all_reduce(x.ctypes.data, 4, "float32", "sum", callback=cb)
        assert done.wait(10)
        time.sleep(0.2)
        print(seen[0])
    """, _fake_env(fakes))
    assert "close() was called from an all_reduce callback" in out


# -- CUDA ------------------------------------------------------------------------------------


def _require_cuda_nccl():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device: torch {torch.__version__} reports "
                    "torch.cuda.is_available() == False")
    status = _native.nccl_status()
    if not status["available"]:
        pytest.skip(f"CUDA is here but the native NCCL loader is not: {status['reason']}")
    return torch


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_one_gpu_all_reduce(dtype) -> None:
    torch = _require_cuda_nccl()
    import threading

    t_dtype = getattr(torch, dtype)
    x = (torch.arange(1 << 20, device="cuda:0") % 7).to(t_dtype)
    expect = x.clone()
    stream = torch.cuda.current_stream()
    errors, done = [], threading.Event()
    with _native.NcclComm(_native.nccl_unique_id(), 0, 1, 0) as comm:
        for op in ("sum", "avg"):
            done.clear()
            comm.all_reduce(x.data_ptr(), x.numel(), dtype, op, wait_stream=stream.cuda_stream,
                            callback=lambda e: (errors.append(e), done.set()))
            assert done.wait(60), f"no callback for {op}"
    assert errors == [None, None]
    torch.testing.assert_close(x, expect)  # one rank: sum and avg are the identity


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_one_gpu_backend_with_merged_chunk() -> None:
    torch = _require_cuda_nccl()
    _spawn(1, _backend_worker)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_gpus_two_processes() -> None:
    torch = _require_cuda_nccl()
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices; torch sees {torch.cuda.device_count()}")
    _spawn(2, _backend_worker)


def _spawn(world: int, fn) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(world, port), nprocs=world, join=True)


def _backend_worker(rank: int, world: int, port: int) -> None:
    """Each rank holds rank + 1 in two gradients; one merged chunk and one direct part are
    averaged through NativeNcclCommBackend over a gloo group that carries the unique id."""
    import threading

    import torch
    import torch.distributed as dist

    from legato.adapters.torch.comm import NativeNcclCommBackend
    from legato.core.scheduler.plan import Chunk, Part

    torch.cuda.set_device(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        grads = {0: torch.full((1000,), rank + 1.0, device="cuda"),
                 1: torch.full((10, 10), rank + 1.0, device="cuda")}
        backend = NativeNcclCommBackend(grads.__getitem__, dist.group.WORLD, rank)
        merged = Chunk(0, 0, 4400, (Part(0, 0, 4000), Part(1, 0, 400)))
        direct = Chunk(1, 0, 400, (Part(0, 0, 400),))
        errors, done = [], threading.Semaphore(0)
        for chunk in (merged, direct):
            backend.start(chunk, lambda e: (errors.append(e), done.release()))
            assert done.acquire(timeout=60), f"rank {rank}: no completion for chunk {chunk.id}"
        backend.close()
        assert errors == [None, None], errors
        mean = (world + 1) / 2
        for key, grad in grads.items():
            assert torch.all(grad == mean), f"rank {rank}: grad {key} = {grad.flatten()[:4]}"
    finally:
        dist.destroy_process_group()
