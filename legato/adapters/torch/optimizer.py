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

[Note: gradients changed in flight] Between `loss.backward()` and `opt.step()` the gradients
are being all-reduced. Code that reads or changes them there (`clip_grad_norm_`,
`scaler.unscale_`) works as under DDP once it waits for them: `opt.synchronize()` does, as in
Horovod, and so does reading `opt.param_groups` (which `scaler.unscale_(opt)` does), since under
DDP the gradients are complete by then. Without that wait it would read half-reduced values
and the ranks would drift apart silently. So each gradient's `_version` (PyTorch's count of
in-place writes) is noted when it is handed over; once reduced it must equal that plus the
writes the backend made itself, and at the layer's update it must be unchanged unless the
step's gradients were waited for. Any other write fails the job with a message naming the fix.

[Note: cleared gradients] `opt.zero_grad()` between a backward pass and `opt.step()` means
those gradients must not be applied, as in a GAN's loop, where the generator's loss
back-propagates into the discriminator, whose next iteration starts with `zero_grad()`. Their
all-reduce started during that backward pass on every rank and cannot be recalled (DDP sends
them too); zero_grad waits for it to finish, drops its result (the layer updates it queued are
skipped), and clears the gradients, so the next backward pass hands over a fresh set.

[Note: mixed precision] With `torch.amp.GradScaler`, `scaler.step(opt)` hands legato the
scaler (`_step_supports_amp_scaling`), so it never reads the gradients itself. The skip
decision must be the same on every rank and, as under DDP, skip when any rank's gradients
overflowed, without waiting for every gradient before the first layer's update: each
gradient is checked for non-finite values on its own rank when handed over, and `step()`
all-reduces the one flag (a few bytes, on a group of its own). Each layer's update then
unscales its reduced gradients with GradScaler's own kernel and steps, or is skipped with
every other layer of the step. The scaler's `found_inf` is set from the shared flag, so
`scaler.update()` moves the scale on every rank alike. The first scaled step has no flags
yet (the check starts once a scaler is seen): it waits for its gradients and lets the scaler
unscale and check the reduced ones, DDP's order exactly. A step where `scaler.unscale_(opt)`
was called (to clip) uses that check too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import warnings
from typing import Any

import torch

from legato.adapters.gloo import TorchDistTransport
from legato.adapters.torch.comm import HorovodTransport
from legato.adapters.torch.proxy import LayerGates
from legato.core.errors import ConfigError, LegatoError
from legato.core.scheduler import env as scheduler_env
from legato.core.scheduler.core import Scheduler
from legato.core.scheduler.layers import LayerProgress, layer_keys
from legato.core.scheduler.plan import CommTask
from legato.core.scheduler.policy import plan_for, resolve_config
from legato.core.scheduler.steps import (ClosesOnExit, LayerUpdater, StepTracker,
                                         close_scheduled)
from legato.core.scheduler.tune import (MEASURED_DEFAULTS, TuneSettings, TuningSession,
                                        fixed_reason)
from legato.core.timeline import SchedulerTrace, SpannedBackend, check_trace_path

__all__ = ["ScheduledOptimizer"]

log = logging.getLogger(__name__)
STARTUP_STEPS = 6  # steps on the fixed defaults before the simulator chooses (defaults=)

# GradScaler.step warns, on every step, that it will stop passing itself to optimizers that
# set _step_supports_amp_scaling (ScheduledOptimizer relies on it: [Note: mixed precision]).
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself",
                        category=FutureWarning)


def _profiled(name: str):
    """A torch.profiler span named `name`. legato's threads send messages and update layers;
    torch.profiler records other threads than the one that started it only with
    `experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True)`,
    so the span is always opened (about a microsecond when no profiler runs)."""
    return torch.profiler.record_function(name)


_WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _compression_name(value) -> str | None:
    """compression= as given -> "fp16", "bf16", "none", or None (not given)."""
    if value is None:
        return None
    for name, dtype in _WIRE_DTYPES.items():
        if value == name or (dtype is not None and value == dtype) or (
                isinstance(value, str) and value.lower() in (name, str(dtype))):
            return name
    raise ConfigError(f"compression={value!r} is unknown; pass 'fp16', 'bf16' or None")


def _tensors(out):
    """The tensors of a module's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _tensors(item)


def _ddp_wrapping(model: torch.nn.Module):
    """A live DistributedDataParallel that holds `model` or any of its parameters, or None.

    Found among the objects the garbage collector tracks (one scan, at construction and at the
    first step, for a DDP built after the optimizer)."""
    import gc

    ddp_type = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, ddp_type):
        return model
    params = {id(p) for p in model.parameters()}
    for obj in gc.get_objects():
        if isinstance(obj, ddp_type):
            inner = getattr(obj, "module", None)
            if inner is model or (isinstance(inner, torch.nn.Module) and any(
                    id(p) in params for p in inner.parameters())):
                return obj
    return None


def _ddp_message(wrapper) -> str:
    return (f"the model's parameters are also held by a DistributedDataParallel "
            f"({type(wrapper.module).__name__}), which all-reduces the same gradients itself: "
            "both would reduce every gradient and the result is undefined. Use one: drop the DDP "
            "wrapper and pass the plain model to ScheduledOptimizer, or keep DDP and schedule "
            "its buckets with legato.adapters.torch.register_scheduled_hook(ddp_model)")


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


class ScheduledOptimizer(ClosesOnExit, torch.optim.Optimizer):
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
            Each rank also writes its spans as they come to `<timeline>.rank<N>.partial.json`
            (at least every second), removed once the whole trace is written: after a crash
            it holds that rank's trace up to the crash.

    Every setting but the optimizer, model, backend and process group can come from a
    `LEGATO_*` environment variable instead (LEGATO_POLICY, LEGATO_PARTITION_BYTES,
    LEGATO_CREDIT_BYTES, LEGATO_MERGE_BYTES, LEGATO_TUNE, LEGATO_TIMELINE, LEGATO_TIMEOUT_S,
    LEGATO_BACKWARD_PASSES_PER_STEP; see legato.core.scheduler.env), so that an unchanged
    script can be scheduled and traced; an argument given here wins over its variable.
        backward_passes_per_step: gradient accumulation, Horovod's name for it: gradients are
            accumulated locally over this many backward passes and all-reduced after the last
            (DDP's `no_sync()` does the same; `with opt.no_sync():` is here too).
        compression: "fp16" or "bf16" (or torch.float16, torch.bfloat16): float32 gradients
            travel in that type, as with DDP's fp16_compress_hook / bf16_compress_hook (cast,
            divided by the world size, summed, cast back), partitioned and prioritized as
            usual; "none" or None (the default) sends them as they are.
        defaults: "auto" (the default), "fixed-or-plain", "fixed" or "simulated": with
            "fixed-or-plain" (what "auto" is when no partition or credit size, tuner or other
            policy is given, over gloo or Horovod on CPU tensors; else "fixed"), the first
            STARTUP_STEPS steps run on the fixed defaults, then the simulator, from those
            steps' layer times and a link fitted to a few all-reduces, keeps them or switches
            every rank to plain (the pass-through) where scheduling is predicted not to pay
            ([Note: defaults chosen by the simulator]); over Horovod it measures instead (the
            first 40 steps alternate the fixed sizes and plain, as TensorFlow's and MXNet's
            defaults do); "simulated" chooses among the tuner's grid of sizes and plain;
            "fixed" never checks.

    Mixed precision: `torch.amp.GradScaler`'s standard loop works unchanged
    (`scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`, with
    `scaler.unscale_(opt)` before clipping); see [Note: mixed precision].
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                 policy: str | None = None, partition_bytes: int | None = None,
                 credit_bytes: int | None = None, merge_bytes: int | None = None,
                 backend: str | None = None, process_group=None, tune=None,
                 clip_grad_norm: float | None = None, timeout_s: float | None = None,
                 broadcast_parameters: bool = True,
                 timeline: str | os.PathLike | None = None,
                 backward_passes_per_step: int | None = None,
                 compression: str | torch.dtype | None = None,
                 defaults: str | None = None) -> None:
        # Not calling Optimizer.__init__: state and param_groups are the wrapped optimizer's.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got "
                              f"{type(optimizer).__name__}")
        if isinstance(optimizer, ScheduledOptimizer):
            raise ConfigError("optimizer is already a ScheduledOptimizer; wrap it once")
        settings, from_env = scheduler_env.resolve_settings(
            dict(policy=policy, partition_bytes=partition_bytes, credit_bytes=credit_bytes,
                 merge_bytes=merge_bytes, tune=tune, timeline=timeline, timeout_s=timeout_s,
                 backward_passes_per_step=backward_passes_per_step,
                 compression=_compression_name(compression), defaults=defaults),
            scheduler_env.DEFAULTS)
        policy, tune, timeline = settings["policy"], settings["tune"], settings["timeline"]
        timeout_s = settings["timeout_s"]
        backward_passes_per_step = settings["backward_passes_per_step"]
        self._compression = _WIRE_DTYPES[settings["compression"]]
        self._bpps = backward_passes_per_step
        partition_bytes, credit_bytes, merge_bytes = scheduler_env.sizes_for(
            policy, settings, dict(partition_bytes=partition_bytes, credit_bytes=credit_bytes,
                                   merge_bytes=merge_bytes))
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
        if (isinstance(backward_passes_per_step, bool) or not isinstance(
                backward_passes_per_step, int) or backward_passes_per_step < 1):
            raise ConfigError(f"backward_passes_per_step={backward_passes_per_step!r} is "
                              "invalid; pass a whole number of backward passes, 1 or more")
        if timeline is not None:  # checked before any collective call, as every setting
            check_trace_path(timeline)
        wrapper = _ddp_wrapping(model)
        if wrapper is not None:
            raise ConfigError(_ddp_message(wrapper))
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
        self._keys_of_layer = layer_keys(self._layer_of_key, len(self._layer_names))
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = [names[id(p)] for p in self._params]
        self._tasks = [CommTask(key, self._names[key], self._layer_of_key[key],
                                p.numel() * p.element_size(), p.element_size(), str(p.dtype))
                       for key, p in enumerate(self._params)]
        mode = settings["defaults"]
        if mode not in scheduler_env.DEFAULTS_MODES:
            raise ConfigError(f"defaults={mode!r} is unknown; pass 'auto' (the default), 'fixed' "
                              "(the fixed sizes), 'simulated' (chosen by the simulator at "
                              "start-up) or 'fixed-or-plain' (the fixed sizes, or plain where "
                              "the simulator predicts scheduling does not pay)")
        why = fixed_reason(self.config.policy, settings["partition_bytes"],
                           settings["credit_bytes"], self._tune) or (
            "the model is not on the CPU" if any(p.device.type != "cpu" for p in self._params)
            else None)
        if mode == "auto":  # [Note: defaults chosen by the simulator]
            mode = "fixed" if why else "fixed-or-plain"
        elif mode != "fixed" and why:
            raise ConfigError(f"defaults={mode!r} lets the simulator choose bytescheduler's "
                              f"settings at start-up, but {why}; drop one of them (it runs "
                              "on CPU tensors, over gloo or Horovod)")
        self.defaults_mode = mode  # what the defaults are, once 'auto' is resolved
        # Over Horovod "fixed-or-plain" measures instead of simulating ([Note: measured
        # defaults] in legato.core.scheduler.tune, as TensorFlow and MXNet do): the simulator's
        # links fitted to Horovod all-reduces were poor (worst errors 34-61%) and its choice
        # measured no better than the fixed sizes (docs/benchmarks.md).
        measured = mode == "fixed-or-plain" and backend == "horovod"
        if measured:
            self._tune = MEASURED_DEFAULTS
        self._simulated = mode in ("simulated", "fixed-or-plain") and not measured
        self._only_fixed = mode == "fixed-or-plain"
        self._clock = None                 # the start-up measurements (defaults="simulated")
        self.startup: dict | None = None   # what the simulator chose, and from what
        self._tuning: TuningSession | None = None
        self._issued_before = 0  # messages issued by schedulers of earlier plans
        if self._tune is not None:  # checked locally before any collective call
            self._tuning = TuningSession(self._tune, self.config,
                                         max(t.nbytes for t in self._tasks))
            self.config = self._tuning.config
        self.plan = plan_for(self.config, self._tasks)
        self._transport = (HorovodTransport(self._timeout_s) if backend == "horovod"
                           else TorchDistTransport(process_group, self._timeout_s))
        self._rank = self._transport.rank
        self._check_same_plan()
        if broadcast_parameters:
            self._broadcast_from_rank0()

        self._views = self._make_views()
        self._passes = [0] * len(self._params)       # backward passes since the last post
        self._posted = [False] * len(self._params)   # gradient handed to the scheduler
        self._open_posts = 0                         # posts of the step not yet stepped
        self._no_sync = False
        self._ddp_checked = False
        # [Note: gradients changed in flight]: per key, the gradient handed over and its
        # version then; the reduced gradient and its version once all-reduced.
        self._taken: list = [None] * len(self._params)
        self._reduced: list = [None] * len(self._params)
        self._ours: list = [None] * len(self._params)  # gradient tensors legato set itself
        self._synced_step = -1   # the step whose gradients the user waited for (synchronize)
        # [Note: mixed precision]
        self._amp = False                            # a GradScaler has stepped this optimizer
        self._bad: list = [None] * len(self._params)  # per key: non-finite local gradient?
        # Steps called and done, per-step mixed-precision decisions, failure (the core's).
        self._steps = StepTracker(self._layer_names, rank=self._rank,
                                  timeout_s=self._timeout_s, on_fail=self._wake_gates)

        self._chunk_names = self.plan.chunk_names(self._names)
        self._trace = (SchedulerTrace(timeline, self._rank, self.plan, self._chunk_names)
                       if timeline is not None else None)
        self._timeline = self._trace.timeline if self._trace is not None else None
        self._start_scheduler()
        self._gates = LayerGates(model, {name: layers for name, _, layers in modules},
                                 len(self._layer_names), timeout_s=self._timeout_s,
                                 check_error=self._raise_if_failed, rank=self._rank)
        if self._trace is not None:
            self._gates.record_waits(self._trace.gate_waited)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_grad_hook(key))
                       for key, p in enumerate(self._params)]
        if self._timeline is not None:
            self._hooks += self._compute_hooks(modules)
        self._updater = LayerUpdater(self._steps, self._update_layer,
                                     name=f"legato-update-r{self._rank}")
        if self._simulated:
            from legato.adapters.torch.profile import LiveClock

            self._clock = LiveClock(model, self._params, layer_of, modules, self._layer_names)
        self._close_at_exit()
        log.info("[rank %d] legato: %s; %s%s", self._rank, self.config.describe(),
                 self.plan.describe(), f" (from {', '.join(from_env)})" if from_env else "")

    # -- the scheduler and its settings --------------------------------------------------------
    @property
    def _passthrough(self) -> bool:
        return self.config.policy == "plain"

    def _start_scheduler(self) -> None:
        """A scheduler for the current plan (at construction and after each tuning boundary)."""
        self._progress = LayerProgress(self.plan, self._layer_of_key, len(self._layer_names))
        self._chunk_names = self.plan.chunk_names(self._names)
        if self._trace is not None:
            self._trace.set_plan(self.plan, self._chunk_names)
        self._scheduler_step0 = self._steps.steps_called
        self._scheduler = Scheduler(
            self.plan, self.config, self._backend_for_plan(),
            order=self._transport.order_channel(), leader=self._transport.group_rank == 0,
            on_chunk_done=self._chunk_done,
            rank=self._rank, timeout_s=self._timeout_s,
            on_event=self._trace.on_event if self._trace is not None else None)

    def _backend_for_plan(self):
        if isinstance(self._transport, TorchDistTransport):
            self._backend_now = self._transport.backend(self._grad_of, self._params[0].device,
                                                        self._set_grad, self._compression)
        else:
            self._backend_now = self._transport.backend(self._grad_of, self._compression)
        return SpannedBackend(self._backend_now, _profiled, lambda i: self._chunk_names[i])

    # [Note: defaults chosen by the simulator] With defaults="simulated", the first
    # STARTUP_STEPS steps run on the fixed defaults while a LiveClock takes every layer's
    # forward, backward and update times from them (compute beside communication, as it will
    # run). At that step every rank finishes its work; the ranks time all-reduces of 64 KiB to
    # 16 MiB (3 each, capped at twice the gradients' bytes) on legato's group and the leader's
    # per-message announcement; rank 0 fits the link (`fit_link`), simulates the tuner's grid of
    # partition sizes and windows and plain (`choose_by_simulation`), and every rank switches
    # to its choice, as at a tuning boundary. `opt.startup` says what was chosen from what.
    def _choose_by_simulation(self) -> None:
        from legato.adapters.torch.profile import announce_s, link_samples
        from legato.core.scheduler.simulate import LinkFit, LinkModel, fit_link
        from legato.core.scheduler.startup import choose_by_simulation, per_message_cost

        started = time.perf_counter()
        self.synchronize()
        self._issued_before += self._scheduler.issued_total
        self._scheduler.close(timeout_s=self._timeout_s)
        self._scheduler.raise_if_failed()
        clock, self._clock = self._clock, None
        clock.remove()
        layers = clock.costs()
        total = sum(t.nbytes for t in self._tasks)
        sizes = [n for n in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
                 if n <= max(1 << 22, 2 * total)]
        if self._transport.name == "horovod":
            samples = self._transport.link_samples(sizes, repeats=3)
            # the order travels on a socket of legato's own ([Note: order outside Horovod]):
            # what it costs a message is in the fitted per-message charge below
            announce = 0.0
        else:
            samples = link_samples(group=self._transport.comm_group, sizes=sizes, repeats=3)
            announce = announce_s(self._transport.ctrl_group, repeats=7, warmup=1)
        report = None
        if self._transport.group_rank == 0:
            try:
                fit = fit_link(samples, world=self._transport.world)
            except ConfigError:
                # time does not grow with size: a link far faster than this job's messages
                # need; communication is as good as free (plain will be kept)
                fit = LinkFit(LinkModel(min(t for _, t in samples), 1e15,
                                        self._transport.world), tuple(samples), 0.0)
            measured = clock.step_time()
            extra = per_message_cost(self._tasks, layers, fit.link, self.config, measured)
            config, report = choose_by_simulation(
                self._tasks, layers, fit.link, merge_bytes=self.config.merge_bytes,
                announce_s=max(extra, announce),
                candidates=[self.config] if self._only_fixed else None)
            report = {**report, "per_message_s": extra, "measured_step_s": measured}
            report = {**report, "config": config, "link": fit.describe(),
                      "layers": [dataclasses.asdict(c) for c in layers]}
        report = self._transport.broadcast_object(report)
        config = report.pop("config")
        report["startup_s"] = time.perf_counter() - started
        self.startup = report
        if config != self.config:
            self.config = config
            self.plan = plan_for(self.config, self._tasks)
        log.info("[rank %d] legato: the simulator chose %s (predicted %.1f ms; plain %.1f ms; "
                 "link %s) after %d steps, in %.2f s", self._rank, self.config.describe(),
                 report["best_s" if config.policy != "plain" else "plain_s"] * 1e3,
                 report["plain_s"] * 1e3, report["link"], STARTUP_STEPS, report["startup_s"])
        self._start_scheduler()

    def _boundary(self) -> None:
        """A tuning boundary (every rank, same step): finish everything, let rank 0 decide the
        next settings, switch (see legato.core.scheduler.tune)."""
        self.synchronize()
        self._issued_before += self._scheduler.issued_total
        config = self._tuning.switch(self._steps.steps_called, self._scheduler,
                                     timeout_s=self._timeout_s,
                                     leader=self._transport.group_rank == 0,
                                     broadcast=self._transport.broadcast_object, rank=self._rank)
        if config is not None:
            self.config = config
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
        # Frozen parameters of the model (requires_grad=False) get no gradient, so the wrapped
        # optimizer skips them, as it does without legato and under DDP.
        frozen = {id(p) for p in model.parameters() if not p.requires_grad}
        extra = len(opt_ids - seen - frozen)
        if extra:
            raise ConfigError(f"the optimizer holds {extra} parameter(s) that are not "
                              "parameters of the model; legato schedules one model's gradients:"
                              " pass the model those parameters belong to (or one optimizer per "
                              "model, each in a ScheduledOptimizer of its own)")
        for p in model_params:
            if p.is_sparse or p.layout != torch.strided:
                raise ConfigError("sparse parameters are not supported; use dense ones")
        if not model_params:
            raise ConfigError("the model has no trainable parameters")
        return model_params

    def _check_same_plan(self) -> None:
        digests = self._transport.all_gather_object((self.plan.digest(), len(self._params),
                                                      self._tune, str(self._compression),
                                                      self._bpps))
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
    def _compute_hooks(self, modules) -> list:
        """Forward and backward spans per module holding parameters. A backward span runs
        from the gradient of the module's output to the last gradient of its own parameters:
        module backward hooks would warn ("Full backward hook is firing when gradients are
        computed with respect to module outputs") wherever no input needs a gradient."""
        tl = self._timeline
        index = {id(p): k for k, p in enumerate(self._params)}
        handles = []
        for name, module, _ in modules:
            name = name or type(module).__name__
            keys = [index[id(p)] for p in module.parameters(recurse=False) if id(p) in index]
            left = [len(keys)]

            def grad_in(_param, name=name, keys=keys, left=left) -> None:
                left[0] -= 1
                if not left[0]:
                    left[0] = len(keys)
                    tl.end("compute", ("b", name), f"backward {name}")

            def forward_done(m, a, out, name=name) -> None:
                tl.end("compute", ("f", name), f"forward {name}")
                first = next((t for t in _tensors(out) if t.requires_grad), None)
                if first is not None:
                    first.register_hook(lambda g, name=name: tl.begin("compute", ("b", name)))

            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: tl.begin("compute", ("f", name))))
            handles.append(module.register_forward_hook(forward_done))
            handles += [self._params[k].register_post_accumulate_grad_hook(grad_in)
                        for k in keys]
        return handles

    def write_timeline(self, path: str | os.PathLike | None = None) -> str | None:
        """Gather every rank's trace on rank 0 and write it there; returns the path on rank 0.

        A collective over legato's control group, which the scheduler uses while it runs: every
        rank calls it after `close()` (which calls it by itself when `timeline` was given).
        """
        if self._trace is None:
            raise ConfigError("no timeline is being recorded; pass timeline='trace.json'")
        if not self._steps.closed:
            raise ConfigError("write_timeline() runs after close(), on every rank")
        return self._trace.write(self._transport.all_gather_object,
                                 self._transport.group_rank == 0, path)

    # -- backward side -------------------------------------------------------------------------
    def _grad_of(self, key: int) -> torch.Tensor:
        return self._params[key].grad

    def _set_grad(self, key: int, grad: torch.Tensor) -> None:
        self._ours[key] = grad   # a view of a reduced buffer (TorchCommBackend)
        self._params[key].grad = grad

    def _make_grad_hook(self, key: int):
        def grad_ready(param: torch.Tensor) -> None:
            if self._posted[key]:
                raise LegatoError(
                    f"[rank {self._rank}] parameter {self._names[key]!r} received another "
                    "gradient after its all-reduce had started, before opt.step(). To accumulate"
                    f" gradients over several backward passes, pass backward_passes_per_step=N"
                    " (Horovod's name) or run the earlier passes under `with opt.no_sync():` "
                    "(DDP's); if another loss back-propagates into these parameters (a GAN's "
                    "generator loss through the discriminator), detach it or freeze these "
                    "parameters (requires_grad_(False)) for that backward")
            if self._no_sync:
                return
            self._passes[key] += 1
            if self._passes[key] < self._bpps:
                return
            self._passes[key] = 0
            grad = param.grad
            self._posted[key] = True
            self._open_posts += 1
            self._taken[key] = (grad, grad._version)
            if self._amp:
                self._bad[key] = torch.logical_not(torch.isfinite(grad).all())
            self._scheduler.tensor_ready(key)
        return grad_ready

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally during this block (DDP's `no_sync()`): the backward
        passes inside send nothing; the first backward after it all-reduces the sums."""
        before, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = before

    def _check_reduced(self, key: int, writes) -> None:
        """A gradient is reduced: fail if anyone but legato wrote to it while it was in flight
        ([Note: gradients changed in flight]); note the reduced tensor and its version."""
        grad_then, version_then = self._taken[key]
        now = self._params[key].grad
        ours = writes.take(key) if writes is not None else None
        if now is grad_then:
            changed = ours is not None and now._version != version_then + ours
        else:  # legato replaced it by a view of the reduced buffer, or the user replaced it
            changed = (now is None or now is not self._ours[key]
                       or grad_then._version != version_then)
        if changed:
            raise LegatoError(self._changed_message(key, "while it was being all-reduced"))
        self._reduced[key] = (now, now._version)

    def _check_unchanged(self, keys, step: int) -> None:
        """Before `step`'s update: the reduced gradients of `keys` must be as legato left them,
        unless the user waited for them (synchronize) and may change them."""
        if self._synced_step == step:
            return
        for key in keys:
            grad, version = self._reduced[key]
            now = self._params[key].grad
            if now is not grad or now._version != version:
                raise LegatoError(self._changed_message(key, "after it was reduced"))

    def _changed_message(self, key: int, when: str) -> str:
        return (f"[rank {self._rank}] the gradient of {self._names[key]!r} was changed {when}, "
                "between loss.backward() and opt.step(), before legato's all-reduce was waited "
                "for (clip_grad_norm_, scaler.unscale_ or an in-place edit of .grad?): the ranks"
                " would drift apart. Call opt.synchronize() first, as with Horovod (then clip "
                "and call opt.step()), or pass clip_grad_norm=MAX to ScheduledOptimizer")

    def _chunk_done(self, chunk) -> None:
        """A chunk's collective finished (backend thread): check the gradients that are now
        complete, and queue layers whose gradients are all in.

        In pass-through (`plain`) the optimizer steps once, in `step()`, after every chunk."""
        complete, ready_layers = self._progress.chunk_done(chunk)
        if self._passthrough:
            ready_layers = []
        writes = getattr(self._backend_now, "writes", None)
        for key in complete:
            self._check_reduced(key, writes)
        for layer in ready_layers:
            self._updater.put(layer)

    # -- updates -------------------------------------------------------------------------------
    def _update_layer(self, layer: int, step: int) -> None:
        """One layer's update of `step` (legato's updater thread, once the step was called):
        check its gradients were left alone, unscale them under mixed precision, step the
        layer's view of the optimizer, drop the gradients and open the layer's gate."""
        started = time.perf_counter()
        keys = self._keys_of_layer[layer]
        self._check_unchanged(keys, step)
        if self._amp_allows(self._steps.info(step), keys, self._layer_names[layer], step):
            with _profiled(f"legato.update {self._layer_names[layer]}"):
                self._views[layer][0].step()
        for key in keys:
            self._params[key].grad = None
            self._posted[key] = False
            self._bad[key] = None
        self._gates.release(layer)
        if self._timeline is not None:
            self._timeline.span("update", f"update {self._layer_names[layer]}", started,
                                time.perf_counter())
        clock = self._clock
        if clock is not None:
            clock.add_update(layer, time.perf_counter() - started)
        self._steps.layers_done([layer])

    def _amp_allows(self, amp, keys: list[int], what: str, step: int) -> bool:
        """Mixed precision, before an update of `keys` in `step` with that step's `amp` =
        (inverse scale or None when already unscaled, skip) or None (no scaler): whether to
        step them, after unscaling their reduced gradients with GradScaler's kernel ([Note:
        mixed precision])."""
        if amp is None:
            return True
        inv_scale, skip = amp
        if skip:
            return False
        if inv_scale is None:
            return True
        grads = [self._params[k].grad for k in keys]
        found = torch.zeros((), dtype=torch.float32, device=inv_scale.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale)
        if found.item():
            self._steps.update_skipped(step, what)
            return False
        return True

    def _wake_gates(self) -> None:
        gates = getattr(self, "_gates", None)
        if gates is not None:
            gates.wake()

    def _raise_if_failed(self) -> None:
        self._steps.raise_if_failed(self._scheduler.error)

    # -- the optimizer interface ---------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._opt

    @property
    def param_groups(self):  # type: ignore[override]
        """The wrapped optimizer's groups. Read between loss.backward() and opt.step() (as
        `scaler.unscale_(opt)` does), it first waits for the step's gradients, which DDP has
        all-reduced by then ([Note: gradients changed in flight])."""
        if (self._open_posts == len(self._params)
                and self._synced_step != self._steps.steps_called
                and not self._steps.closed and self._steps.error is None):
            self._wait_grads()
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

    # GradScaler hands itself to step() instead of reading the gradients ([Note: mixed
    # precision]); it warns that this hand-over will change, which is not the user's concern.
    _step_supports_amp_scaling = True

    def step(self, closure=None, grad_scaler=None):  # type: ignore[override]
        """Start this step's updates; returns before they are done (see `synchronize`).

        `grad_scaler` is passed by `torch.amp.GradScaler.step(opt)`; call that, not this."""
        if closure is not None:
            raise ConfigError("ScheduledOptimizer.step() does not take a closure; call "
                              "loss.backward() before opt.step()")
        if self._steps.closed:
            raise LegatoError("this ScheduledOptimizer is closed")
        if not self._ddp_checked:  # a DDP built after this optimizer (it writes the gradients
            self._ddp_checked = True  # too, so it is named before any failure it caused)
            wrapper = _ddp_wrapping(self._model)
            if wrapper is not None:
                raise ConfigError(_ddp_message(wrapper))
        self._raise_if_failed()
        if self._no_sync:
            raise ConfigError("opt.step() inside `with opt.no_sync():` would update with "
                              "gradients that were never all-reduced; leave the block for the "
                              "last backward pass, then step")
        missing = [k for k, posted in enumerate(self._posted) if not posted]
        if missing:
            names = [self._names[k] for k in missing]
            passes = max(self._passes[k] for k in missing)
            if passes and self._bpps > 1:
                raise LegatoError(
                    f"[rank {self._rank}] opt.step() after {passes} of the "
                    f"{self._bpps} backward passes per step (backward_passes_per_step="
                    f"{self._bpps}): call backward {self._bpps} times before each step")
            raise LegatoError(
                f"[rank {self._rank}] step {self._steps.steps_called}: {len(missing)} "
                "parameter(s) got "
                f"no gradient in this step ({', '.join(names[:5])}"
                f"{', ...' if len(names) > 5 else ''}); every rank must all-reduce every "
                "trainable parameter: call loss.backward() before opt.step(), and freeze "
                "(requires_grad=False) parameters the loss does not use")
        amp = self._amp_decision(grad_scaler) if grad_scaler is not None else None
        if self._clip is not None:
            amp = self._clip_now(amp)
        if self._passthrough:
            self._step_plain(amp)
        else:
            self._sync_views()
            self._gates.finish_observing()
            self._gates.hold_all(self._steps.steps_called)
            self._open_posts = 0
            self._steps.call_step(amp)
        if self._trace is not None:
            self._trace.step_called()
        if self._tuning is not None and self._tuning.step_called(self._steps.steps_called):
            self._boundary()
            self._tuning.restarted()
        if self._clock is not None and self._steps.steps_called == STARTUP_STEPS:
            self._choose_by_simulation()
        return None

    def _amp_decision(self, scaler) -> tuple[torch.Tensor | None, bool] | None:
        """This step's (inverse scale to unscale with at each update, or None when already
        unscaled; skip it) under GradScaler, with the scaler's found_inf set to the ranks'
        shared answer ([Note: mixed precision])."""
        from torch.amp.grad_scaler import OptState

        if not scaler.is_enabled():
            return None
        state = scaler._per_optimizer_states[id(self)]
        if state["stage"] is not OptState.UNSCALED and (
                not self._amp or any(b is None for b in self._bad)):
            self._amp = True             # flags from the next backward on
            scaler.unscale_(self)        # reads param_groups, which waits for the gradients
        self._amp = True
        if state["stage"] is OptState.UNSCALED:  # checked on the reduced gradients
            found = bool(sum(float(v.item()) for v in state["found_inf_per_device"].values()))
            if found:
                self._steps.skipped(self._steps.steps_called)
            return None, found
        local = bool(torch.stack([b.to("cpu") for b in self._bad]).any().item())
        with _profiled("legato.overflow_flag"):
            skip = self._transport.any_flag(local)
        if skip:
            self._steps.skipped(self._steps.steps_called)
        scale = scaler._scale
        state["found_inf_per_device"] = {scale.device: torch.full(
            (), 1.0 if skip else 0.0, dtype=torch.float32, device=scale.device)}
        return scale.double().reciprocal().float(), skip

    def _clip_now(self, amp):
        """`clip_grad_norm=`: wait for every gradient, unscale them if a scaler asks, clip."""
        self._wait_grads()
        if amp is not None and amp[1]:
            return amp                   # a skipped step: nothing to clip
        if amp is not None and amp[0] is not None:
            found = torch.zeros((), dtype=torch.float32, device=amp[0].device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                [p.grad for p in self._params], found, amp[0])
            amp = (None, False)
        torch.nn.utils.clip_grad_norm_(self._params, self._clip)
        return amp

    def _wait_this_step(self) -> None:
        """Wait until this step's chunks are all reduced (the scheduler counts from its start)."""
        self._scheduler.wait_steps(self._steps.steps_called - self._scheduler_step0 + 1,
                                   self._timeout_s)

    def _wait_grads(self) -> None:
        """Wait for this step's gradients; from then on the user may read and change them
        before opt.step() ([Note: gradients changed in flight])."""
        if self._synced_step != self._steps.steps_called:
            self._wait_this_step()
            self._synced_step = self._steps.steps_called

    def _step_plain(self, amp) -> None:
        """Pass-through: wait for every bucket, then one step of the wrapped optimizer."""
        self._wait_this_step()
        self._check_unchanged(range(len(self._params)), self._steps.steps_called)
        self._gates.finish_observing()
        started = time.perf_counter()
        if self._amp_allows(amp, list(range(len(self._params))), "the model",
                            self._steps.steps_called):
            self._opt.step()
        for key, p in enumerate(self._params):
            p.grad = None
            self._posted[key] = False
            self._bad[key] = None
        if self._timeline is not None:
            self._timeline.span("update", "update (all layers)", started, time.perf_counter())
        self._open_posts = 0
        self._steps.call_step()
        self._steps.step_done()

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients the user does not want sent ([Note: cleared gradients]); after a
        step, nothing to do: each gradient is cleared right after its update."""
        if not self._open_posts or self._steps.closed:
            # Gradients accumulated locally (no_sync, backward_passes_per_step) and not yet
            # sent; those of the last step wait for their update, which clears them.
            for key, p in enumerate(self._params):
                if not self._posted[key] and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()
                    self._passes[key] = 0
            return
        if self._open_posts < len(self._params):
            raise LegatoError(
                f"[rank {self._rank}] zero_grad() after a backward pass that reached "
                f"{self._open_posts} of {len(self._params)} parameters: their all-reduce has "
                "started and cannot be taken back. Freeze (requires_grad_(False)) or detach "
                "what that backward pass should not reach")
        # Their all-reduce has started on every rank and cannot be recalled: let it finish,
        # then drop its result (the layers it queued are never updated).
        self._wait_this_step()
        self._scheduler_step0 -= 1   # the scheduler counted that round as a step
        self._steps.void_round()
        for key, p in enumerate(self._params):
            self._posted[key] = False
            self._bad[key] = None
            self._passes[key] = 0
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = torch.zeros_like(p.grad)  # not the reduced buffer's view
        self._open_posts = 0
        self._synced_step = -1

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Wait until every transfer and update of the steps taken so far is done; called
        between loss.backward() and opt.step(), also until this step's gradients are
        all-reduced, so that they can be read and changed (clipped) before opt.step(), as with
        Horovod's `optimizer.synchronize()`."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        if self._open_posts and not self._steps.closed:
            if self._open_posts < len(self._params):
                raise LegatoError(
                    f"[rank {self._rank}] synchronize() during a backward pass: "
                    f"{len(self._params) - self._open_posts} of {len(self._params)} gradients "
                    "of this step are not in yet; call it after loss.backward()")
            self._wait_grads()
        self._wait_updates(timeout)

    def _wait_updates(self, timeout: float) -> None:
        self._steps.wait_updated(timeout_s=timeout, check=self._raise_if_failed)

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
        if self._steps.closed:
            return
        timeout = self._timeout_s if timeout_s is None else timeout_s

        def unhook() -> None:
            for h in self._hooks:
                h.remove()
            clock, self._clock = self._clock, None   # closed before the start-up choice
            if clock is not None:
                clock.remove()
            self._gates.release_all()
            self._gates.remove()
            self._forget_exit()

        close_scheduled(self._steps, self._scheduler, timeout_s=timeout, rank=self._rank,
                        wait=self._wait_updates,
                        steps=[lambda: self._updater.stop(timeout), unhook], trace=self._trace,
                        all_gather=self._transport.all_gather_object,
                        lead=self._transport.group_rank == 0,
                        release=lambda healthy: self._transport.close(healthy=healthy))

    def __repr__(self) -> str:
        return (f"ScheduledOptimizer({type(self._opt).__name__}, {self.config.describe()}, "
                f"{self.plan.describe()})")

    @property
    def startup_pending(self) -> bool:
        """Whether the start-up steps of defaults="simulated" are still running (the same on
        every rank at every step)."""
        return self._clock is not None

    @property
    def tuning(self) -> bool:
        """Whether tuning trials are running (the same on every rank at every step)."""
        return self._tuning is not None and self._tuning.tuning

    @property
    def stats(self) -> dict[str, Any]:
        return {**self._steps.stats(self.plan, self.config,
                                    self._issued_before + self._scheduler.issued_total),
                "tuner": None if self._tuning is None or self._transport.group_rank != 0
                else self._tuning.summary()}

