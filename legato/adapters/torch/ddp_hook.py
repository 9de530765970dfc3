"""A DDP communication hook that schedules DDP's bucket all-reduces with legato's Scheduler.

    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=4)
    hook = register_scheduled_hook(ddp, policy="bytescheduler", partition_bytes=1 << 20)
    for x, y in data:
        loss_fn(ddp(x), y).backward()   # buckets are reduced in priority order, in pieces
        opt.step(); opt.zero_grad()
    hook.close()

For users who keep DistributedDataParallel. What it can and cannot do, compared with
`ScheduledOptimizer` (each point checked against torch's DDP and its C++ Reducer):

CAN
- reorder DDP's bucket all-reduces inside one backward pass: each bucket is a task whose
  priority is its position (the bucket with the highest index holds the front layers and goes
  first), so a front bucket that becomes ready while a back bucket is still being sent overtakes
  it at the next piece;
- partition buckets into `partition_bytes` pieces (views of DDP's bucket buffer, no copy),
  merge buckets smaller than `merge_bytes`, and bound the bytes in flight with `credit_bytes`;
- keep DDP's numerics: every piece is divided by the world size and summed, as DDP's own
  all-reduce does; on 2 ranks the result is bit-identical to plain DDP whatever the partitions.

CANNOT
- cross the end of backward: DDP's Reducer queues `finalize_backward` as an autograd final
  callback that waits for every bucket's future before `loss.backward()` returns, and the
  optimizer step is the user's, called after that. So the next forward never overlaps
  communication, which is most of what `ScheduledOptimizer` gains (layer i's next forward starts
  once layer i is updated). With this hook only the order inside backward changes.
- prioritise finer than a bucket: DDP fills buckets of `bucket_cap_mb` (25 MiB by default) and
  calls the hook for bucket i only once buckets 0..i-1 were handed out (the Reducer's
  `mark_bucket_ready` starts buckets strictly in index order). A smaller `bucket_cap_mb` (say 1
  to 4 MiB) gives more buckets and so a finer priority.
- schedule the first iteration(s): DDP puts every parameter in one bucket until it rebuilds its
  buckets in the second iteration's forward (the third with static_graph=True; never with
  find_unused_parameters=True), from the order gradients became ready, so legato reduces
  buckets with a plain all-reduce until the layout is final, then plans once.
- update per layer, gate the next forward, or clip inside the scheduler: the optimizer is
  untouched (use `ScheduledOptimizer` without DDP for those).
- be unregistered: DDP accepts one comm hook per model, for good. After `close()` the hook
  falls back to DDP's own behaviour (average by all-reduce over DDP's process group).
- combine with DDP's `mixed_precision` (it registers its own hook), `skip_all_reduce_unused_params`
  or the compiled-autograd Python reducer; these are refused with an error. Sparse gradients
  are refused when seen.

Every rank checks that all ranks built the same plan (an all-gather of its digest); rank 0
decides the order of collectives and announces it (the Scheduler's order channel), so ranks
issue collectives in the same order. A dead peer or a stuck rank makes `backward()` raise an
error naming the rank and bucket within `timeout_s`.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import logging
import threading
import time
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

from legato.adapters.gloo import TorchDistTransport, chunk_buffer, copy_back
from legato.core.errors import ConfigError, LegatoError
from legato.core.protocols import Done
from legato.core.scheduler.core import CommFailed, Scheduler
from legato.core.scheduler.plan import Chunk, ChunkPlan, CommTask, make_plan
from legato.core.scheduler.policy import SchedulerConfig, resolve_config

__all__ = ["ScheduledCommHook", "register_scheduled_hook"]

log = logging.getLogger(__name__)

# Learning iterations after which a layout seen twice in a row is taken as final even where DDP
# does not say whether it rebuilt its buckets (DDP rebuilds at most once, by iteration 3).
_STABLE_AFTER = 4


def register_scheduled_hook(ddp_model, *, policy: str = "bytescheduler",
                            partition_bytes: int | None = None, credit_bytes: int | None = None,
                            merge_bytes: int | None = None, process_group=None,
                            timeout_s: float = 300.0) -> "ScheduledCommHook":
    """Register legato's scheduling comm hook on `ddp_model`; returns its handle.

    Collective: every rank of DDP's process group must call it (it creates legato's own
    groups), before the first backward.

    Args:
        ddp_model: a `torch.nn.parallel.DistributedDataParallel` without a comm hook.
        policy: "bytescheduler" (priority + partitions + window), "priority" (whole buckets,
            front first, one in flight) or "fifo" (DDP's order, everything at once).
        partition_bytes: largest message for "bytescheduler" (default 1 MiB).
        credit_bytes: bytes in flight (default 4 partitions; "priority": one message).
        merge_bytes: buckets smaller than this are merged into one message (default 64 KiB).
        process_group: the ranks to reduce over; must hold DDP's ranks (default: DDP's group).
        timeout_s: how long any wait may last before `backward()` fails with an error; also
            the longest pause between two backward passes a follower rank tolerates.

    Returns:
        The hook's handle: `close()`, `stats`, `issued()`, `plan`.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise ConfigError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got "
                          f"{type(ddp_model).__name__}; wrap the model in DDP first, or use "
                          "ScheduledOptimizer for a plain model")
    if getattr(ddp_model, "_comm_hooks", None):
        names = ", ".join(getattr(h, "__qualname__", repr(h)) for h, _ in ddp_model._comm_hooks)
        raise ConfigError(f"this DDP model already has a comm hook ({names}); DDP accepts one "
                          "per model (DDP's mixed_precision registers its own): build a new "
                          "DDP model without it")
    if getattr(ddp_model, "_use_python_reducer", False):
        raise ConfigError("DDP runs its Python reducer (compiled autograd), which calls comm "
                          "hooks per parameter, not per bucket; legato's hook needs the C++ "
                          "Reducer")
    if getattr(ddp_model, "skip_all_reduce_unused_params", False):
        raise ConfigError("skip_all_reduce_unused_params=True skips the hook for unused "
                          "buckets, so a step's set of buckets is not fixed; build DDP without it")
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"timeout_s={timeout_s!r} is invalid; pass a positive number")
    if policy == "plain":
        raise ConfigError("policy='plain' is DDP's own behaviour; without legato's hook DDP "
                          "already does it: use 'bytescheduler', 'priority' or 'fifo'")
    config = resolve_config(policy, partition_bytes=partition_bytes, credit_bytes=credit_bytes,
                            merge_bytes=merge_bytes)
    ddp_group = ddp_model.process_group
    if process_group is not None:
        ours = dist.get_process_group_ranks(process_group)
        theirs = dist.get_process_group_ranks(ddp_group)
        if sorted(ours) != sorted(theirs):
            raise ConfigError(f"process_group holds ranks {ours}, DDP reduces over {theirs}; "
                              "legato averages over DDP's ranks: pass a group with the same "
                              "ranks or None")
    transport = TorchDistTransport(process_group or ddp_group, float(timeout_s))
    hook = ScheduledCommHook(ddp_model, config, transport, float(timeout_s))
    ddp_model.register_comm_hook(hook, _scheduled_hook)
    log.info("[rank %d] legato DDP hook: %s", transport.rank, config.describe())
    return hook


def _scheduled_hook(state, bucket):
    """The function DDP calls once per bucket: (ScheduledCommHook, GradBucket) -> Future.

    DDP checks a hook's signature: the parameter must be named `bucket`, and annotations (which
    `from __future__ import annotations` turns into strings) must be absent or exact.
    """
    return state._on_bucket(bucket)


def _value(fut: torch.futures.Future):
    # [Note: errors through then()] A future completed with set_exception() holds the Python
    # exception as its value, which DDP's C++ Reducer cannot read ("Unable to cast ... to
    # Tensor"); re-raising it inside then() marks the returned future failed in C++, so
    # backward() raises a RuntimeError that carries legato's message.
    return fut.value()


class _BucketBackend:
    """All-reduces pieces of DDP's bucket buffers over legato's group, divided as DDP divides."""

    def __init__(self, buffers: Callable[[int], torch.Tensor], group,
                 log_issue: Callable[[str], None]) -> None:
        self._buffers = buffers
        self._group = group
        self._world = dist.get_world_size(group)
        self._log_issue = log_issue

    def start(self, chunk: Chunk, on_done: Done) -> None:
        try:
            buffer, direct = chunk_buffer(self._buffers, chunk)
            buffer.div_(self._world)
            self._log_issue(f"c{chunk.id}")
            work = dist.all_reduce(buffer, group=self._group, async_op=True)
        except BaseException as err:  # noqa: BLE001 (reported to the scheduler)
            on_done(err)
            return

        def finished(fut: torch.futures.Future) -> None:
            try:
                fut.value()
                if not direct:
                    copy_back(self._buffers, chunk, buffer)
            except BaseException as err:  # noqa: BLE001
                on_done(err)
                return
            on_done(None)

        work.get_future().add_done_callback(finished)


class ScheduledCommHook:
    """The hook's state and handle (made by `register_scheduled_hook`; see the module doc).

    Attributes:
        config: the resolved policy settings.
        plan: the chunk plan over DDP's buckets, None until DDP's bucket layout is final.
    """

    def __init__(self, ddp_model, config: SchedulerConfig, transport: TorchDistTransport,
                 timeout_s: float) -> None:
        self.config = config
        self.plan: ChunkPlan | None = None
        self._ddp_ref = weakref.ref(ddp_model)
        self._ddp_group = ddp_model.process_group
        self._transport = transport
        self._rank = transport.rank
        self._world = transport.world
        self._timeout_s = timeout_s
        names = {id(p): n for n, p in ddp_model.module.named_parameters()}
        self._param_key = {id(p): i for i, p in enumerate(ddp_model.module.parameters())}
        self._param_name = [names.get(id(p), f"param{i}")
                            for i, p in enumerate(ddp_model.module.parameters())]
        self._lock = threading.Condition()
        self._scheduler: Scheduler | None = None
        self._layout: tuple | None = None  # final: (numel, dtype, itemsize, keys) per bucket
        self._seen: list[tuple] = []  # this learning iteration's buckets so far
        self._previous: tuple | None = None
        self._next_index = 0
        self._buffers: dict[int, torch.Tensor] = {}
        self._futures: dict[int, torch.futures.Future] = {}
        self._left: dict[int, int] = {}
        self._since: dict[int, float] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._watcher: threading.Thread | None = None
        self.iterations = 0
        self.plain_iterations = 0
        self._issued: collections.deque[str] = collections.deque(maxlen=100_000)
        ref = weakref.ref(self)
        self._atexit = lambda: ref() is not None and ref().close()  # noqa: E731
        atexit.register(self._atexit)

    # -- called by DDP -------------------------------------------------------------------------
    def _on_bucket(self, bucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        if self._closed:
            return self._plain(buffer, self._ddp_group, record=False)
        self._raise_if_failed()
        if buffer.layout != torch.strided:
            raise ConfigError("legato's DDP hook reduces dense buckets only; this bucket holds "
                              "a sparse gradient (an nn.Embedding(sparse=True)?)")
        index = bucket.index()
        if index != self._next_index:
            raise LegatoError(f"[rank {self._rank}] DDP handed bucket {index} while legato "
                              f"expected bucket {self._next_index}; was a backward pass "
                              "interrupted?")
        if index == 0:
            self.iterations += 1
            self._seen = []
        self._next_index = 0 if bucket.is_last() else index + 1
        if self._scheduler is None:
            return self._learn(bucket, index, buffer)
        return self._schedule(bucket, index, buffer)

    # -- before the plan: plain all-reduce, learning DDP's buckets ------------------------------
    def _plain(self, buffer: torch.Tensor, group, record: bool = True,
               index: int = 0) -> torch.futures.Future:
        buffer.div_(dist.get_world_size(group))
        if record:
            self._issued.append(f"p{index}")
        return (dist.all_reduce(buffer, group=group, async_op=True).get_future()
                .then(lambda fut: fut.value()[0]))

    def _learn(self, bucket, index: int, buffer: torch.Tensor) -> torch.futures.Future:
        keys = tuple(self._param_key.get(id(p), -1) for p in bucket.parameters())
        self._seen.append((buffer.numel(), str(buffer.dtype), buffer.element_size(), keys))
        fut = self._plain(buffer, self._transport.comm_group, index=index)
        if bucket.is_last():
            self.plain_iterations += 1
            layout = tuple(self._seen)
            if self._layout_final(layout):
                self._arm(layout)
            self._previous = layout
        return fut

    def _layout_final(self, layout: tuple) -> bool:
        """Whether DDP will keep this bucket layout (see [Note: when the layout is final])."""
        # [Note: when the layout is final] DDP's Reducer rebuilds its buckets at most once
        # (has_rebuilt_bucket_), in the forward after the first iteration that recorded the
        # order gradients became ready, and never when find_unused_parameters=True without
        # static_graph (should_rebuild_buckets). DDP's Python side records the rebuild in
        # _has_rebuilt_buckets, set on all ranks in the same forward (the rebuild broadcasts
        # rank 0's bucket indices). Where DDP lacks that attribute, a layout seen in two
        # consecutive learning iterations after _STABLE_AFTER of them is taken as final.
        ddp = self._ddp_ref()
        rebuilt = getattr(ddp, "_has_rebuilt_buckets", None)
        if rebuilt:
            return True
        if ddp is not None and getattr(ddp, "find_unused_parameters", False) and \
                not getattr(ddp, "static_graph", False):
            return True
        return self.plain_iterations >= _STABLE_AFTER and layout == self._previous

    def _arm(self, layout: tuple) -> None:
        """Plan over the final buckets, check every rank agrees, start the scheduler."""
        count = len(layout)
        tasks = []
        for index, (numel, _, itemsize, keys) in enumerate(layout):
            known = [self._param_name[k] for k in keys if k >= 0]
            span = f"{known[-1]}..{known[0]}" if len(known) > 1 else (known[0] if known else "")
            tasks.append(CommTask(index, f"bucket {index} ({span})", count - 1 - index,
                                  numel * itemsize, itemsize))
        merge = self.config.merge_bytes if len({entry[1] for entry in layout}) == 1 else 0
        plan = make_plan(tasks, partition_bytes=self.config.partition_bytes, merge_bytes=merge)
        layout_digest = hashlib.sha256(repr(layout).encode()).hexdigest()[:16]
        gathered = self._transport.all_gather_object((plan.digest(), layout_digest))
        if any(g != gathered[0] for g in gathered):
            raise ConfigError(
                f"[rank {self._rank}] ranks built different communication plans over DDP's "
                f"buckets ((plan, bucket layout) digests per rank: {gathered}); every rank must "
                "wrap the same model in DDP with the same bucket_cap_mb and call "
                "register_scheduled_hook with the same settings")
        self.plan = plan
        self._layout = layout
        backend = _BucketBackend(self._buffer_of, self._transport.comm_group,
                                 self._issued.append)
        self._scheduler = Scheduler(
            plan, self.config, backend, order=self._transport.order_channel(),
            leader=self._transport.group_rank == 0, on_chunk_done=self._chunk_done,
            rank=self._rank, timeout_s=self._timeout_s)
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name=f"legato-ddp-watch-r{self._rank}")
        self._watcher.start()
        log.info("[rank %d] legato DDP hook planned after %d plain iteration(s): %s",
                 self._rank, self.plain_iterations, plan.describe())

    # -- with the plan: hand the bucket to the scheduler ----------------------------------------
    def _schedule(self, bucket, index: int, buffer: torch.Tensor) -> torch.futures.Future:
        numel, dtype = self._layout[index][:2] if index < len(self._layout) else (None, None)
        if numel != buffer.numel() or dtype != str(buffer.dtype) or \
                (bucket.is_last() and index != len(self._layout) - 1):
            raise LegatoError(
                f"[rank {self._rank}] DDP's bucket {index} ({buffer.numel()} x {buffer.dtype}, "
                f"last={bucket.is_last()}) differs from the layout legato planned over "
                f"({len(self._layout)} buckets; bucket {index}: {numel} x {dtype}); DDP's "
                "buckets changed after they were final, which legato does not support")
        inner: torch.futures.Future = torch.futures.Future()
        out = inner.then(_value)
        with self._lock:
            self._buffers[index] = buffer
            self._futures[index] = inner
            self._left[index] = len(self.plan.chunks_of(index))
            self._since[index] = time.monotonic()
            self._lock.notify_all()
        self._scheduler.tensor_ready(index)
        return out

    def _buffer_of(self, key: int) -> torch.Tensor:
        return self._buffers[key]

    def _chunk_done(self, chunk: Chunk) -> None:
        """A piece was reduced (backend thread): complete the buckets whose pieces are all in."""
        done = []
        with self._lock:
            for key in chunk.keys:
                self._left[key] -= 1
                if self._left[key] == 0:
                    fut = self._futures.pop(key, None)
                    self._since.pop(key, None)
                    if fut is not None:
                        done.append((fut, self._buffers[key]))
        for fut, buffer in done:
            fut.set_result(buffer)

    # -- failures ------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Fail pending buckets when the scheduler fails or a bucket waits past timeout_s."""
        while True:
            with self._lock:
                while not self._futures and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                self._lock.wait(0.1)
                err = self._scheduler.error if self._scheduler is not None else None
                late = [k for k, t in self._since.items()
                        if time.monotonic() - t > self._timeout_s]
            if err is None and late:
                err = CommFailed(
                    f"[rank {self._rank}] DDP bucket {late[0]} not reduced after "
                    f"{self._timeout_s:g} s ({self.plan.task(late[0]).name}); is a peer rank "
                    "dead or stuck?")
            if err is not None:
                self._fail(err)

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
                log.error("%s", err)
            pending = list(self._futures.values())
            self._futures.clear()
            self._since.clear()
        for fut in pending:
            fut.set_exception(err)

    def _raise_if_failed(self) -> None:
        err = self._error or (self._scheduler.error if self._scheduler is not None else None)
        if err is not None:
            raise err

    # -- handle --------------------------------------------------------------------------------
    def issued(self) -> list[str]:
        """The collectives this rank started, in order: "p<bucket>" for a plain all-reduce
        before the plan, "c<chunk>" for a scheduled piece (the last 100000)."""
        return list(self._issued)

    @property
    def error(self) -> BaseException | None:
        """The failure that stopped the hook, if any."""
        return self._error or (self._scheduler.error if self._scheduler is not None else None)

    @property
    def stats(self) -> dict[str, Any]:
        plan = self.plan
        return {"iterations": self.iterations, "plain_iterations": self.plain_iterations,
                "scheduled_iterations": self.iterations - self.plain_iterations,
                "buckets": len(self._layout) if self._layout else None,
                "messages_per_step": len(plan.chunks) if plan else None,
                "bytes_per_step": plan.total_bytes if plan else None,
                "issued": len(self._issued), "policy": self.config.policy,
                "closed": self._closed}

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop legato's threads and destroy its groups; DDP then averages as it does itself."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            pending = bool(self._futures)
            self._lock.notify_all()
        if pending:
            self._fail(LegatoError(f"[rank {self._rank}] legato's DDP hook was closed during "
                                   "a backward pass"))
        try:
            if self._scheduler is not None:
                self._scheduler.close(timeout_s=timeout_s)
            if self._watcher is not None:
                self._watcher.join(timeout_s)
        except (RuntimeError, ValueError) as err:  # groups already gone (destroyed, peer dead)
            log.warning("[rank %d] closing legato's DDP hook: %s", self._rank, err)
        finally:
            atexit.unregister(self._atexit)
            self._transport.close()

    def __repr__(self) -> str:
        planned = self.plan.describe() if self.plan else "not planned yet"
        return f"ScheduledCommHook({self.config.describe()}, {planned})"
