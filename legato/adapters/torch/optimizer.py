"""ScheduledOptimizer: priority-scheduled gradient all-reduce for any torch.optim optimizer.

    opt = ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()      # gradients are posted to the scheduler as backward produces them
        opt.step()           # returns at once; layers update as their gradients arrive
                             # (under policy="plain", DDP's behaviour, it waits and steps)
        opt.zero_grad()      # no-op for scheduled parameters: each is cleared after its update

How updates keep the wrapped optimizer's semantics without a copy of its code
([Note: per-layer views]): for every layer legato makes a shallow view of the optimizer whose
param_groups hold only that layer's parameters and whose `state` *is* the wrapped optimizer's
state. A layer's update calls the optimizer's own `step()` on its view, with the hyperparameters
(lr, momentum, betas, weight decay, ...) that the wrapped optimizer's groups had when
`opt.step()` was called, so LR schedulers, momentum buffers, Adam moments, weight decay and
param groups behave as without legato. This holds for optimizers whose update of a parameter
depends only on that parameter's gradient and state (SGD, Adam, AdamW, RMSprop, Adagrad, ...);
an update that needs all gradients at once (global-norm clipping) is asked for with
`clip_grad_norm`, which waits for every gradient first.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from typing import Any

import torch

from legato.adapters.torch.comm import HorovodTransport, TorchDistTransport
from legato.adapters.torch.proxy import LayerGates
from legato.core._wait import wait_for
from legato.core.errors import ConfigError, LegatoError
from legato.core.scheduler.core import Scheduler
from legato.core.scheduler.plan import CommTask
from legato.core.scheduler.policy import plan_for, resolve_config
from legato.core.scheduler.tune import OnlineTuner, TuneSettings
from legato.core.timeline import Timeline

__all__ = ["ScheduledOptimizer"]

log = logging.getLogger(__name__)


def _layers_of(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Modules holding parameters, in registration order; each parameter's layer index."""
    wanted = {id(p) for p in params}
    layer_of: dict[int, int] = {}
    modules = []  # (name, module, layers the module's parameters belong to)
    layer_names: list[str] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        new = [p for p in own if id(p) not in layer_of]
        if new:
            index = len(layer_names)
            layer_names.append(name or type(module).__name__)
            for p in new:
                layer_of[id(p)] = index
        modules.append((name, module, tuple(sorted({layer_of[id(p)] for p in own}))))
    return layer_of, modules, layer_names


class ScheduledOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer` so that `model`'s gradients are all-reduced in priority order.

    Args:
        optimizer: any torch.optim optimizer holding exactly `model`'s trainable parameters.
        model: the model (not wrapped in DDP).
        policy: "bytescheduler" (priority + partitions + credit window), "priority" (layer
            order, whole tensors, one message in flight), "fifo" (arrival order) or "plain"
            (the pass-through: DDP's buckets in arrival order and one optimizer step after
            all of them, no dependency proxies; what DDP does).
        partition_bytes: largest message for "bytescheduler" (default 1 MiB).
        credit_bytes: bytes in flight (default 4 partitions; "priority": one message).
        merge_bytes: tensors smaller than this are merged into one message (bytescheduler
            default 64 KiB).
        backend: "torch" (torch.distributed: gloo, or NCCL for CUDA tensors, through torch or,
            with LEGATO_NATIVE_NCCL=1, legato's own NCCL communicator; the default) or
            "horovod" (horovod.torch, inside a horovodrun job, after hvd.init()).
        process_group: ranks to reduce over (default: all). legato creates its own groups over
            the same ranks, so that the user's collectives never interleave with its own.
        tune: tune partition_bytes and credit_bytes online (Bayesian optimization with
            optuna, a few steps per trial, switched at step boundaries on all ranks), fall back
            to "plain" when scheduling does not pay (the pass-through rule), and tune again
            when the step time drifts. True, or a dict of `TuneSettings` fields (trials,
            steps_per_trial, sampler, check_every, drift, ...); bytescheduler only.
        clip_grad_norm: clip the global gradient norm to this value before updating (waits for
            every gradient of the step before the first update).
        timeout_s: how long any wait may last before failing with an error naming the rank,
            step and layer (a dead peer, a rank that skipped backward).
        broadcast_parameters: copy rank 0's parameters and buffers to every rank at start.
        timeline: write a Chrome trace (Perfetto) of every rank to this path at `close()`
            (or `write_timeline()`): per-layer forward/backward, per-message queueing and
            communication, per-layer updates. Recording costs a few microseconds per event.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                 policy: str = "bytescheduler", partition_bytes: int | None = None,
                 credit_bytes: int | None = None, merge_bytes: int | None = None,
                 backend: str | None = None, process_group=None, tune=False,
                 clip_grad_norm: float | None = None, timeout_s: float = 300.0,
                 broadcast_parameters: bool = True,
                 timeline: str | os.PathLike | None = None) -> None:
        # Not calling Optimizer.__init__: state and param_groups are the wrapped optimizer's.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got "
                              f"{type(optimizer).__name__}")
        if isinstance(optimizer, ScheduledOptimizer):
            raise ConfigError("optimizer is already a ScheduledOptimizer; wrap it once")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ConfigError("model is wrapped in DistributedDataParallel, which all-reduces "
                              "gradients itself; pass the plain model")
        backend = backend or "torch"
        if backend not in ("torch", "horovod"):
            raise ConfigError(f"backend={backend!r} is unknown; known: 'torch' "
                              "(torch.distributed: gloo, NCCL) and 'horovod'")
        if backend == "horovod" and process_group is not None:
            raise ConfigError("process_group applies to backend='torch'; Horovod reduces over "
                              "all its ranks")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm={clip_grad_norm!r} is invalid; pass a positive "
                              "norm or None")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s={timeout_s!r} is invalid; pass a positive number")
        self._opt = optimizer
        self._model = model
        self._clip = clip_grad_norm
        self._timeout_s = float(timeout_s)
        self._params = self._check_params(optimizer, model)
        # Everything that can be checked locally is checked before any collective call.
        self.config = resolve_config(policy, partition_bytes=partition_bytes,
                                     credit_bytes=credit_bytes, merge_bytes=merge_bytes)
        self._tune = TuneSettings.from_arg(tune)
        if self._tune is not None and self.config.policy != "bytescheduler":
            raise ConfigError(f"tune=True searches bytescheduler's partition and credit sizes; "
                              f"policy={policy!r} has none: use policy='bytescheduler'")

        layer_of, modules, self._layer_names = _layers_of(model, self._params)
        self._layer_of_key = [layer_of[id(p)] for p in self._params]
        self._keys_of_layer: list[list[int]] = [[] for _ in self._layer_names]
        for key, layer in enumerate(self._layer_of_key):
            self._keys_of_layer[layer].append(key)
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = [names[id(p)] for p in self._params]
        self._tasks = [CommTask(key, self._names[key], self._layer_of_key[key],
                                p.numel() * p.element_size(), p.element_size(), str(p.dtype))
                       for key, p in enumerate(self._params)]
        self._tuner: OnlineTuner | None = None
        self._next_boundary = -1
        self._tune_phase: str | None = None
        self._issued_before = 0  # messages issued by schedulers of earlier plans
        if self._tune is not None:  # checked locally before any collective call
            self._tuner = OnlineTuner(self._tune, self.config,
                                      max(t.nbytes for t in self._tasks))
            self.config = self._tuner.first.config
            self._next_boundary = self._tuner.first.next_boundary
            self._tune_phase = self._tuner.first.phase
        self.plan = plan_for(self.config, self._tasks)
        self._transport = (HorovodTransport() if backend == "horovod"
                           else TorchDistTransport(process_group, self._timeout_s))
        self._rank = self._transport.rank
        self._check_same_plan()
        if broadcast_parameters:
            self._broadcast_from_rank0()

        self._views = self._make_views()
        self._layer_left = [len(keys) for keys in self._keys_of_layer]
        self._grad_seen = [False] * len(self._params)
        self._cv = threading.Condition()
        self._steps_called = 0
        self._updates_done = [0] * len(self._layer_names)
        self._layers_updated_in_step = 0
        self._steps_updated = 0
        self._error: BaseException | None = None
        self._closed = False
        self._updates: queue.Queue = queue.Queue()

        self._timeline_path = timeline
        self._timeline = Timeline(self._rank) if timeline is not None else None
        self._step_times: list[float] = []
        self._last_step_at: float | None = None
        self._start_scheduler()
        self._gates = LayerGates(model, {name: layers for name, _, layers in modules},
                                 len(self._layer_names), timeout_s=self._timeout_s,
                                 check_error=self._raise_if_failed, rank=self._rank)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_grad_hook(key))
                       for key, p in enumerate(self._params)]
        if self._timeline is not None:
            self._hooks += self._compute_hooks(modules)
        self._updater = threading.Thread(target=self._update_loop, daemon=True,
                                         name=f"legato-update-r{self._rank}")
        self._updater.start()
        ref = weakref.ref(self)
        self._atexit = lambda: ref() is not None and ref().close()  # noqa: E731
        atexit.register(self._atexit)
        log.info("[rank %d] legato: %s; %s", self._rank, self.config.describe(),
                 self.plan.describe())

    # -- the scheduler and its settings --------------------------------------------------------
    @property
    def _passthrough(self) -> bool:
        return self.config.policy == "plain"

    def _start_scheduler(self) -> None:
        """A scheduler for the current plan (at construction and after each tuning boundary)."""
        self._chunks_left = [len(self.plan.chunks_of(k)) for k in range(len(self._params))]
        self._chunk_names = [", ".join(self._names[k] for k in c.keys) for c in self.plan.chunks]
        self._scheduler_step0 = self._steps_called
        self._scheduler = Scheduler(
            self.plan, self.config, self._backend_for_plan(),
            order=self._transport.order_channel(), leader=self._transport.group_rank == 0,
            on_chunk_done=self._chunk_done,
            rank=self._rank, timeout_s=self._timeout_s,
            on_event=self._record if self._timeline is not None else None)

    def _backend_for_plan(self):
        if isinstance(self._transport, TorchDistTransport):
            return self._transport.backend(self._grad_of, self._params[0].device,
                                           self._set_grad)
        return self._transport.backend(self._grad_of)

    def _boundary(self) -> None:
        """A tuning boundary (every rank, same step): finish everything, let rank 0 decide the
        next settings, switch (see legato.core.scheduler.tune)."""
        self.synchronize()
        # Closing the scheduler ends its use of the control group (the leader tells the
        # followers to stop following), so the decision can travel on it.
        self._issued_before += self._scheduler.issued_total
        self._scheduler.close(timeout_s=self._timeout_s)
        self._scheduler.raise_if_failed()
        decision = None
        if self._tuner is not None and self._transport.group_rank == 0:
            decision = self._tuner.boundary(self._steps_called, self._step_times)
        decision = self._transport.broadcast_object(decision)
        self._step_times = []
        self._next_boundary = decision.next_boundary
        self._tune_phase = decision.phase
        if decision.config != self.config:
            log.info("[rank %d] legato tuner (%s): %s", self._rank, decision.phase,
                     decision.config.describe())
            self.config = decision.config
            self.plan = plan_for(self.config, self._tasks)
        self._start_scheduler()

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _check_params(optimizer, model) -> list[torch.nn.Parameter]:
        model_params, seen = [], set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                model_params.append(p)
        opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [names[id(p)] for p in model_params if id(p) not in opt_ids]
        if missing:
            raise ConfigError(f"the optimizer does not hold {len(missing)} of the model's "
                              f"trainable parameters ({', '.join(missing[:5])}"
                              f"{', ...' if len(missing) > 5 else ''}); build it from "
                              "model.parameters(), or set requires_grad=False on frozen ones")
        extra = len(opt_ids - seen)
        if extra:
            raise ConfigError(f"the optimizer holds {extra} parameter(s) that are not trainable "
                              "parameters of the model; legato schedules one model's gradients:"
                              " pass the model those parameters belong to")
        for p in model_params:
            if p.is_sparse or p.layout != torch.strided:
                raise ConfigError("sparse parameters are not supported; use dense ones")
        if not model_params:
            raise ConfigError("the model has no trainable parameters")
        return model_params

    def _check_same_plan(self) -> None:
        digests = self._transport.all_gather_object((self.plan.digest(), len(self._params),
                                                      self._tune))
        if any(d != digests[0] for d in digests):
            raise ConfigError(f"[rank {self._rank}] ranks built different communication plans "
                              f"({digests}); every rank must wrap the same model with the same "
                              "settings")

    def _broadcast_from_rank0(self) -> None:
        self._transport.broadcast_from_first([*self._model.parameters(),
                                              *self._model.buffers()])

    def _make_views(self) -> list[tuple[torch.optim.Optimizer, list[tuple[int, dict]]]]:
        """One shallow view of the optimizer per layer (see [Note: per-layer views])."""
        views = []
        for layer in range(len(self._layer_names)):
            members = {id(self._params[k]) for k in self._keys_of_layer[layer]}
            groups, sources = [], []
            for index, group in enumerate(self._opt.param_groups):
                ps = [p for p in group["params"] if id(p) in members]
                if ps:
                    g = {k: v for k, v in group.items() if k != "params"}
                    g["params"] = ps
                    groups.append(g)
                    sources.append((index, g))
            view = object.__new__(type(self._opt))
            view.__dict__.update(self._opt.__dict__)
            view.param_groups = groups
            views.append((view, sources))
        return views

    # -- timeline ------------------------------------------------------------------------------
    def _record(self, kind: str, chunk_id: int, when: float) -> None:
        tl = self._timeline
        chunk = self.plan.chunks[chunk_id]
        if kind == "ready":
            tl.begin("queue", chunk_id, when)
        elif kind == "start":
            tl.end("queue", chunk_id, f"wait {chunk_id}", when)
            tl.begin("comm", chunk_id, when)
        elif kind == "done":
            tl.end("comm", chunk_id, f"msg {chunk_id}: {self._chunk_names[chunk_id]}", when,
                   bytes=chunk.nbytes, layer=chunk.layer)

    def _compute_hooks(self, modules) -> list:
        tl = self._timeline
        handles = []
        for name, module, _ in modules:
            name = name or type(module).__name__
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: tl.begin("compute", ("f", name))))
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: tl.end("compute", ("f", name), f"forward {name}")))
            handles.append(module.register_full_backward_pre_hook(
                lambda m, g, name=name: tl.begin("compute", ("b", name))))
            handles.append(module.register_full_backward_hook(
                lambda m, gi, go, name=name: tl.end("compute", ("b", name), f"backward {name}")))
        return handles

    def write_timeline(self, path: str | os.PathLike | None = None) -> str | None:
        """Gather every rank's trace on rank 0 and write it there; returns the path on rank 0.

        A collective over legato's control group, which the scheduler uses while it runs: every
        rank calls it after `close()` (which calls it by itself when `timeline` was given).
        """
        if self._timeline is None:
            raise ConfigError("no timeline is being recorded; pass timeline='trace.json'")
        if not self._closed:
            raise ConfigError("write_timeline() runs after close(), on every rank")
        target = path or self._timeline_path
        gathered = self._transport.all_gather_object(self._timeline.events())
        if self._transport.group_rank != 0:
            return None
        others = [ev for r, ev in enumerate(gathered) if r != 0]
        written = self._timeline.write(target, others)
        log.info("[rank %d] timeline of %d ranks written to %s", self._rank, len(gathered),
                 written)
        return str(written)

    # -- backward side -------------------------------------------------------------------------
    def _grad_of(self, key: int) -> torch.Tensor:
        return self._params[key].grad

    def _set_grad(self, key: int, grad: torch.Tensor) -> None:
        self._params[key].grad = grad

    def _make_grad_hook(self, key: int):
        def grad_ready(param: torch.Tensor) -> None:
            if self._grad_seen[key]:
                raise LegatoError(
                    f"[rank {self._rank}] parameter {self._names[key]!r} received a second "
                    "gradient before opt.step(); legato starts the all-reduce at the first "
                    "backward, so use one backward per step (gradient accumulation is not "
                    "supported)")
            self._grad_seen[key] = True
            self._scheduler.tensor_ready(key)
        return grad_ready

    def _chunk_done(self, chunk) -> None:
        """A chunk's collective finished (backend thread): queue layers whose gradients are in.

        In pass-through (`plain`) the optimizer steps once, in `step()`, after every chunk."""
        if self._passthrough:
            return
        ready_layers = []
        with self._cv:
            for key in chunk.keys:
                self._chunks_left[key] -= 1
                if self._chunks_left[key]:
                    continue
                self._chunks_left[key] = len(self.plan.chunks_of(key))
                layer = self._layer_of_key[key]
                self._layer_left[layer] -= 1
                if not self._layer_left[layer]:
                    self._layer_left[layer] = len(self._keys_of_layer[layer])
                    ready_layers.append(layer)
        for layer in ready_layers:
            self._updates.put(layer)

    # -- updates -------------------------------------------------------------------------------
    def _update_loop(self) -> None:
        while True:
            layer = self._updates.get()
            if layer is None:
                return
            with self._cv:
                while (self._steps_called <= self._updates_done[layer] and not self._closed
                       and self._error is None):
                    self._cv.wait(0.5)
                if self._error is not None or (self._closed and
                                               self._steps_called <= self._updates_done[layer]):
                    continue
            started = time.perf_counter()
            try:
                self._views[layer][0].step()
            except BaseException as err:  # noqa: BLE001 (raised in the training thread)
                self._fail(LegatoError(f"[rank {self._rank}] updating layer "
                                       f"{self._layer_names[layer]!r} failed: "
                                       f"{type(err).__name__}: {err}"))
                continue
            for key in self._keys_of_layer[layer]:
                self._params[key].grad = None
                self._grad_seen[key] = False
            self._gates.release(layer)
            if self._timeline is not None:
                self._timeline.span("update", f"update {self._layer_names[layer]}", started,
                                    time.perf_counter())
            with self._cv:
                self._updates_done[layer] += 1
                self._layers_updated_in_step += 1
                if self._layers_updated_in_step == len(self._layer_names):
                    self._layers_updated_in_step = 0
                    self._steps_updated += 1
                self._cv.notify_all()

    def _fail(self, err: BaseException) -> None:
        with self._cv:
            if self._error is None:
                self._error = err
                log.error("%s", err)
            self._cv.notify_all()
        self._gates.wake()

    def _raise_if_failed(self) -> None:
        err = self._error or self._scheduler.error
        if err is not None:
            raise err

    # -- the optimizer interface ---------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._opt

    @property
    def param_groups(self):  # type: ignore[override]
        return self._opt.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self._opt.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self._opt.state

    @property
    def defaults(self):  # type: ignore[override]
        return self._opt.defaults

    def step(self, closure=None):  # type: ignore[override]
        """Start this step's updates; returns before they are done (see `synchronize`)."""
        if closure is not None:
            raise ConfigError("ScheduledOptimizer.step() does not take a closure; call "
                              "loss.backward() before opt.step()")
        if self._closed:
            raise LegatoError("this ScheduledOptimizer is closed")
        self._raise_if_failed()
        missing = [self._names[k] for k, seen in enumerate(self._grad_seen) if not seen]
        if missing:
            raise LegatoError(
                f"[rank {self._rank}] step {self._steps_called}: {len(missing)} parameter(s) got "
                f"no gradient in this step ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); every rank must all-reduce every "
                "trainable parameter: call loss.backward() before opt.step(), and freeze "
                "(requires_grad=False) parameters the loss does not use")
        if self._passthrough:
            self._step_plain()
        else:
            self._sync_views()
            if self._clip is not None:
                self._wait_this_step()
                torch.nn.utils.clip_grad_norm_(self._params, self._clip)
            self._gates.finish_observing()
            self._gates.hold_all(self._steps_called)
            with self._cv:
                self._steps_called += 1
                self._cv.notify_all()
        if self._tuner is not None:
            now = time.perf_counter()
            if self._last_step_at is not None and self._next_boundary >= 0:
                self._step_times.append(now - self._last_step_at)
            self._last_step_at = now
            if self._steps_called == self._next_boundary:
                self._boundary()
                self._last_step_at = time.perf_counter()
        return None

    def _wait_this_step(self) -> None:
        """Wait until this step's chunks are all reduced (the scheduler counts from its start)."""
        self._scheduler.wait_steps(self._steps_called - self._scheduler_step0 + 1,
                                   self._timeout_s)

    def _step_plain(self) -> None:
        """Pass-through: wait for every bucket, then one step of the wrapped optimizer."""
        self._wait_this_step()
        self._gates.finish_observing()
        started = time.perf_counter()
        if self._clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self._clip)
        self._opt.step()
        for key, p in enumerate(self._params):
            p.grad = None
            self._grad_seen[key] = False
        if self._timeline is not None:
            self._timeline.span("update", "update (all layers)", started, time.perf_counter())
        with self._cv:
            self._steps_called += 1
            self._steps_updated += 1
            for layer in range(len(self._updates_done)):
                self._updates_done[layer] += 1
            self._cv.notify_all()

    def _sync_views(self) -> None:
        """Give every layer's view the hyperparameters and state of the wrapped optimizer now."""
        groups = self._opt.param_groups
        for view, sources in self._views:
            if view.state is not self._opt.state:  # load_state_dict replaced it
                view.state = self._opt.state
            for index, g in sources:
                src = groups[index]
                for k, v in src.items():
                    if k != "params":
                        g[k] = v

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002
        """A no-op for scheduled parameters: each gradient is cleared right after its update."""
        return None

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Wait until every transfer and update of the steps taken so far is done."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        with self._cv:
            wait_for(self._cv, lambda: self._steps_updated >= self._steps_called, timeout,
                     self._raise_if_failed, lambda: LegatoError(
                         f"[rank {self._rank}] synchronize: step {self._steps_updated} not done "
                         f"after {timeout:g} s ({self._layers_updated_in_step} of "
                         f"{len(self._layer_names)} layers updated); a peer may be dead"))
        self._raise_if_failed()

    def state_dict(self):  # type: ignore[override]
        self.synchronize()
        return self._opt.state_dict()

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        self.synchronize()
        self._opt.load_state_dict(state_dict)
        self._sync_views()

    def add_param_group(self, param_group) -> None:  # type: ignore[override]
        raise ConfigError("add parameter groups to the optimizer before wrapping it in "
                          "ScheduledOptimizer")

    def close(self, timeout_s: float | None = None) -> None:
        """Finish outstanding work, stop legato's threads and remove its hooks."""
        if self._closed:
            return
        timeout = self._timeout_s if timeout_s is None else timeout_s
        healthy = False
        try:
            if self._error is None and self._scheduler.error is None:
                self.synchronize(timeout)
                healthy = True
        finally:
            # Every step of the clean-up runs, whatever an earlier one raised.
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            try:
                self._scheduler.close(timeout_s=min(timeout, 60.0))
            except Exception as err:  # noqa: BLE001 (closing: log and go on)
                log.warning("[rank %d] closing the scheduler: %s", self._rank, err)
            healthy = healthy and self._scheduler.error is None
            self._updates.put(None)
            self._updater.join(min(timeout, 60.0))
            for h in self._hooks:
                h.remove()
            self._gates.release_all()
            self._gates.remove()
            atexit.unregister(self._atexit)
        try:
            if healthy and self._timeline is not None:
                self.write_timeline()
        finally:
            self._transport.close(healthy=healthy)

    def __enter__(self) -> "ScheduledOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ScheduledOptimizer({type(self._opt).__name__}, {self.config.describe()}, "
                f"{self.plan.describe()})")

    @property
    def tuning(self) -> bool:
        """Whether tuning trials are running (the same on every rank at every step)."""
        return self._tune_phase in ("tuning", "confirming")

    @property
    def stats(self) -> dict[str, Any]:
        return {"steps": self._steps_called, "steps_done": self._steps_updated,
                "messages_per_step": len(self.plan.chunks), "bytes_per_step":
                self.plan.total_bytes, "layers": len(self._layer_names),
                "issued": self._issued_before + self._scheduler.issued_total,
                "config": self.config.describe(),
                "tuner": None if self._tuner is None or self._transport.group_rank != 0
                else self._tuner.summary()}

