"""ScheduledOptimizer for TensorFlow: priority-scheduled gradient all-reduce for a Keras
optimizer, in a custom GradientTape loop or in `model.fit`.

    opt = ScheduledOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), model)  # gloo, torchrun
    for x, y in data:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))  # returns at once
    opt.close()

Each gradient goes to legato's scheduler (the same core as the PyTorch adapter's) as soon as
backward produces it ([Note: gradients during backward]); gradients are all-reduced front layers
first, cut into partitions and merged as the policy says, within a credit window, and each
layer is updated by the wrapped optimizer as soon as its own gradients are in and
`apply_gradients` was called, which returns at once. The next forward pass starts at once too:
a layer's `call` waits only for that layer's update (the dependency proxies), so front layers
compute while back layers' gradients are still on the wire.

Updates ([Note: per-layer apply]): a Keras optimizer's `apply(grads, variables)` accepts a
subset of the variables it was built for, with each variable's slots (momentum, Adam moments)
found by the variable; it increments `iterations` once per call. legato sets `iterations` to
the step's value before each layer's call, so learning-rate schedules and Adam's bias
correction see one increment per step, as without legato. Options that need every gradient at
once (`global_clipnorm`, `use_ema`) are refused.

Mixed precision ([Note: loss scaling]) and gradient accumulation ([Note: accumulation]) work as
Keras does them without legato: wrap a `LossScaleOptimizer`, or give the wrapped optimizer
`gradient_accumulation_steps=N` (or pass backward_passes_per_step=N).

`apply_gradients` runs eagerly (the scheduler and the updates are Python); the forward and
backward may run in a `tf.function` that returns the gradients, with the gates and backward
hooks compiled into it ([Note: compiled steps]). `model.fit` needs `run_eagerly=True`, since
Keras compiles `apply_gradients` into its train step.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

import numpy as np
import tensorflow as tf

from legato.adapters.tensorflow.comm import GlooTransport, HorovodTFTransport
from legato.adapters.tensorflow.proxy import LayerGates, owned_layers
from legato.core.errors import ConfigError, LegatoError
from legato.core.scheduler import env as scheduler_env
from legato.core.scheduler.core import Scheduler
from legato.core.scheduler.layers import LayerProgress
from legato.core.scheduler.plan import CommTask
from legato.core.scheduler.policy import plan_for
from legato.core.scheduler.tune import TuningSession, wrapper_settings
from legato.core.scheduler.steps import (ClosesOnExit, LayerUpdater, StepTracker,
                                         close_scheduled)
from legato.core.timeline import SchedulerTrace, SpannedBackend, check_trace_path

__all__ = ["ScheduledOptimizer"]

log = logging.getLogger(__name__)


def _profiled(name: str):
    """A span of TensorFlow's profiler (TraceMe, on whichever thread opens it: legato's threads
    send messages and update layers), as `tf.profiler.experimental.start(logdir)` records them
    for TensorBoard's trace viewer; under a microsecond when no profiler runs."""
    return tf.profiler.experimental.Trace(name)


def _keras():
    import keras

    return keras


class ScheduledOptimizer(ClosesOnExit):
    """Wraps a Keras optimizer so that `model`'s gradients are all-reduced in priority order.

    Args:
        optimizer: a Keras 3 optimizer (SGD, Adam, AdamW, RMSprop, ...), built or not; it must
            be given, or will be built with, exactly `model.trainable_variables`.
        model: the Keras model (Sequential, functional or subclassed).
        policy: "bytescheduler" (priority + partitions + credit window), "priority" (layer
            order, whole tensors, one message in flight), "fifo" (backward's order, all at
            once) or "plain" (DDP-style buckets, then one optimizer step; no gates).
        partition_bytes, credit_bytes, merge_bytes: as for the PyTorch ScheduledOptimizer.
        backend: "gloo" (legato's transport over torch.distributed, the default: launch with
            torchrun or legato.launch) or "horovod" (horovod.tensorflow, under horovodrun,
            after hvd.init()).
        overlap_backward: send each gradient as backward produces it (see [Note: gradients
            during backward]); the gradients passed to apply_gradients must then be the tape's,
            unchanged. False: send them when apply_gradients is called.
        timeout_s: how long any wait may last before failing with an error naming the rank,
            step and layer.
        broadcast_parameters: copy rank 0's variables to every rank at start.
        backward_passes_per_step: gradient accumulation (Horovod's name), done as Keras does it
            for `gradient_accumulation_steps=N`, which it sets on the wrapped optimizer: N
            apply_gradients calls per update, the update with the average of their gradients,
            `iterations` counting updates. Gradients are summed locally and all-reduced once,
            during the last pass's backward. The optimizer's own gradient_accumulation_steps
            is taken the same way.
        compression: "fp16" or "bf16": float gradients travel in that type (cast, reduced,
            cast back), as with Horovod's `Compression.fp16`.
        tune: tune partition_bytes and credit_bytes online, as the PyTorch ScheduledOptimizer
            does (the core's `TuningSession`: Bayesian optimization over step times, with
            the pass-through to "plain" when scheduling does not pay); True, a dict of
            `TuneSettings` fields, or a TuneSettings. Needs policy="bytescheduler" and optuna.
        timeline: write a Chrome trace (Perfetto) of every rank to this path at `close()`:
            per-message queueing and transfer, per-layer forward (eager) and update. Each rank
            also writes its spans as they come to `<timeline>.rank<N>.partial.json`, kept
            when the job ends badly (it opens as it is).
        compiled_updates: run each layer's update as a tf.function of its own (traced once
            per layer; default) instead of eager Keras calls ([Note: compiled updates]).
        defaults: "auto" (the default), "fixed" or "fixed-or-plain". With "fixed-or-plain"
            (what "auto" is when no policy other than bytescheduler, no size and no tuner is
            given; else "fixed") the first steps measure the fixed sizes against plain (the
            pass-through), alternately, and every rank keeps the faster ([Note: measured
            defaults] in legato.core.scheduler.tune: 40 steps, 80 at most; `opt.tuning` is
            True meanwhile and `opt.stats["tuner"]` gives the measurements).

    policy, the sizes, timeout_s, backward_passes_per_step, compression, tune, timeline and
    defaults can come from LEGATO_POLICY, LEGATO_PARTITION_BYTES, LEGATO_CREDIT_BYTES,
    LEGATO_MERGE_BYTES, LEGATO_TIMEOUT_S, LEGATO_BACKWARD_PASSES_PER_STEP, LEGATO_COMPRESSION,
    LEGATO_TUNE, LEGATO_TIMELINE and LEGATO_DEFAULTS instead (an argument wins).
    """

    def __init__(self, optimizer, model, *, policy: str | None = None,
                 partition_bytes: int | None = None, credit_bytes: int | None = None,
                 merge_bytes: int | None = None, backend: str = "gloo",
                 overlap_backward: bool = True, timeout_s: float | None = None,
                 broadcast_parameters: bool = True,
                 backward_passes_per_step: int | None = None,
                 compression: str | None = None, timeline: str | None = None,
                 tune=None, compiled_updates: bool = True,
                 defaults: str | None = None) -> None:
        keras = _keras()
        settings, from_env = scheduler_env.adapter_settings(
            "TensorFlow", policy=policy, partition_bytes=partition_bytes,
            credit_bytes=credit_bytes, merge_bytes=merge_bytes, timeout_s=timeout_s,
            backward_passes_per_step=backward_passes_per_step,
            compression=_compression_name(compression), timeline=timeline, tune=tune,
            defaults=defaults)
        timeline = settings["timeline"]
        if timeline is not None:  # before any collective call
            check_trace_path(timeline)
        timeout_s = settings["timeout_s"]
        self._compression = None if settings["compression"] == "none" else \
            settings["compression"]
        if isinstance(optimizer, ScheduledOptimizer):
            raise ConfigError("optimizer is already a ScheduledOptimizer; wrap it once")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ConfigError(f"optimizer must be a keras.optimizers.Optimizer, got "
                              f"{type(optimizer).__name__}")
        self._lso = None
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            self._lso, optimizer = optimizer, optimizer.inner_optimizer
        refused = {"global_clipnorm": optimizer.global_clipnorm is not None,
                   "use_ema": bool(optimizer.use_ema)}
        why = {"global_clipnorm": "clips by the norm of all gradients",
               "use_ema": "averages every variable at each apply"}
        for attr, bad in refused.items():
            if bad:
                raise ConfigError(f"{type(optimizer).__name__}({attr}=...) {why[attr]}, which a "
                                  "per-layer update cannot do; use clipnorm or clipvalue (per "
                                  f"variable), or leave {attr} unset")
        self._bpps = self._accumulation(optimizer, settings["backward_passes_per_step"],
                                        backward_passes_per_step is not None)
        if not isinstance(model, keras.Model):
            raise ConfigError(f"model must be a keras.Model, got {type(model).__name__}")
        if backend not in ("gloo", "horovod"):
            raise ConfigError(f"backend={backend!r} is unknown; known: 'gloo' (torch.distributed"
                              " gloo, with torchrun) and 'horovod' (under horovodrun)")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s={timeout_s!r} is invalid; pass a positive number")
        if not tf.executing_eagerly():
            raise ConfigError("build ScheduledOptimizer eagerly, not inside a tf.function")
        self._opt = optimizer
        self._model = model
        self._timeout_s = float(timeout_s)
        # A learning rate given as a Python callable would be read once, at tracing, by a
        # compiled update (as in Keras' own compiled train step): such optimizers update
        # eagerly ([Note: compiled updates]).
        lr = getattr(optimizer, "_learning_rate", None)
        self._compiled_updates = bool(compiled_updates) and not (
            callable(lr) and not isinstance(lr, keras.optimizers.schedules.LearningRateSchedule))
        self._update_fns: dict[tuple[int, ...], Any] = {}  # [Note: compiled updates]
        self._vars = list(model.trainable_variables)
        if not self._vars:
            raise ConfigError("the model has no trainable variables; build it (call it once or "
                              "give it an Input) before wrapping its optimizer")
        built = self._lso if self._lso is not None else optimizer
        if built.built:
            known = {id(v) for v in built._trainable_variables}
            missing = [v.path for v in self._vars if id(v) not in known]
            if missing or len(known) != len(self._vars):
                raise ConfigError(f"the optimizer was built for other variables (missing: "
                                  f"{missing[:5]}); wrap a fresh optimizer, or one built for "
                                  "model.trainable_variables")
        else:
            built.build(self._vars)
        if self._bpps > 1:
            # Keras' accumulators stay zero: legato accumulates before the all-reduce and
            # applies on the last pass only ([Note: accumulation]); resetting them after each
            # layer's apply would rewrite every accumulator once per layer.
            object.__setattr__(optimizer, "_backend_reset_gradient_accumulators",
                               lambda: None)
        self.config, self._tune, self.defaults_mode = wrapper_settings(settings, "TensorFlow")
        owned = owned_layers(model)
        self._layers = [layer for layer, _ in owned]
        self._layer_names = [layer.name for layer, _ in owned]
        layer_of = {id(v): i for i, (_, vs) in enumerate(owned) for v in vs}
        self._layer_of_key = [layer_of[id(v)] for v in self._vars]
        self._names = [v.path for v in self._vars]
        self._shapes = [tuple(int(d) for d in v.shape) for v in self._vars]
        self._dtypes = [tf.as_dtype(v.dtype) for v in self._vars]
        self._tasks = [CommTask(key, self._names[key], self._layer_of_key[key],
                                max(1, _numel(s)) * d.size, d.size, d.name)
                       for key, (s, d) in enumerate(zip(self._shapes, self._dtypes))]
        self._tuning: TuningSession | None = None
        self._issued_before = 0  # messages issued by schedulers of earlier plans
        if self._tune is not None:  # checked locally before any collective call
            self._tuning = TuningSession(self._tune, self.config,
                                         max(t.nbytes for t in self._tasks))
            self.config = self._tuning.config
        self._set_plan()

        self._transport = (HorovodTFTransport(self._timeout_s) if backend == "horovod"
                           else GlooTransport(self._timeout_s))
        self._rank = self._transport.rank
        digests = self._transport.all_gather_object((self.plan.digest(), len(self._vars),
                                                     self._tune))
        if any(d != digests[0] for d in digests):
            raise ConfigError(f"[rank {self._rank}] ranks built different communication plans "
                              f"({digests}); every rank must wrap the same model with the same "
                              "settings")
        if broadcast_parameters:
            self._transport.broadcast_variables(self._model.variables)
        self._grads: list[tf.Tensor | None] = [None] * len(self._vars)
        # the raw iteration count the next applied step runs at (Keras' `_iterations`: with
        # accumulation it counts passes; a skipped loss-scaled step does not count)
        self._next_iteration = int(optimizer._iterations.numpy())
        self._pass = 0                   # backward passes of the current step handed over
        self._acc: list[tf.Tensor | None] = [None] * len(self._vars)
        # Steps called and done, failure (the core's, shared with the other adapters).
        self._steps = StepTracker(self._layer_names, rank=self._rank,
                                  timeout_s=self._timeout_s, on_fail=self._release_gates)
        self._plain_pending: dict[int, tf.Tensor] = {}  # pass-through: the step's layers so far
        self._plain_received = 0
        self._post_lock = threading.Lock()
        self._reads = [0] * len(self._vars)  # this step: reads through the hook, per key
        self._arrived = [0] * len(self._vars)
        self._partial: list[tf.Tensor | None] = [None] * len(self._vars)
        self._posted: list[tf.Tensor | None] = [None] * len(self._vars)
        self._from_graph = [False] * len(self._vars)
        self._posting = False
        self._posted_in_backward = 0
        self._trace = None
        if timeline is not None:
            self._trace = SchedulerTrace(timeline, self._rank, self.plan,
                                         self.plan.chunk_names(self._names))
        self._epoch = 0
        self._start_scheduler()
        self._gates = None
        if not self._passthrough or self._tuning is not None:  # the tuner may leave "plain"
            self._gates = LayerGates(model, self._layers, self._timeout_s,
                                      self._raise_if_failed, self._rank,
                                      around=self._hooked_call if overlap_backward else None,
                                      trace=self._trace)
        self._updater = LayerUpdater(self._steps, self._update_layer,
                                     name=f"legato-tf-update-r{self._rank}")
        self._close_at_exit()
        log.info("[rank %d] legato (tensorflow, %s): %s; %s%s", self._rank,
                 self._transport.name, self.config.describe(), self.plan.describe(),
                 f" (from {', '.join(from_env)})" if from_env else "")

    @property
    def _passthrough(self) -> bool:
        return self.config.policy == "plain"

    # -- the scheduler and its settings --------------------------------------------------------
    def _set_plan(self) -> None:
        """The plan of the current settings, and what depends on it."""
        self.plan = plan_for(self.config, self._tasks)
        self._progress = LayerProgress(self.plan, self._layer_of_key, len(self._layer_names))
        self._keys_of_layer = self._progress.keys_of_layer
        # Post order: front layers first (see legato.adapters.tensorflow.comm [Note: Horovod
        # from threads]); under "fifo" and "plain", backward's order (back layers first).
        order = sorted(range(len(self._vars)), key=lambda k: (self._layer_of_key[k], k))
        self._post_order = order if self.config.order == "layer" else order[::-1]

    def _start_scheduler(self) -> None:
        """A scheduler for the current plan (at construction and after each tuning boundary;
        each has its own epoch: Horovod's message names differ between them)."""
        self._epoch += 1
        chunk_names = self.plan.chunk_names(self._names)
        if self._trace is not None:
            self._trace.set_plan(self.plan, chunk_names)
        self._scheduler = Scheduler(
            self.plan, self.config,
            SpannedBackend(self._transport.backend(self._grads, self._shapes, self._dtypes,
                                                   self._epoch, compression=self._compression),
                           _profiled, chunk_names.__getitem__),
            order=self._transport.order_channel(), leader=self._transport.group_rank == 0,
            on_chunk_done=self._chunk_done, rank=self._rank, timeout_s=self._timeout_s,
            on_event=self._trace.on_event if self._trace is not None else None)

    def _boundary(self) -> None:
        """A tuning boundary (every rank, same step): finish everything, let rank 0 decide the
        next settings (legato.core.scheduler.tune), switch."""
        self.synchronize()
        self._issued_before += self._scheduler.issued_total
        config = self._tuning.switch(self._steps.steps_called, self._scheduler,
                                     timeout_s=self._timeout_s,
                                     leader=self._transport.group_rank == 0,
                                     broadcast=self._transport.broadcast_object, rank=self._rank)
        if config is not None:
            self.config = config
            self._set_plan()
        if self._gates is not None:
            # [Note: hooks off under plain] plain posts every gradient in apply_gradients and
            # finishes the step's update before it returns, as without gates: the gates and
            # posts are skipped, eager and in a compiled step (crossing into Python for each
            # layer and gradient cost the cnn benchmark 15 ms a step)
            self._gates.on = not self._passthrough
            self._gates.graph_on.assign(self._gates.on)
        self._start_scheduler()

    @property
    def tuning(self) -> bool:
        """Whether tuning trials are running (the same on every rank at every step)."""
        return self._tuning is not None and self._tuning.tuning

    def _accumulation(self, optimizer, passes: int, given: bool) -> int:
        """Backward passes per update: the optimizer's gradient_accumulation_steps, or
        `passes` set on it (see [Note: accumulation])."""
        own = optimizer.gradient_accumulation_steps or 1
        if passes > 1 and own == 1:
            if optimizer.built:
                raise ConfigError(
                    f"backward_passes_per_step={passes} on an optimizer built without "
                    "gradient accumulation; pass a fresh optimizer, or build it with "
                    f"gradient_accumulation_steps={passes}")
            optimizer.gradient_accumulation_steps = passes
            own = passes
        elif passes != own and (given or passes > 1):
            raise ConfigError(
                f"backward_passes_per_step={passes} but the wrapped optimizer has "
                f"gradient_accumulation_steps={own}; give one of them")
        if own > 1 and self._lso is not None:
            raise ConfigError(
                "gradient accumulation under a LossScaleOptimizer is not supported: its "
                "overflow check and scale change per backward pass; use one or the other")
        return own

    # -- the optimizer interface ---------------------------------------------------------------
    def apply_gradients(self, grads_and_vars: Iterable) -> None:
        """Hand this step's gradients to the scheduler; returns before the updates are done."""
        pairs = list(grads_and_vars)
        return self.apply([g for g, _ in pairs], [v for _, v in pairs])

    def apply(self, grads, trainable_variables=None) -> None:
        """Keras' `apply(grads, variables)`: the same as `apply_gradients`."""
        if self._steps.closed:
            raise LegatoError("this ScheduledOptimizer is closed")
        if not tf.executing_eagerly():
            raise ConfigError("ScheduledOptimizer.apply_gradients runs eagerly: call it outside "
                              "tf.function (compute the gradients in a tf.function if you like "
                              "and return them), or model.compile(..., run_eagerly=True)")
        self._raise_if_failed()
        grads = list(grads)
        variables = self._vars if trainable_variables is None else list(trainable_variables)
        if len(grads) != len(variables):
            raise ConfigError(f"got {len(grads)} gradients for {len(variables)} variables")
        index = {id(v): k for k, v in enumerate(self._vars)}
        by_key: list[tf.Tensor | None] = [None] * len(self._vars)
        for g, v in zip(grads, variables):
            key = index.get(id(v))
            if key is None:
                raise ConfigError(f"variable {getattr(v, 'path', v)!r} is not a trainable "
                                  "variable of the wrapped model; legato schedules one model's "
                                  "gradients")
            by_key[key] = g
        missing = [self._names[k] for k, g in enumerate(by_key) if g is None]
        if missing:
            raise LegatoError(
                f"[rank {self._rank}] step {self._steps.steps_called}: {len(missing)} "
                "variable(s) got "
                f"no gradient ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                "every rank must all-reduce every trainable variable: pass every gradient of "
                "model.trainable_variables, and freeze (trainable=False) unused layers")
        given = list(by_key)
        for key, g in enumerate(by_key):
            by_key[key] = self._checked(key, g)
        with self._post_lock:
            posted = list(self._posted)
        for key, g in enumerate(by_key):
            sent = posted[key]
            if self._from_graph[key]:  # the graph's output is a copy: see [Note: compiled steps]
                continue
            # The tape returns the posted tensor itself, unless it summed two reads' parts or
            # the gradient is IndexedSlices (legato posted a dense conversion): compare values.
            summed = self._reads[key] > 1 or isinstance(given[key], tf.IndexedSlices)
            if sent is not None and sent is not g and not (
                    summed and np.array_equal(sent.numpy(), g.numpy())):
                err = ConfigError(
                    f"[rank {self._rank}] step {self._steps.steps_called}: the gradient passed "
                    "for "
                    f"{self._names[key]} is not the one backward produced, which legato had "
                    "already sent; pass tape.gradient's results unchanged, or build the "
                    "ScheduledOptimizer with overlap_backward=False to send what "
                    "apply_gradients gets")
                self._steps.fail(err)
                raise err
        for key in self._post_order:  # what backward did not hand over (overlap off, traced)
            if posted[key] is None:
                self._post(key, by_key[key])
        last_pass = self._last_pass
        with self._post_lock:
            self._reads = [0] * len(self._vars)
            self._arrived = [0] * len(self._vars)
            self._partial = [None] * len(self._vars)
            self._posted = [None] * len(self._vars)
            self._from_graph = [False] * len(self._vars)
            self._posting = False
            self._pass = 0 if last_pass else self._pass + 1
        if not last_pass:  # [Note: accumulation]: summed locally, nothing sent, no update
            self._next_iteration += 1
            return None
        info = self._step_info(by_key)
        if self._gates is not None:
            self._gates.hold_all(self._steps.steps_called)
        self._steps.call_step(info)
        if self._trace is not None:
            self._trace.step_called()
        if self._passthrough or (self._gates is not None and self._gates.traced):
            self.synchronize()
        if self._tuning is not None and self._tuning.step_called(self._steps.steps_called):
            self._boundary()
            self._tuning.restarted()
        return None

    # [Note: loss scaling] A LossScaleOptimizer applies a step only when every gradient is
    # finite, and halves its scale otherwise; with plain Horovod it sees the all-reduced
    # gradients, so every rank decides alike. Here layers are updated as their gradients come
    # back, before the others are in, so the decision is taken when apply_gradients is called:
    # each rank checks its own gradients and one small all-reduce tells every rank whether any
    # was not finite (a non-finite value on any rank makes the reduced gradients non-finite,
    # so this is the reference's decision). The scale and its growth counter change as the
    # LossScaleOptimizer changes them; each layer's reduced gradients are divided by the
    # step's scale before the inner optimizer's apply, and a skipped step updates nothing and
    # does not count in `iterations`.
    # [Note: accumulation] Keras' gradient_accumulation_steps=N: the optimizer is applied on
    # every pass, updates on every Nth with the average of the N passes' gradients, and its
    # raw `_iterations` counts passes (`iterations` is that divided by N). legato sums each
    # gradient locally over the first N-1 passes (nothing goes on the wire), all-reduces the
    # sum during the last pass's backward, and applies each layer at the last pass's
    # iteration, where Keras divides by N. The reduced value is the same as averaging every
    # pass's reduced gradients, up to rounding.
    @property
    def _last_pass(self) -> bool:
        return self._pass == self._bpps - 1

    def _step_info(self, grads) -> tuple[int, tf.Tensor | None, bool]:
        """This step's (iteration to apply at, loss scale to divide by or None, skip): see
        [Note: loss scaling]."""
        iteration = self._next_iteration
        if self._lso is None:
            self._next_iteration += 1
            return iteration, None, False
        local = not _all_finite(grads)
        with _profiled("legato.overflow_flag"):
            skip = self._transport.any_flag(local)
        lso = self._lso
        scale = tf.identity(lso.dynamic_scale)
        if skip:  # LossScaleOptimizer's own rule: halve the scale, count from zero
            lso.step_counter.assign(0)
            lso.dynamic_scale.assign(lso.dynamic_scale * 0.5)
            self._steps.skipped(self._steps.steps_called)   # and the loss scale halved
            return iteration, scale, True
        self._next_iteration += 1
        if int(lso.step_counter.numpy()) == lso.dynamic_growth_steps - 1:
            lso.step_counter.assign(0)
            lso.dynamic_scale.assign(lso.dynamic_scale * 2.0)
        else:
            lso.step_counter.assign_add(1)
        return iteration, scale, False

    def _checked(self, key: int, g) -> tf.Tensor:
        if isinstance(g, tf.IndexedSlices):
            g = tf.convert_to_tensor(g)
        if tuple(g.shape) != self._shapes[key] or g.dtype != self._dtypes[key]:
            raise ConfigError(f"the gradient of {self._names[key]} is {g.dtype.name}"
                              f"{list(g.shape)}, its variable "
                              f"{self._dtypes[key].name}{list(self._shapes[key])}")
        return g

    def _post(self, key: int, g: tf.Tensor, graph: bool = False) -> None:
        """Hand task `key`'s gradient of this step to the scheduler (once per step)."""
        with self._post_lock:
            if self._posted[key] is not None:
                raise LegatoError(
                    f"[rank {self._rank}] {self._names[key]} received a second gradient before "
                    "apply_gradients; legato sends each gradient as backward produces it, so "
                    "compute one gradient of the model's variables per step, or build the "
                    "ScheduledOptimizer with overlap_backward=False")
            first = not self._posting
            self._posting = True
            self._posted[key] = g
            self._from_graph[key] = graph
            if self._bpps > 1:
                total = g if self._acc[key] is None else self._acc[key] + g
                if not self._last_pass:
                    self._acc[key] = total
                    return
                self._acc[key] = None
                g = total
        if first:
            # The previous step's updates read legato's buffers, which this step overwrites;
            # the gates have normally waited for them already, so this costs nothing.
            self.synchronize()
        self._grads[key] = g
        self._transport.load(key, g)
        self._scheduler.tensor_ready(key)

    # -- [Note: gradients during backward] -----------------------------------------------------
    # `tape.gradient` returns every gradient at the end of backward, but it computes them layer
    # by layer, back to front. So while a layer's `call` runs under a recording tape, each of
    # its variables is read through an identity with a custom gradient (a Keras StatelessScope
    # maps the variable to that identity), whose gradient function receives the variable's
    # gradient as soon as backward reaches it and posts it to the scheduler: communication
    # overlaps the rest of backward, as DDP's hooks do in PyTorch. The tape still returns the
    # same tensors. A variable read twice (a shared layer) is posted once both parts are in.
    # Assignments made inside the scope (BatchNormalization's moving statistics) are applied
    # to the variables when the call returns.
    # [Note: compiled steps] When the forward and backward run in a tf.function, the wrappers
    # above run once, while it is traced, so they put ops in the graph instead: each gated
    # layer reads its variables after a `tf.py_function` that waits for the layer's gate (and
    # counts the reads, when traced under a tape), and each variable's gradient passes a
    # `tf.py_function` that posts it to the scheduler as the graph's backward produces it. The
    # graph returns copies of the posted gradients, so apply_gradients cannot check that it
    # was given the same ones: pass them unchanged.
    def _hooked_call(self, layer: int, call, args, kwargs, graph: bool):
        """A gated layer's call (after its gate, in eager mode): see [Note: gradients during
        backward] and, in a tf.function, [Note: compiled steps]."""
        keys = self._keys_of_layer[layer]
        hook = _recording() and self._steps.error is None
        gate = None
        if graph:
            count = (lambda: self._count_reads(keys)) if hook else None
            gate = self._gates.graph_gate((layer,), self._layer_names[layer], before=count)
        elif not hook:
            return call(*args, **kwargs)
        else:
            self._count_reads(keys)
        mapping = [(self._vars[k], self._read(k, gate, hook)) for k in keys]
        keras = _keras()
        with keras.StatelessScope(state_mapping=mapping) as scope:
            out = call(*args, **kwargs)
        hooked = {id(self._vars[k]) for k in keys}
        for v in self._layers[layer].variables:
            if id(v) not in hooked:
                new = scope.get_current_value(v)
                if new is not None:
                    v.assign(new)
        return out

    def _count_reads(self, keys) -> None:
        with self._post_lock:
            for key in keys:
                self._reads[key] += 1

    def _read(self, key: int, gate: tf.Tensor | None, hook: bool) -> tf.Tensor:
        """The value of variable `key` for a layer's call: read after `gate` (in a graph), and
        through an identity whose gradient posts the variable's gradient (when `hook`)."""
        # the raw tf.Variable (Keras 3 keeps it as `_value`): a mixed-precision autocast is
        # applied by Keras to what the scope returns, so the gradient here has the variable's
        # own dtype
        raw = self._vars[key]._value
        if gate is None:
            value = tf.convert_to_tensor(raw)
        else:
            with tf.control_dependencies([gate]):
                value = tf.identity(raw)
        if not hook:
            return value

        @tf.custom_gradient
        def identity(value):
            def grad(g):
                if tf.executing_eagerly():
                    self._grad_arrived(key, g)
                    return g

                def post(t):
                    self._grad_arrived(key, t, graph=True)
                    return np.int32(0)
                posted = tf.cond(  # [Note: hooks off under plain]
                    self._gates.graph_on,
                    lambda: tf.py_function(post, [g], tf.int32, name="legato_post"),
                    lambda: tf.constant(0, tf.int32))
                with tf.control_dependencies([posted]):
                    return tf.identity(g)
            return tf.identity(value), grad

        return identity(value)

    def _grad_arrived(self, key: int, g, graph: bool = False) -> None:
        try:
            g = self._checked(key, g)
            with self._post_lock:
                acc = self._partial[key]
                self._partial[key] = g if acc is None else acc + g
                self._arrived[key] += 1
                if self._arrived[key] < self._reads[key]:
                    return
                g = self._partial[key]
            self._post(key, g, graph)
            self._posted_in_backward += 1
        except LegatoError as err:
            self._steps.fail(err)
            raise


    def synchronize(self, timeout_s: float | None = None) -> None:
        """Wait until every transfer and update of the steps taken so far is done."""
        self._steps.wait_updated(timeout_s=timeout_s, check=self._raise_if_failed)
        if self._bpps > 1:  # passes since the last update count too, as in Keras
            self._opt._iterations.assign(self._next_iteration)

    # Keras' model.fit calls these on its optimizer.
    def scale_loss(self, loss):
        """The loss times the LossScaleOptimizer's scale (the loss itself without one)."""
        return loss if self._lso is None else self._lso.scale_loss(loss)

    @property
    def built(self) -> bool:
        return True

    def build(self, variables) -> None:  # noqa: ARG002 (built for the model at construction)
        return None

    def finalize_variable_values(self, variables) -> None:
        self.synchronize()
        self._opt.finalize_variable_values(variables)

    @property
    def optimizer(self):
        """The wrapped Keras optimizer (the LossScaleOptimizer, when one was wrapped)."""
        return self._opt if self._lso is None else self._lso

    @property
    def iterations(self):
        return self._opt.iterations

    @property
    def learning_rate(self):
        return self._opt.learning_rate

    @property
    def variables(self):
        self.synchronize()
        return self.optimizer.variables

    @property
    def stats(self) -> dict[str, Any]:
        return {**self._steps.stats(self.plan, self.config,
                                    self._issued_before + self._scheduler.issued_total),
                "tuner": None if self._tuning is None or self._transport.group_rank != 0
                else self._tuning.summary(),
                "backend": self._transport.name, "compiled_updates": self._compiled_updates,
                "defaults": self.defaults_mode,
                "sent_during_backward": self._posted_in_backward, "forward_traced": bool(
                    self._gates is not None and self._gates.traced)}

    # -- completion and updates ----------------------------------------------------------------
    def _chunk_done(self, chunk) -> None:
        _, layers = self._progress.chunk_done(chunk)
        for layer in layers:
            self._updater.put(layer)

    def _update_layer(self, layer: int, step: int) -> None:
        """One layer's update of `step` (legato's updater thread, once apply_gradients of that
        step was called: its learning rate, its checks)."""
        keys = self._keys_of_layer[layer]
        grads = [self._transport.reduced(k, self._shapes[k]) for k in keys]
        info = self._steps.info(step)
        if self._passthrough:  # one optimizer step once every layer of the step is in
            self._plain_pending.update(zip(keys, grads))
            self._plain_received += 1
            if self._plain_received < len(self._layer_names):
                return
            pending = self._plain_pending
            self._plain_pending, self._plain_received = {}, 0
            order = sorted(pending)
            self._apply(info, [pending[k] for k in order], order, "the model", step)
            self._finish_layers(range(len(self._layer_names)))
            return
        self._apply(info, grads, keys, self._layer_names[layer], step)
        self._finish_layers([layer])

    def _apply(self, info, grads, keys, what: str, step: int) -> None:
        """The wrapped optimizer's update of `keys` with their reduced `grads`, at the step's
        iteration ([Note: per-layer apply]), unscaled under loss scaling."""
        iteration, scale, skip = info
        if skip:
            return
        variables = [self._vars[k] for k in keys]
        if scale is not None:  # as LossScaleOptimizer: divided by the step's scale
            if not _all_finite(grads):
                self._steps.update_skipped(step, what)
                return
            grads = [g if getattr(v, "overwrite_with_gradient", False) else g / scale
                     for g, v in zip(grads, variables)]
        # [Note: per-layer apply]: one iterations increment per step, not per layer.
        started = time.perf_counter()
        with _profiled(f"legato.update {what}"):
            if self._compiled_updates:
                self._update_fn(tuple(keys))(
                    tf.constant(iteration, dtype=self._opt._iterations.dtype), list(grads))
            else:
                self._opt._iterations.assign(iteration)
                self._opt.apply(grads, variables)
        if self._trace is not None:
            self._trace.span("update", f"update {what}", started)

    # [Note: compiled updates] Run eagerly, one layer's `apply` is one Python-level Keras call
    # per operation: on the cnn benchmark model 18.6 ms a step of updates the next forward
    # waited for, where Horovod's compiled step ran them as one graph. So each layer's update
    # (the iterations assignment and the optimizer's apply) is a tf.function of its own, traced
    # once (the layer's variables are fixed; the iteration is a tensor argument), the same
    # arithmetic in one call. `compiled_updates=False` keeps the eager calls, and so does a
    # learning rate given as a plain Python callable (a traced call would freeze its value).
    def _update_fn(self, keys: tuple[int, ...]):
        fn = self._update_fns.get(keys)
        if fn is None:
            opt, variables = self._opt, [self._vars[k] for k in keys]

            def update(iteration, grads):
                opt._iterations.assign(iteration)
                opt.apply(grads, variables)

            fn = self._update_fns[keys] = tf.function(update, autograph=False,
                                                      reduce_retracing=True)
        return fn

    def _finish_layers(self, layers) -> None:
        layers = list(layers)
        for layer in layers:
            for key in self._keys_of_layer[layer]:
                self._grads[key] = None
            if self._gates is not None:
                self._gates.release(layer)
        self._steps.layers_done(layers)

    def _release_gates(self) -> None:
        gates = getattr(self, "_gates", None)
        if gates is not None:
            gates.release_all()

    def _raise_if_failed(self) -> None:
        self._steps.raise_if_failed(self._scheduler.error)

    # -- closing -------------------------------------------------------------------------------
    def close(self, timeout_s: float | None = None) -> None:
        """Finish outstanding work, stop legato's threads and restore the model's layers."""
        if self._steps.closed:
            return
        timeout = self._timeout_s if timeout_s is None else timeout_s

        def restore() -> None:
            if self._gates is not None:
                self._gates.release_all()
                self._gates.remove()
            if "_backend_reset_gradient_accumulators" in self._opt.__dict__:
                object.__delattr__(self._opt, "_backend_reset_gradient_accumulators")
            self._forget_exit()

        close_scheduled(self._steps, self._scheduler, timeout_s=timeout, rank=self._rank,
                        wait=lambda t: self.synchronize(t),
                        steps=[lambda: self._updater.stop(timeout), restore], trace=self._trace,
                        all_gather=self._transport.all_gather_object,
                        lead=self._transport.group_rank == 0,
                        release=lambda healthy: self._transport.close(healthy=healthy))

    def __repr__(self) -> str:
        return (f"ScheduledOptimizer({type(self._opt).__name__}, {self._transport.name}, "
                f"{self.config.describe()}, {self.plan.describe()})")


def _all_finite(grads) -> bool:
    """Whether every value of every tensor is finite (one host read for them all, as Keras'
    LossScaleOptimizer.check_finite)."""
    return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))


def _compression_name(value) -> str | None:
    """compression= as given -> "fp16", "bf16", "none", or None (not given)."""
    if value is None:
        return None
    if isinstance(value, tf.DType):
        value = value.name
    if isinstance(value, str):
        name = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(
            value.strip().lower(), value.strip().lower())
        if name in ("fp16", "bf16", "none"):
            return name
    raise ConfigError(f"compression={value!r} is unknown; pass 'fp16', 'bf16' or None")


def _recording() -> bool:
    """Whether a GradientTape may be recording on this thread."""
    from tensorflow.python.eager import record

    return record.could_possibly_record()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
