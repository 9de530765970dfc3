"""ScheduledKVStore: legato's gradient chunks over MXNet's parameter-server kvstore (dist_sync).

The core's `Scheduler` decides when each chunk of a `ChunkPlan` goes; this module sends it, as
ByteScheduler's MXNet plugin did: every chunk is a kvstore key of its own (initialized once, on
the servers, at construction), and starting a chunk issues its push and its pull together. The
servers sum what every worker pushed (no optimizer runs there: update_on_kvstore=False
semantics); the pull brings the sum back, and the trainer updates the layer locally.

[Note: engine priority] MXNet runs a push or pull as an operation of its engine, on the same
CPU worker thread (MXNET_CPU_WORKER_NTHREADS, 1 by default) and priority queue as forward and
backward, where a higher priority goes first among ready operations. Computation runs at 0;
gluon pushes at -index, so its communication waits for every ready computation. legato has
already decided when a chunk goes, so its push and pull run at `_PRIORITY - layer`: ahead of
computation (they only hand the message to ps-lite), front layers first among themselves.

[Note: threads] `start()` issues the chunk's push and pull on the thread that calls it: the
scheduler's one dispatching thread (its queue's dispatcher, its announcer on worker 0, or its
follower thread on the others; one of them per process). MXNet 1.9's KVStoreDist keeps its
per-key buffers in unsynchronized maps, so that thread is the only one that touches the kvstore
once the scheduler runs (construction-time calls come before it starts). An `on_started` hook
runs right after each start on the same thread (the trainer issues layer updates there). The
training thread keeps issuing its own forward and backward alongside: autograd's recording
state is thread-local in MXNet 1.x and the engine's Push is thread-safe. Everything else is
done by MXNet's engine itself, through `_engine.after`: a gradient is reported ready (and
copied into its buffers) by an engine operation that reads it, right after backward wrote it;
a chunk is reported done by one right after its pull. Those run on the engine's priority
threads, not behind the computation ([Note: engine priority]), and they are ordered by the
engine with everything else that touches the same arrays, so the core always hears of a
chunk's completion before the next step's gradient of it is reported ready.

[Note: chunk buffers] On CPU, KVStoreDist pushes the given array itself and pulls back into
that same array (its comm buffer for the key aliases the pushed array), so a chunk is pushed
from and pulled into one array. A chunk that is a whole tensor uses the gradient itself (no
copy). A part of a tensor, or a merged chunk, has a buffer of its own, filled when the gradient
is ready and copied back into the gradient(s) before the layer's update (memmoves run by the
engine, see [Note: threads]): pulling a part into the gradient would make the next part's push
(a read of the same NDArray) wait in the engine for that pull, serializing the parts of a
tensor. MXNet tracks dependencies per storage, not per byte range.

[Note: one order with a window] In dist_sync a push is acknowledged only once every worker has
pushed that key. With a credit window, workers that run their own queues can fill their
windows with different chunks (worker 0's layer-9 gradient is ready, worker 1's is not yet, so
worker 1 starts more of layer 10) and then wait for each other forever. So when the policy has
a window (`priority`, `bytescheduler`) worker 0 leads: its scheduler decides the order and
announces it to the others (`SocketOrderChannel` in _order.py; the kvstore only carries worker
0's address), and they start chunks in that order (the core's leader/follower mode). Without a
window (`fifo`, `plain`) every ready chunk starts at once, nothing waits for credit, and each
worker runs its own queue (order=None), as the core does for Horovod.
"""

from __future__ import annotations

import collections
import pickle
import socket
import weakref
from typing import Any, Callable, Sequence

import mxnet as mx
import numpy as np

from legato.adapters.mxnet._engine import after, copy_elements
from legato.adapters.mxnet._order import SocketOrderChannel, TraceGather
from legato.core.errors import ConfigError, LegatoError
from legato.core.protocols import Done
from legato.core.scheduler.plan import Chunk, ChunkPlan

__all__ = ["ScheduledKVStore", "check_kvstore"]

# legato's keys live far above the 0..n-1 that gluon.Trainer uses on the same kvstore; every
# ScheduledKVStore built on one kvstore takes the next range (all workers build them in the
# same order, so the ranges agree).
_KEY_START = 1 << 26
_KEY_RANGE = 1 << 20
_next_range: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CONTROL_SLOTS = 65  # values in a control round (the plan check, worker 0's address)
_PRIORITY = 1 << 20  # see [Note: engine priority]


def check_kvstore(kvstore) -> str:
    """The kvstore's type if it is a synchronous parameter-server kvstore; else ConfigError."""
    kind = kvstore if isinstance(kvstore, str) or kvstore is None else getattr(
        kvstore, "type", None)
    fix = ("legato's MXNet scheduler sends gradients through MXNet's parameter-server kvstore: "
           "build the gluon.Trainer with kvstore='dist_sync' (and update_on_kvstore=False) and "
           "start servers and workers (legato.launch.run_mxnet_ps_job, or DMLC_* as in MXNet's "
           "tools/launch.py)")
    if not isinstance(kind, str) or "dist" not in kind:
        raise ConfigError(f"kvstore={kind!r} is not a parameter-server kvstore; {fix}")
    if "async" in kind:
        raise ConfigError(f"kvstore={kind!r} applies each worker's push on its own, but legato "
                          "updates every worker from the sum of all workers' gradients; use "
                          "kvstore='dist_sync'")
    return kind


def _reserve_keys(kvstore, count: int) -> int:
    if count > _KEY_RANGE:
        raise ConfigError(f"the plan needs {count} kvstore keys, more than legato's range of "
                          f"{_KEY_RANGE}; pass a larger partition_bytes")
    index = _next_range.get(kvstore, 0)
    if _KEY_START + (index + 1) * _KEY_RANGE >= 1 << 31:
        raise LegatoError("legato has used up its kvstore keys on this kvstore; create a new "
                          "kvstore")
    _next_range[kvstore] = index + 1
    return _KEY_START + index * _KEY_RANGE


class ScheduledKVStore:
    """A `CommBackend` that sends chunks through a dist_sync kvstore; see the module docstring.

    Building one is collective (every worker, same plan, same order): it initializes the keys
    on the servers.

    Args:
        kvstore: a dist_sync kvstore (`mx.kv.create("dist_sync")`).
        plan: the chunks (the same on every worker).
        grads: grads(key) -> the gradient NDArray of task `key` (one context).
        on_started: called with each chunk right after its push and pull were issued, on the
            same thread (see [Note: threads]).
        timeout_s: how long connecting the order channel may take.
    """

    def __init__(self, kvstore, plan: ChunkPlan, grads: Callable[[int], mx.nd.NDArray], *,
                 on_started: Callable[[Chunk], None] | None = None,
                 timeout_s: float = 300.0, staged: bool = False,
                 wire: np.dtype | None = None) -> None:
        check_kvstore(kvstore)
        self._kv = kvstore
        self.rank = kvstore.rank
        self.num_workers = kvstore.num_workers
        self.plan = plan
        self._grads = grads
        self._on_started = on_started
        self._timeout_s = timeout_s
        self._closed = False
        base = _reserve_keys(kvstore, 2 + len(plan.chunks) + len(plan.tasks))
        self._control_key = base
        self._chunk_key0 = base + 1
        self._param_key0 = base + 1 + len(plan.chunks)
        self._flag_key = self._param_key0 + len(plan.tasks)  # see finite_count
        self._flags: collections.deque = collections.deque()  # finite_count's, to push

        # Buffers (see [Note: chunk buffers]); None for a whole tensor, which is its own,
        # unless `staged`: then every gradient is copied out when the step is called (the
        # trainer's gradient accumulation, where the user clears the gradients after step()).
        # With `wire` (compression), float gradients are copied into buffers of that type.
        staged = staged or wire is not None
        self._buffers: list[mx.nd.NDArray | None] = []
        self._member_at: list[dict[int, int]] = []  # merged chunk: key -> element offset
        init = []
        for chunk in plan.chunks:
            first = plan.task(chunk.parts[0].key)
            grad = grads(first.key)
            whole = (len(chunk.parts) == 1 and chunk.parts[0].offset == 0
                     and chunk.parts[0].nbytes == first.nbytes)
            at, offset = {}, 0
            for part in chunk.parts:
                at[part.key] = offset
                offset += part.nbytes // plan.task(part.key).itemsize
            self._member_at.append(at)
            narrow = wire is not None and np.dtype(grad.dtype) in (np.float32, np.float64)
            buf = mx.nd.zeros((chunk.nbytes // first.itemsize,), ctx=grad.context,
                              dtype=wire if narrow else grad.dtype)
            self._buffers.append(None if whole and not staged else buf)
            init.append(buf)
        self._control = mx.nd.zeros((_CONTROL_SLOTS,), dtype=np.float32)
        self._token = mx.nd.zeros((1,), dtype=np.float32)  # orders the watches (see watch)
        keys = ([self._control_key, self._flag_key]
                + [self._chunk_key0 + c.id for c in plan.chunks])
        # Collective: worker 0 pushes the initial values, then all workers meet in a barrier.
        self._kv.init(keys, [self._control.copy(), mx.nd.zeros((1,), dtype=np.float32)] + init)

        # Per task: (buffered chunk id, element offset in the gradient, element offset in the
        # chunk's buffer, elements) for every chunk of it that has a buffer of its own.
        self._copies: dict[int, list[tuple[int, int, int, int]]] = {}
        for task in plan.tasks:
            moves = []
            for chunk_id in plan.chunks_of(task.key):
                if self._buffers[chunk_id] is None:
                    continue
                chunk = plan.chunks[chunk_id]
                part = next(p for p in chunk.parts if p.key == task.key)
                at = self._member_at[chunk_id][task.key] if chunk.merged else 0
                moves.append((chunk_id, part.offset // task.itemsize, at,
                              part.nbytes // task.itemsize))
            self._copies[task.key] = moves

    # -- readiness ------------------------------------------------------------------------------
    def watch(self, key: int, on_ready: Callable[[int], None] | None,
              on_error: Callable[[BaseException], None]) -> None:
        """Have the engine copy task `key`'s gradient into the buffers of its chunks once
        backward has written it, then call `on_ready(key)` (if given); the training thread
        calls this after backward was issued. Watches run in the order they were issued: each
        also writes one token array, so that gradients ready at the same time are reported in
        that order, not in whatever order the engine's priority threads pick them up."""
        grad = self._grads(key)
        moves = self._copies[key]
        if not moves and on_ready is None:
            return

        def ready() -> None:
            try:
                for chunk_id, grad_at, buf_at, count in moves:
                    copy_elements(self._buffers[chunk_id], buf_at, grad, grad_at, count)
                if on_ready is not None:
                    on_ready(key)
            except BaseException as err:  # noqa: BLE001 (reported to the training thread)
                on_error(err)

        after([grad], [self._buffers[c] for c, _, _, _ in moves] + [self._token], ready,
              _PRIORITY)

    # -- CommBackend ---------------------------------------------------------------------------
    def start(self, chunk: Chunk, on_done: Done) -> None:
        """Issue the chunk's push and pull and the engine operation that reports it done
        (asynchronous; does not wait for them), then the `on_started` hook."""
        if self._closed:
            on_done(LegatoError(f"[rank {self.rank}] the scheduled kvstore is closed"))
            return
        try:
            while self._flags:  # see finite_count
                flag = self._flags.popleft()
                self._kv.push(self._flag_key, flag, priority=_PRIORITY + 1)
                self._kv.pull(self._flag_key, out=flag, priority=_PRIORITY + 1)
            buf = self._send_array(chunk)
            key = self._chunk_key0 + chunk.id
            self._kv.push(key, buf, priority=_PRIORITY - chunk.layer)
            self._kv.pull(key, out=buf, priority=_PRIORITY - chunk.layer)
            # Declared as a write: whatever touches the array later (the update, the next
            # backward, the next copy into it) comes after the report.
            after([], [buf], lambda: on_done(None), _PRIORITY)
        except BaseException as err:  # noqa: BLE001 (reported through on_done)
            on_done(err)
            return
        if self._on_started is not None:
            self._on_started(chunk)

    def _send_array(self, chunk: Chunk) -> mx.nd.NDArray:
        """The array pushed and pulled for `chunk`: the gradient itself, or its buffer."""
        buf = self._buffers[chunk.id]
        return self._grads(chunk.parts[0].key).reshape((-1,)) if buf is None else buf

    def copy_back(self, key: int, on_error: Callable[[BaseException], None],
                  into: mx.nd.NDArray | None = None) -> None:
        """Have the engine copy task `key`'s reduced chunks from their buffers into its
        gradient (or `into`, an array of its shape), after their pulls (and before whatever
        reads that array later)."""
        moves = self._copies[key]
        if not moves:
            return
        grad = self._grads(key) if into is None else into

        def copy() -> None:
            try:
                for chunk_id, grad_at, buf_at, count in moves:
                    copy_elements(grad, grad_at, self._buffers[chunk_id], buf_at, count)
            except BaseException as err:  # noqa: BLE001 (reported to the training thread)
                on_error(err)

        after([self._buffers[c] for c, _, _, _ in moves], [grad], copy, _PRIORITY)

    def finite_count(self, grads: Sequence[mx.nd.NDArray]) -> mx.nd.NDArray:
        """Issue (asynchronously, in the engine) this worker's check that `grads` are all
        finite; returns the array that will hold how many workers' gradients were all finite
        (mixed precision's skip decision; every worker calls it once per step, before the
        step's chunks can start). Its sum over the workers is pushed and pulled by the
        dispatching thread, with the step's first chunk ([Note: threads]: the only thread that
        touches the kvstore while the scheduler runs), before anything can read it."""
        flag = mx.nd.ones((1,), dtype=np.float32)
        for at in range(0, len(grads), 200):  # as MXNet's LossScaler, 200 arrays per call
            part = grads[at:at + 200]
            mx.nd.multi_all_finite(*part, num_arrays=len(part), init_output=False, out=flag)
        self._flags.append(flag)
        return flag

    # -- construction-time collectives (the constructing thread, before the scheduler runs) ----
    def _control_round(self, values: np.ndarray) -> np.ndarray:
        """Every worker pushes `values` to the control key once; returns the sum (blocks)."""
        src = mx.nd.array(values, dtype=np.float32)
        src.copyto(self._control)
        self._kv.push(self._control_key, self._control)
        self._kv.pull(self._control_key, out=self._control)
        return self._control.asnumpy()

    def check_plan(self, digest: str, describe: str = "") -> None:
        """Check (collective) that every worker built the plan with hex `digest`, and that the
        servers only sum what workers push; ConfigError otherwise.

        Each worker pushes 1, the digest's bytes b and their squares: the servers must return
        the number of workers, and all digests are equal exactly when the sums are n*b and n*b*b
        for this worker's b (equality in Cauchy-Schwarz)."""
        raw = np.frombuffer(bytes.fromhex(digest)[:(_CONTROL_SLOTS - 1) // 2], np.uint8)
        values = np.zeros(_CONTROL_SLOTS, np.float32)
        values[0] = 1
        values[1:1 + raw.size] = raw
        values[1 + raw.size:1 + 2 * raw.size] = raw.astype(np.float32) ** 2
        total = self._control_round(values)
        if total[0] != self.num_workers:
            raise ConfigError(
                f"[rank {self.rank}] the servers did not return the sum of what the "
                f"{self.num_workers} workers pushed (got {total[0]:g}): an optimizer runs on "
                "them (kv.set_optimizer, or a gluon.Trainer with update_on_kvstore=True, the "
                "default for dist kvstores, stepped on this kvstore) and would apply to legato's"
                " keys too; use update_on_kvstore=False for every Trainer on this kvstore")
        if not np.array_equal(total[1:1 + 2 * raw.size],
                              values[1:1 + 2 * raw.size] * self.num_workers):
            raise ConfigError(f"[rank {self.rank}] workers built different communication plans "
                              f"(this one: {describe or digest}); every worker must wrap the "
                              "same model with the same settings")

    def broadcast(self, arrays: Sequence[mx.nd.NDArray]) -> None:
        """Give every worker worker 0's values of `arrays` (collective; blocks until done)."""
        keys = [self._param_key0 + i for i in range(len(arrays))]
        self._kv.broadcast(keys, list(arrays), out=list(arrays))
        for a in arrays:
            a.wait_to_read()

    def broadcast_object(self, obj: Any) -> Any:
        """Worker 0's `obj` on every worker (collective; the others pass anything): pickled,
        its length in one control round, then 64 bytes a round. For small objects at step
        boundaries (a tuning decision), while no scheduler runs ([Note: threads])."""
        payload = pickle.dumps(obj) if self.rank == 0 else b""
        head = np.zeros(_CONTROL_SLOTS, np.float32)
        if self.rank == 0:
            head[0], head[1] = 1, len(payload)
        total = self._control_round(head)
        if total[0] != 1 or not 0 < total[1] < 1 << 24:
            raise LegatoError(f"[rank {self.rank}] receiving worker 0's decision failed (got "
                              f"{total[:2]}); do all workers step the same number of times?")
        size, per, data = int(total[1]), _CONTROL_SLOTS - 1, bytearray()
        for at in range(0, size, per):
            values = np.zeros(_CONTROL_SLOTS, np.float32)
            part = payload[at:at + per]
            values[1:1 + len(part)] = np.frombuffer(part, np.uint8)
            got = self._control_round(values)[1:1 + min(per, size - at)]
            data += got.astype(np.uint8).tobytes()
        return pickle.loads(bytes(data))

    def order_channel(self) -> SocketOrderChannel:
        """Worker 0's dispatch order for the other workers (collective; see _order.py)."""
        return SocketOrderChannel(self.rank, self.num_workers, self._exchange_address,
                                  timeout_s=self._timeout_s)

    def trace_gather(self) -> TraceGather:
        """What gathers every worker's timeline onto worker 0 at close (collective; see
        _order.py)."""
        return TraceGather(self.rank, self.num_workers, self._exchange_address)

    def _exchange_address(self, address: tuple[str, int] | None) -> tuple[str, int]:
        """One control round: worker 0 pushes its (IPv4, port), the others zeros."""
        values = np.zeros(_CONTROL_SLOTS, np.float32)
        if address is not None:
            host, port = address
            values[0] = 1
            values[1:5] = [int(b) for b in socket.inet_aton(host)]
            values[5:7] = divmod(port, 256)
        total = self._control_round(values)
        if total[0] != 1:
            raise LegatoError(f"[rank {self.rank}] sharing worker 0's address failed (got "
                              f"{total[:7]})")
        host = socket.inet_ntoa(bytes(int(v) for v in total[1:5]))
        return host, int(total[5]) * 256 + int(total[6])

    def close(self) -> None:
        """Stop accepting chunks (after the scheduler has stopped starting them)."""
        self._closed = True
        # Drop the kvstore now: it must be freed (ps-lite finalized) before interpreter exit.
        self._kv = None
