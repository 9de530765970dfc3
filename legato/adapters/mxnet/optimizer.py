"""ScheduledTrainer: priority-scheduled gradient push/pull for a gluon Trainer over dist_sync.

    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9},
                            kvstore="dist_sync", update_on_kvstore=False)
    trainer = ScheduledTrainer(trainer, net)    # policy="bytescheduler"
    for x, y in data:
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch_size)   # returns at once; each layer updates when its gradients are back
    trainer.close()                # (or trainer.synchronize() before reading parameters)

How a step runs, after ByteScheduler's MXNet plugin:
- `step()` checks that backward produced every gradient, issues the copies of gradients into
  partition and merged buffers (comm.py, [Note: staged copies]), closes every layer's gate
  (proxy.py) and hands the step to a ready-watcher thread, which waits for each gradient in
  backward order (`wait_to_read()`, last layer first) and tells the core `Scheduler`;
- the scheduler (legato.core.scheduler, unchanged) has cut and merged the gradients into
  chunks after the policy and releases them in priority order while its credit window has
  room; `ScheduledKVStore.start` pushes and pulls each chunk on a kvstore key of its own;
- when every chunk of a layer has been started, the same thread issues that layer's update:
  copies of partitions and merged messages back into the gradients, then the gluon Trainer's
  own updater on the layer's parameters (its optimizer, states and `rescale_grad = scale /
  batch_size`, as `gluon.Trainer.step` with update_on_kvstore=False does). MXNet's engine runs
  these after the pulls they read ([Note: issue at start]);
- when the layer's chunks are also reported done, its gate opens: the next forward of the
  blocks that read that layer may go ([Note: open at report]), while later layers are still
  communicating.

Gradient accumulation is gluon's own idiom: grad_req='add' on the parameters, N backward passes,
`trainer.step(N * batch_size)`, then `zero_grad()` (see [Note: accumulation] in the code).
Mixed precision is MXNet's AMP: `amp.init_trainer(gluon_trainer)`, then `amp.scale_loss(loss,
scheduled_trainer)` as usual ([Note: loss scaling]).

Under policy="plain" (the pass-through) there are no gates: one message per gradient, as
gluon's Trainer sends them ([Note: MXNet's pass-through]), and `step()` waits until every one
is started and the update of all layers is issued, as one gluon `Trainer.step` would do.

The optimizer's per-parameter update depends only on that parameter's gradient and state for
every optimizer MXNet ships, so updating layer by layer gives the same result as one update of
all parameters; the optimizer's update counts (and so its lr scheduler) advance per index as in
gluon.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import weakref
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from legato.adapters.mxnet.comm import ScheduledKVStore, check_kvstore
from legato.adapters.mxnet.proxy import BlockGates, named_blocks
from legato.core.errors import ConfigError, LegatoError
from legato.core.scheduler import env as scheduler_env
from legato.core.scheduler.core import Scheduler
from legato.core.scheduler.layers import LayerProgress, layer_keys
from legato.core.scheduler.plan import CommTask
from legato.core.scheduler.policy import plan_for, resolve_config
from legato.core.scheduler.steps import (ClosesOnExit, LayerUpdater, StepTracker,
                                         close_scheduled)
from legato.core.scheduler.tune import TuningSession, wrapper_settings
from legato.core.timeline import SchedulerTrace, SpannedBackend, check_trace_path

__all__ = ["ScheduledTrainer"]

log = logging.getLogger(__name__)

_DOMAIN: list = []   # MXNet's profiler domain "legato", made at the first span

# [Note: MXNet's pass-through] gluon's Trainer pushes each gradient on a key of its own as the
# engine produces it. DDP's 25 MiB buckets, the `plain` of the other adapters, copy gradients
# into bucket buffers and send nothing until a bucket is full: measured 0.91x-1.00x gluon's
# step, against 0.96x-1.02x for one message per gradient (docs/benchmarks.md). So `plain`
# here sends one message per gradient (a bucket closes once it holds a byte), unless
# merge_bytes is given; so does the tuner's and the defaults' pass-through.
PLAIN_MERGE_BYTES = 1


@contextlib.contextmanager
def _profiled(name: str):
    """A task of MXNet's profiler in the domain "legato" (recorded while
    `mx.profiler.set_state("run")`, in `mx.profiler.dump()`'s trace beside the engine's
    operators). legato's threads issue the messages and updates, which MXNet's engine runs
    later: the span covers the issuing; the operators themselves are MXNet's own events."""
    if not _DOMAIN:
        _DOMAIN.append(mx.profiler.Domain("legato"))
    task = mx.profiler.Task(_DOMAIN[0], name)
    task.start()
    try:
        yield
    finally:
        task.stop()


def _weak_method(method):
    """`method` without keeping its object alive. [Note: no cycle through the queue] The native
    priority queue keeps its executor (the Scheduler) after shutdown, a reference cycle Python's
    GC cannot see into; if the Scheduler held the trainer strongly, the kvstore would outlive the
    interpreter's teardown and ps-lite would abort at exit instead of finalizing."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        if bound is not None:
            bound(*args)
    return call


def _ignore(_chunk) -> None:
    """The scheduler's on_chunk_done: nothing to do, the update was issued at start."""


class _OneGradient:
    """What MXNet's LossScaler.has_overflow reads of a parameter: its gradients (`_grad`)."""

    def __init__(self, grad: mx.nd.NDArray) -> None:
        self._grad = [grad]


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


class ScheduledTrainer(ClosesOnExit):
    """Wraps a `gluon.Trainer` so that `model`'s gradients go through its dist_sync kvstore in
    priority order and each layer is updated as soon as its gradients are back.

    Args:
        trainer: a gluon.Trainer over `model`'s trainable parameters, built with a dist_sync
            kvstore (`kvstore="dist_sync"` or an `mx.kv.create("dist_sync")`) and
            update_on_kvstore=False (None is taken as False); not stepped before.
        model: the root block (its parameters initialized, shapes known).
        policy: "bytescheduler" (priority + partitions + credit window), "priority" (layer
            order, whole tensors, one message in flight), "fifo" (arrival order) or "plain"
            (the pass-through: one message per gradient in arrival order, as gluon's
            Trainer, or buckets of merge_bytes; one update after all of them, no dependency
            proxies).
        partition_bytes: largest message for "bytescheduler" (default 1 MiB).
        credit_bytes: bytes in flight (default 4 partitions; "priority": one message).
        merge_bytes: tensors smaller than this are merged into one message (bytescheduler
            default 64 KiB).
        timeout_s: how long any wait may last before failing with an error naming the rank,
            step and layer (a dead server or worker).
        broadcast_parameters: give every worker worker 0's parameters at start (what
            gluon.Trainer does on its first step with a dist kvstore).
        queue_impl: the scheduler's priority queue: "auto", "native" or "python".
        timeline: write a Chrome trace (Perfetto) of every worker's messages (waiting, then
            push and pull) to this path on worker 0 at `close()`. Each worker also writes its
            spans as they come to `<timeline>.rank<N>.partial.json`, kept when the job ends
            badly. Every worker must give one, or none.
        compression: "fp16": float gradients travel (and are summed on the servers) in
            float16, as with Horovod's Compression.fp16: every gradient is copied into a
            buffer of that type and the sum copied back.
        tune: tune partition_bytes and credit_bytes online, as the PyTorch and TensorFlow
            wrappers do (the core's `TuningSession`: Bayesian optimization over step times,
            with the pass-through `plain` as a candidate): True, a dict of
            `legato.core.scheduler.tune.TuneSettings` fields, or None. policy must be
            "bytescheduler". See [Note: tuning over a kvstore] for what each setting tried
            costs.
        defaults: "auto" (the default), "fixed" or "fixed-or-plain". With "fixed-or-plain"
            (what "auto" is when no policy other than bytescheduler, no size and no tuner is
            given; else "fixed") the first steps measure the fixed sizes against plain (the
            pass-through), alternately, and every worker keeps the faster ([Note: measured
            defaults] in legato.core.scheduler.tune: 40 steps, 80 at most; `trainer.tuning` is
            True meanwhile, `trainer.stats["tuner"]` gives the measurements).

    policy, the sizes, timeout_s, timeline, compression, tune and defaults can come from
    LEGATO_POLICY, LEGATO_PARTITION_BYTES, LEGATO_CREDIT_BYTES, LEGATO_MERGE_BYTES,
    LEGATO_TIMEOUT_S, LEGATO_TIMELINE, LEGATO_COMPRESSION, LEGATO_TUNE and LEGATO_DEFAULTS
    instead (an argument wins).
    """

    def __init__(self, trainer: gluon.Trainer, model: gluon.Block, *,
                 policy: str | None = None, partition_bytes: int | None = None,
                 credit_bytes: int | None = None, merge_bytes: int | None = None,
                 timeout_s: float | None = None, broadcast_parameters: bool = True,
                 queue_impl: str = "auto", timeline: str | None = None,
                 compression: str | None = None, tune: Any = None,
                 defaults: str | None = None) -> None:
        settings, from_env = scheduler_env.adapter_settings(
            "MXNet", policy=policy, partition_bytes=partition_bytes, credit_bytes=credit_bytes,
            merge_bytes=merge_bytes, timeout_s=timeout_s, timeline=timeline,
            compression=compression, tune=tune, defaults=defaults)
        timeline = settings["timeline"]
        compression = str(settings["compression"]).lower()
        if compression not in ("none", "fp16"):
            raise ConfigError(f"compression={settings['compression']!r} is unknown here; pass "
                              "'fp16' or None (MXNet's kvstore has no bfloat16)")
        wire = np.dtype(np.float16) if compression == "fp16" else None
        if timeline is not None:
            check_trace_path(timeline)
        timeout_s = settings["timeout_s"]
        if isinstance(trainer, ScheduledTrainer):
            raise ConfigError("trainer is already a ScheduledTrainer; wrap a gluon.Trainer once")
        if not isinstance(trainer, gluon.Trainer):
            raise ConfigError(f"trainer must be a gluon.Trainer, got {type(trainer).__name__}")
        if not isinstance(model, gluon.Block):
            raise ConfigError(f"model must be a gluon Block, got {type(model).__name__}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ConfigError(f"timeout_s={timeout_s!r} is invalid; pass a positive number of "
                              "seconds")
        # Everything that can be checked locally is checked before any collective call.
        kv_arg = self._check_trainer(trainer)
        self._trainer = trainer
        self._model = model
        self._timeout_s = float(timeout_s)
        self._params, self._index = self._check_params(trainer, model)
        self.config, self._tune, self.defaults_mode = wrapper_settings(
            settings, "MXNet", plain_merge_bytes=PLAIN_MERGE_BYTES)
        self._names = [p.name for p in self._params]
        layer_of, direct, self._layer_names = self._layers_of(model, self._params)
        self._layer_of_key = [layer_of[id(p)] for p in self._params]
        self._keys_of_layer = layer_keys(self._layer_of_key, len(self._layer_names))
        self._tasks = []
        for key, p in enumerate(self._params):
            grad = p.list_grad()[0]
            dtype = np.dtype(grad.dtype)
            self._tasks.append(CommTask(key, p.name, self._layer_of_key[key],
                                        grad.size * dtype.itemsize, dtype.itemsize, dtype.name))
        self._tuning: TuningSession | None = None
        if self._tune is not None:
            self._tuning = TuningSession(self._tune, self.config,
                                         max(t.nbytes for t in self._tasks),
                                         plain=resolve_config("plain",
                                                              merge_bytes=PLAIN_MERGE_BYTES))
            self.config = self._tuning.config
        self._set_plan()
        # Backward produces the last layers' gradients first: the watcher waits in that order.
        self._backward_order = sorted(range(len(self._params)),
                                      key=lambda k: (self._layer_of_key[k], k), reverse=True)
        self._opt = trainer._optimizer
        self._updater = trainer._updaters[0]

        self._cv = threading.Condition()  # the pass-through's count of started chunks
        # Steps called and done (here: every layer's update issued), failure: the core's.
        self._steps = StepTracker(self._layer_names, rank=-1, timeout_s=self._timeout_s,
                                  on_fail=self._wake_gates,
                                  suspect="a server or peer worker may be dead or stuck")
        self._started_in_step = 0
        self._issued_before = 0    # chunks started by the schedulers of earlier settings
        self._scheduler_step0 = 0  # steps called before the current scheduler started

        # Collective from here on: every worker builds its trainer at the same point.
        kv = mx.kv.create(kv_arg) if isinstance(kv_arg, str) else kv_arg
        self._rank = self._steps.rank = kv.rank
        # [Note: accumulation] gluon's idiom: grad_req='add', N backward passes, step(N * bs),
        # zero_grad(). step() returns before the gradients are sent and zero_grad() follows at
        # once, while legato's thread issues the updates: so with any grad_req='add' parameter
        # every gradient is staged (copied out by an engine operation issued in step(), which
        # the engine runs before the zeroing), and an accumulating gradient's reduced value
        # comes back into an array of legato's, which its update reads, never into the
        # gradient the user clears (after step(), it still holds the local sum). zero_grad()
        # clears every gradient, so 'write' parameters beside them are treated alike.
        self._adds = [k for k, p in enumerate(self._params) if p.grad_req == "add"]
        self._reduced = {k: mx.nd.zeros_like(self._grad_of(k))
                         for k in range(len(self._params))} if self._adds else {}
        self._raw_kv, self._wire, self._queue_impl = kv, wire, queue_impl
        self._stores: dict[str, ScheduledKVStore] = {}  # [Note: tuning over a kvstore]
        self._channel = None
        self._kv = self._store()
        try:
            # the timeline's gathering is collective too: its setting is part of the check, and
            # so are the tuner's settings (every worker switches at the same boundaries)
            self._kv.check_plan(
                hashlib.sha256(f"{self.plan.digest()} {timeline is not None} {compression} "
                               f"{self._tune!r}".encode()).hexdigest(),
                f"{self.plan.describe()}, timeline {'on' if timeline else 'off'}, "
                f"compression {compression}, tune {'on' if self._tune else 'off'}")
            self._trace_gather = self._kv.trace_gather() if timeline is not None else None
            if broadcast_parameters:
                self._kv.broadcast([self._weight_of(k) for k in range(len(self._params))])
            self._gates = BlockGates(model, direct, len(self._layer_names),
                                     timeout_s=self._timeout_s,
                                     check_error=self._raise_if_failed, rank=self._rank,
                                     layer_names=self._layer_names)
            self._trace = None
            if timeline is not None:
                self._trace = SchedulerTrace(timeline, self._rank, self.plan,
                                             self.plan.chunk_names(self._names))
                self._gates.record_waits(self._trace.gate_waited)
            self._start_scheduler()
        except BaseException:
            if getattr(self, "_gates", None) is not None:
                self._gates.remove()
            for store in self._stores.values():
                store.close()
            self._raw_kv = None
            raise
        self._ready = _weak_method(self._grad_ready)
        self._failed = _weak_method(self._fail)
        # [Note: loss scaling] updates of loss-scaled steps are issued from a thread of their
        # own, once the step's skip decision is known.
        self._scaled_updates: LayerUpdater | None = None
        self._skips: dict[int, bool] = {}
        self._close_at_exit()
        log.info("[rank %d] legato: %s; %s%s", self._rank, self.config.describe(),
                 self.plan.describe(), f" (from {', '.join(from_env)})" if from_env else "")

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _check_trainer(trainer: gluon.Trainer):
        """The kvstore (or its type name) the trainer was built with, checked."""
        if trainer._kv_initialized:
            kv_arg, on_kvstore = trainer._kvstore, trainer._update_on_kvstore
        else:
            kv_arg = trainer._kvstore_params["kvstore"]
            on_kvstore = trainer._kvstore_params["update_on_kvstore"]
        if on_kvstore:
            raise ConfigError("the gluon.Trainer was built with update_on_kvstore=True, so the "
                              "servers would run the optimizer; legato updates each layer on "
                              "the worker as soon as its gradients are back: build the Trainer "
                              "with update_on_kvstore=False")
        if trainer._compression_params:
            raise ConfigError("gradient compression (compression_params) is not supported with "
                              "legato's scheduling; build the Trainer without it")
        if len(trainer._updaters) != 1:
            raise ConfigError(f"the Trainer's parameters live on {len(trainer._updaters)} "
                              "contexts; legato schedules one context per worker process: run "
                              "one worker per device")
        check_kvstore(kv_arg)
        return kv_arg

    @staticmethod
    def _check_params(trainer: gluon.Trainer, model: gluon.Block):
        """The trainable parameters (trainer order) and each one's index in the trainer."""
        model_params = [p for p in model.collect_params().values() if p.grad_req != "null"]
        in_trainer = {id(p): i for i, p in enumerate(trainer._params)}
        missing = [p.name for p in model_params if id(p) not in in_trainer]
        if missing:
            raise ConfigError(f"the Trainer does not hold {len(missing)} of the model's trainable"
                              f" parameters ({_listing(missing)}); build it from "
                              "model.collect_params(), or set grad_req='null' on frozen ones")
        in_model = {id(p) for p in model_params}
        extra = [p.name for p in trainer._params if p.grad_req != "null"
                 and id(p) not in in_model]
        if extra:
            raise ConfigError(f"the Trainer holds {len(extra)} trainable parameter(s) that are not"
                              f" the model's ({_listing(extra)}); legato schedules one model's "
                              "gradients: pass the model those parameters belong to")
        params = [p for p in trainer._params if p.grad_req != "null"]
        if not params:
            raise ConfigError("the model has no trainable parameters")
        for p in params:
            if p._deferred_init or p._data is None:
                raise ConfigError(
                    f"parameter {p.name!r} is not initialized yet (shape {p.shape}); legato needs"
                    " every gradient's size up front: call model.initialize() and run one "
                    "forward pass (model(x)) before ScheduledTrainer, or give the layers their "
                    "input sizes (in_units=, in_channels=)")
            if p.grad_req not in ("write", "add"):
                raise ConfigError(f"parameter {p.name!r} has grad_req={p.grad_req!r}; use "
                                  "'write', or 'add' to accumulate over several backward passes")
            if p._stype != "default" or p._grad_stype != "default":
                raise ConfigError(f"parameter {p.name!r} is sparse; legato schedules dense "
                                  "gradients only")
            if len(p.list_ctx()) != 1:
                raise ConfigError(f"parameter {p.name!r} lives on {len(p.list_ctx())} contexts; "
                                  "legato schedules one context per worker process")
        return params, [in_trainer[id(p)] for p in params]

    @staticmethod
    def _layers_of(model: gluon.Block, params: list):
        """Each parameter's layer (blocks holding parameters, in registration order), the
        layers each block holds itself, and the layers' names."""
        wanted = {id(p) for p in params}
        layer_of: dict[int, int] = {}
        direct: dict[str, tuple[int, ...]] = {}
        names: list[str] = []
        for path, block in named_blocks(model):
            own = [p for p in block.params.values() if id(p) in wanted]
            if not own:
                continue
            new = [p for p in own if id(p) not in layer_of]
            if new:
                index = len(names)
                names.append(path or type(block).__name__)
                for p in new:
                    layer_of[id(p)] = index
            direct[path] = tuple(sorted({layer_of[id(p)] for p in own}))
        return layer_of, direct, names

    # -- the scheduler and its settings --------------------------------------------------------
    # [Note: tuning over a kvstore] A kvstore key's size is fixed on the servers when it is
    # initialized, so each plan the tuner tries needs keys of its own: a `ScheduledKVStore` per
    # distinct plan, built (collectively: every worker gets the same decision at the same
    # boundary) the first time the plan is tried and kept for when it comes back (the tuner
    # measures its best setting and `plain` again, alternately). MXNet's servers cannot free
    # keys, so each distinct setting tried keeps one copy of the gradients on the servers, and
    # its partition and merge buffers on each worker: at most the search space's 56 settings
    # (11 partition sizes x 5 windows, and plain); 20 trials try at most 20. The decision
    # itself travels in control rounds on the current store's control key (`broadcast_object`),
    # while no scheduler runs.
    def _set_plan(self) -> None:
        """The plan of the current settings, and the count that depends on it: per layer,
        its chunks started (the core's count, fed with starts, not completions)."""
        self.plan = plan_for(self.config, self._tasks)
        self._started = LayerProgress(self.plan, self._layer_of_key, len(self._layer_names))

    def _store(self) -> ScheduledKVStore:
        """The kvstore keys and buffers of the current plan (built on first use)."""
        digest = self.plan.digest()
        store = self._stores.get(digest)
        if store is None:
            store = ScheduledKVStore(self._raw_kv, self.plan, self._grad_of,
                                     timeout_s=self._timeout_s,
                                     on_started=_weak_method(self._chunk_started),
                                     staged=bool(self._adds), wire=self._wire)
            self._stores[digest] = store
        return store

    def _start_scheduler(self) -> None:
        """A scheduler for the current plan (at construction and after each tuning boundary).
        A window needs one order on every worker (see comm.py, [Note: one order with a
        window]): worker 0 leads, over an order channel of the scheduler's own."""
        chunk_names = self.plan.chunk_names(self._names)
        if self._trace is not None:
            self._trace.set_plan(self.plan, chunk_names)
        self._channel = self._kv.order_channel() if self._windowed else None
        self._scheduler_step0 = self._steps.steps_called
        self._scheduler = Scheduler(self.plan, self.config,
                                    SpannedBackend(self._kv, _profiled, chunk_names.__getitem__),
                                    order=self._channel,
                                    leader=self._channel is None or self._rank == 0,
                                    on_chunk_done=_ignore, rank=self._rank,
                                    timeout_s=self._timeout_s, queue_impl=self._queue_impl,
                                    on_event=self._trace.on_event if self._trace else None)

    def _boundary(self) -> None:
        """A tuning boundary (every worker, same step): finish everything, let worker 0 decide
        the next settings (legato.core.scheduler.tune), switch."""
        self.synchronize()
        self._issued_before += self._scheduler.issued_total
        config = self._tuning.switch(self._steps.steps_called, self._scheduler,
                                     timeout_s=self._timeout_s, leader=self._rank == 0,
                                     broadcast=self._kv.broadcast_object, rank=self._rank)
        if self._channel is not None:
            self._channel.close()
        if config is not None:
            self.config = config
            self._set_plan()
            self._kv = self._store()
        self._start_scheduler()

    @property
    def tuning(self) -> bool:
        """Whether tuning trials are running (the same on every worker at every step)."""
        return self._tuning is not None and self._tuning.tuning

    # -- arrays --------------------------------------------------------------------------------
    def _grad_of(self, key: int) -> mx.nd.NDArray:
        return self._params[key].list_grad()[0]

    def _weight_of(self, key: int) -> mx.nd.NDArray:
        return self._params[key].list_data()[0]

    @property
    def _passthrough(self) -> bool:
        return self.config.policy == "plain"

    @property
    def _windowed(self) -> bool:
        """Whether the policy holds chunks back (priority, bytescheduler): then the scheduler
        must learn when each gradient is ready, and worker 0 decides the order."""
        return self.config.credit_bytes is not None

    # -- readiness, completion, updates --------------------------------------------------------
    def _grad_ready(self, key: int) -> None:
        """Backward has written task `key`'s gradient (an engine priority thread, see
        comm.py [Note: threads]): tell the scheduler."""
        self._scheduler.tensor_ready(key)

    def _chunk_started(self, chunk) -> None:
        """A chunk's push and pull were issued (the scheduler's dispatching thread): issue the
        updates of the layers whose chunks are now all started, and open their gates. [Note:
        issue at start] The engine runs each update after its pulls (same arrays), and the
        next forward's reads of the weights after the update, so nothing in Python waits for
        the messages to come back: the engine goes from the pull to the update to the next
        forward as gluon's own Trainer lets it."""
        try:
            if self._passthrough:
                with self._cv:
                    self._started_in_step += 1
                    last = self._started_in_step == len(self.plan.chunks)
                    if last:
                        self._started_in_step = 0
                if last:
                    self._issue(0)
                return
            _, ready = self._started.chunk_done(chunk)
            for layer in ready:
                self._issue(layer)
        except BaseException as err:  # noqa: BLE001 (raised in the training thread)
            self._fail(err)

    def _issue(self, layer: int) -> None:
        """Issue `layer`'s update (under "plain": every layer's) now, or, when the step's loss
        is scaled, from the thread that waits for its skip decision ([Note: loss scaling])."""
        if self._steps.info(self._steps.steps_updated) is None:
            self._update_all() if self._passthrough else self._update_layer(layer)
        else:
            self._scaled_updates.put(layer)

    # [Note: loss scaling] MXNet's AMP (`amp.init_trainer(trainer)`, `amp.scale_loss(loss,
    # trainer)`) skips a step whose reduced gradients are not all finite and then lowers the
    # scale: gluon's Trainer checks after its all-reduce, before any update. Here each layer is
    # updated as soon as its gradients are back, so each worker checks its own gradients in
    # the engine when backward ends and one small kvstore message sums the answers (a
    # non-finite gradient on any worker makes the reduced ones non-finite, so this is gluon's
    # decision); the scaled step's updates are issued from a thread of their own once it is
    # known, and the loss scaler is told it as gluon would tell it (its own has_overflow, on
    # one array holding the answer), so its scale changes as without legato.
    def _skip(self, step: int) -> bool:
        if step not in self._skips:
            with _profiled("legato.overflow_flag"):
                finite = int(self._steps.info(step).asnumpy()[0])
            overflow = finite < self._kv.num_workers
            answer = _OneGradient(mx.nd.array([np.nan if overflow else 0.0], dtype=np.float32))
            self._skips = {step: self._trainer._amp_loss_scaler.has_overflow([answer])}
            if self._skips[step]:
                self._steps.skipped(step)
        return self._skips[step]

    def _scaled_update(self, layer: int, step: int) -> None:
        """The updater thread's part for a loss-scaled step (see [Note: loss scaling])."""
        if not self._skip(step):
            self._update_all() if self._passthrough else self._update_layer(layer)
            return
        if self._passthrough:
            self._steps.step_done()
        else:
            self._gates.release(layer)
            self._steps.layers_done([layer])

    def _apply(self, keys: list[int], what: str) -> None:
        """Copy `keys`' reduced gradients into place and run the updater on them (engine
        operations, ordered after the pulls)."""
        try:
            with _profiled(f"legato.update {what}"):
                self._apply_now(keys)
        except BaseException as err:
            raise LegatoError(f"[rank {self._rank}] step {self._steps.steps_updated}: updating "
                              f"{what} failed: {type(err).__name__}: {err}") from err

    def _apply_now(self, keys: list[int]) -> None:
        for key in keys:
            self._kv.copy_back(key, self._failed, self._reduced.get(key))
        self._updater([self._index[k] for k in keys],
                      [self._reduced[k] if k in self._reduced else self._grad_of(k)
                       for k in keys],
                      [self._weight_of(k) for k in keys])

    def _update_layer(self, layer: int) -> None:
        """Issue one layer's update and open its gate (see [Note: issue at start])."""
        if self._steps.error is not None:
            return
        self._apply(self._keys_of_layer[layer], f"layer {self._layer_names[layer]!r}")
        self._gates.release(layer)
        self._steps.layers_done([layer])

    def _update_all(self) -> None:
        """Pass-through: every layer at once, once every bucket has been started."""
        if self._steps.error is not None:
            return
        self._apply(list(range(len(self._params))), "all layers")
        self._steps.step_done()

    def _fail(self, err: BaseException) -> None:
        self._steps.fail(err)

    def _wake_gates(self) -> None:
        gates = getattr(self, "_gates", None)
        if gates is not None:
            gates.wake()

    def _raise_if_failed(self) -> None:
        self._steps.raise_if_failed(getattr(getattr(self, "_scheduler", None), "error", None))

    def _wait_issued(self, steps: int, what: str) -> None:
        """Wait until the updates of the first `steps` steps have all been issued."""
        self._steps.wait_updated(steps, what=what, check=self._raise_if_failed)

    # -- the Trainer interface -----------------------------------------------------------------
    def step(self, batch_size: int, ignore_stale_grad: bool = False) -> None:
        """Start this step's communication and updates; returns before they are done (except
        under policy="plain"). Gradients are normalized by 1/batch_size, as gluon does."""
        if ignore_stale_grad:
            raise ConfigError("ignore_stale_grad=True is not supported: every worker sends every"
                              " parameter's gradient every step; set grad_req='null' on "
                              "parameters a step does not use")
        if self._steps.closed:
            raise LegatoError("this ScheduledTrainer is closed")
        self._raise_if_failed()
        step = self._steps.steps_called
        stale = [self._names[k] for k in range(len(self._params))
                 if not self._weight_of(k)._fresh_grad]
        if stale:
            raise LegatoError(
                f"[rank {self._rank}] step {step}: {len(stale)} parameter(s) got no gradient "
                f"from backward since the last step ({_listing(stale)}); call loss.backward() "
                "once before each trainer.step(), and set grad_req='null' on parameters the "
                "loss does not use (every worker must send every trainable parameter)")
        self._wait_issued(step, f"step {step}")
        if not self._windowed:
            # [Note: no window, no waiting for gradients] Without a credit window every chunk
            # may start at once: hand them all to the engine now (it runs each push after
            # backward wrote its gradient), as gluon's Trainer does. The core must first hear
            # that the previous step's chunks are done (the engine has usually finished them:
            # this step's forward and backward were waiting for them).
            self._scheduler.wait_steps(step - self._scheduler_step0, self._timeout_s)
        # gluon's rescale; amp.scale_loss sets the trainer's _scale to undo its loss scale
        self._opt.rescale_grad = self._trainer._scale / batch_size
        for k in range(len(self._params)):
            self._weight_of(k)._fresh_grad = False
        if not self._passthrough:
            self._gates.finish_observing()
            self._gates.hold_all(step)  # before any update of this step can open a gate
        finite = None
        if getattr(self._trainer, "_amp_loss_scaler", None) is not None:
            if self._scaled_updates is None:
                self._scaled_updates = LayerUpdater(self._steps, self._scaled_update,
                                                    name=f"legato-mx-amp-r{self._rank}")
            finite = self._kv.finite_count([self._grad_of(k) for k in self._backward_order])
        self._steps.call_step(finite)
        if self._trace is not None:
            self._trace.step_called()
        for key in self._backward_order:  # backward order: last layer first
            self._kv.watch(key, self._ready if self._windowed else None, self._failed)
        if not self._windowed:
            for key in self._backward_order:
                self._scheduler.tensor_ready(key)
        if self._passthrough:
            # The update of all layers is issued once every bucket has been started.
            self._wait_issued(step + 1, f"step {step}")
        if self._tuning is not None and self._tuning.step_called(self._steps.steps_called):
            self._boundary()
            self._tuning.restarted()

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Wait until every transfer and update of the steps taken so far is done."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        self._steps.wait_updated(timeout_s=timeout, check=self._raise_if_failed)
        self._scheduler.wait_steps(self._steps.steps_called - self._scheduler_step0, timeout)
        self._raise_if_failed()
        for k in range(len(self._params)):
            self._weight_of(k).wait_to_read()

    @property
    def learning_rate(self) -> float:
        return self._opt.learning_rate

    # MXNet's AMP reads and sets these on the trainer it is given (amp.scale_loss(loss,
    # trainer)): they are the wrapped Trainer's (call amp.init_trainer on the gluon.Trainer).
    @property
    def _amp_loss_scaler(self):
        return getattr(self._trainer, "_amp_loss_scaler", None)

    @property
    def _amp_original_scale(self):
        return self._trainer._amp_original_scale

    @property
    def _scale(self) -> float:
        return self._trainer._scale

    @_scale.setter
    def _scale(self, value: float) -> None:
        self._trainer._scale = value

    def set_learning_rate(self, lr: float) -> None:
        """Set the learning rate for the next steps (the steps taken keep theirs)."""
        self._wait_issued(self._steps.steps_called, "set_learning_rate")
        self._opt.set_learning_rate(lr)

    @property
    def optimizer(self) -> mx.optimizer.Optimizer:
        return self._opt

    @property
    def trainer(self) -> gluon.Trainer:
        """The wrapped gluon.Trainer (do not step it: its kvstore keys are not initialized)."""
        return self._trainer

    @property
    def kvstore(self) -> ScheduledKVStore:
        return self._kv

    @property
    def scheduler(self) -> Scheduler:
        """The core scheduler (for inspection: `issued` is the order chunks were started in)."""
        return self._scheduler

    @property
    def gates(self) -> BlockGates:
        return self._gates

    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    def layer_of(self, param) -> int:
        """The layer index (priority; 0 goes first) of a parameter."""
        return self._layer_of_key[next(k for k, p in enumerate(self._params) if p is param)]

    def save_states(self, fname: str) -> None:
        """Save the optimizer's states (as gluon.Trainer.save_states), after synchronizing."""
        self.synchronize()
        with open(fname, "wb") as f:
            f.write(self._updater.get_states(dump_optimizer=True))

    def load_states(self, fname: str) -> None:
        """Load the optimizer's states (as gluon.Trainer.load_states), after synchronizing."""
        self.synchronize()
        with open(fname, "rb") as f:
            self._updater.set_states(f.read())
        self._opt = self._trainer._optimizer = self._updater.optimizer
        self._opt.param_dict = {i: p for i, p in enumerate(self._trainer._params)}

    def close(self, timeout_s: float | None = None) -> None:
        """Finish outstanding work, stop legato's threads and remove its hooks (the kvstore
        stays open)."""
        if self._steps.closed:
            return

        timeout = self._timeout_s if timeout_s is None else timeout_s

        def release() -> None:
            if self._scaled_updates is not None:
                self._scaled_updates.stop(self._timeout_s)
            if self._channel is not None:
                self._channel.close()
            self._gates.release_all()
            self._gates.remove()

        def drop(_healthy: bool) -> None:
            if self._trace_gather is not None:
                self._trace_gather.close()
            for store in self._stores.values():
                store.close()
            self._raw_kv = None  # the kvstore must be freed before exit (see comm.py close)
            self._forget_exit()

        gather = self._trace_gather
        close_scheduled(self._steps, self._scheduler, timeout_s=timeout, rank=self._rank,
                        wait=lambda t: self.synchronize(t), steps=[release], trace=self._trace,
                        all_gather=gather and (lambda events: gather.all_gather(
                            events, min(timeout, 60.0))),
                        lead=self._rank == 0, release=drop)

    def __repr__(self) -> str:
        return f"ScheduledTrainer({self.config.describe()}, {self.plan.describe()})"

    @property
    def stats(self) -> dict[str, Any]:
        return {**self._steps.stats(self.plan, self.config,
                                    self._issued_before + self._scheduler.issued_total),
                "tuner": None if self._tuning is None or self._rank != 0
                else self._tuning.summary(), "defaults": self.defaults_mode}
