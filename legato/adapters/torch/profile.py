"""Measurements the simulator needs, taken on the real model and the real backend.

- `layer_costs`: per-layer forward, backward and update times of a model, in legato's layers
  (modules holding parameters, in registration order; the same layers ScheduledOptimizer
  schedules), from stock hooks on a few real training steps without communication;
- `comm_tasks`: the model's gradients as `CommTask`s, keyed and layered as ScheduledOptimizer
  keys and layers them;
- `link_samples`: median time of one all-reduce per message size on a process group, for
  `legato.core.scheduler.simulate.fit_link` (alpha and bandwidth).

Together they let `simulate()` predict a policy's step time before a job runs
(`legato bench scheduler --simulate`).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from legato.adapters.torch.optimizer import _layers_of
from legato.core.errors import ConfigError
from legato.core.scheduler.plan import CommTask
from legato.core.scheduler.simulate import LayerCost

__all__ = ["LiveClock", "announce_s", "comm_tasks", "layer_costs", "link_samples"]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ConfigError("the model has no trainable parameters")
    return params


def comm_tasks(model: torch.nn.Module) -> tuple[list[CommTask], list[str]]:
    """The model's gradients as CommTasks (ScheduledOptimizer's keys and layers), and the
    layer names."""
    params = _trainable(model)
    layer_of, _, layer_names = _layers_of(model, params)
    names = {id(p): n for n, p in model.named_parameters()}
    tasks = [CommTask(key, names[id(p)], layer_of[id(p)], p.numel() * p.element_size(),
                      p.element_size(), str(p.dtype)) for key, p in enumerate(params)]
    return tasks, layer_names


def _clock(devices) -> Callable[[], float]:
    """time.perf_counter, after waiting for the work queued on `devices`' CUDA devices (none:
    the plain clock), so that a reading covers the kernels launched before it."""
    cuda = sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"},
                  key=str)
    if not cuda:
        return time.perf_counter

    def now() -> float:
        for device in cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def layer_costs(model: torch.nn.Module, run_loss: Callable[[], torch.Tensor],
                optimizer: torch.optim.Optimizer | None = None, *, steps: int = 8,
                warmup: int = 2) -> list[LayerCost]:
    """Median per-layer forward, backward and update times over `steps` steps.

    `run_loss()` runs the forward pass and returns the loss. Forward time of a layer is the time
    from the end of the previous layer's module forward to the end of its own (so activations
    and other parameter-free modules between them count for the next layer, and the loss for
    the last); backward time is the time between consecutive layers' gradients becoming ready;
    the optimizer's step time (if given) is split over layers by parameter bytes. Every step's
    layer times add up to its measured forward and backward time. On CUDA parameters every
    clock reading first synchronizes their device (kernels run after their launch returns).
    """
    if steps < 1 or warmup < 0:
        raise ConfigError("steps must be >= 1 and warmup >= 0")
    params = _trainable(model)
    layer_of, modules, layer_names = _layers_of(model, params)
    n = len(layer_names)
    now = _clock(p.device for p in params)
    owner = _owners(modules)
    fwd_end: dict[int, float] = {}
    grad_at: dict[int, float] = {}
    handles = []
    for layer, module in owner.items():
        handles.append(module.register_forward_hook(
            lambda m, a, o, layer=layer: fwd_end.__setitem__(layer, now())))
    for p in params:
        layer = layer_of[id(p)]
        handles.append(p.register_post_accumulate_grad_hook(
            lambda _p, layer=layer: grad_at.__setitem__(layer, now())))
    nbytes = [0] * n
    for p in params:
        nbytes[layer_of[id(p)]] += p.numel() * p.element_size()
    fwd: list[list[float]] = [[] for _ in range(n)]
    bwd: list[list[float]] = [[] for _ in range(n)]
    upd: list[float] = []
    try:
        for i in range(warmup + steps):
            fwd_end.clear()
            grad_at.clear()
            t0 = now()
            loss = run_loss()
            t1 = now()
            loss.backward()
            t2 = now()
            if optimizer is not None:
                optimizer.step()
            t3 = now()
            model.zero_grad(set_to_none=True)
            if i < warmup:
                continue
            _split(fwd, sorted(fwd_end.items(), key=lambda kv: kv[1]), t0, t1)
            _split(bwd, sorted(grad_at.items(), key=lambda kv: kv[1]), t1, t2)
            upd.append(t3 - t2)
    finally:
        for h in handles:
            h.remove()
    total = sum(nbytes) or 1
    update = statistics.median(upd) if upd else 0.0
    return [LayerCost(layer_names[i], statistics.median(fwd[i]) if fwd[i] else 0.0,
                      statistics.median(bwd[i]) if bwd[i] else 0.0, update * nbytes[i] / total)
            for i in range(n)]


def _owners(modules) -> dict[int, torch.nn.Module]:
    """Layer index -> the first module holding its parameters (`_layers_of`'s modules)."""
    owner: dict[int, torch.nn.Module] = {}
    for _, module, layers in modules:
        for layer in layers:
            owner.setdefault(layer, module)
    return owner


class LiveClock:
    """Per-layer forward and backward times of a job's own training steps, taken passively
    (forward hooks on the layers' modules and on the model, gradient hooks on the
    parameters), as `layer_costs` splits them, without the time a layer's forward waited in
    another pre-hook (legato's gate, for the previous step's update); update times are added
    by the caller (`add_update`). Steps are counted from one forward of the model to the
    next.

    Args:
        model: the model.
        params: its trainable parameters (ScheduledOptimizer's keys).
        layer_of: id(parameter) -> layer index; modules: (name, module, layers) per module
            owning layers; layer_names: the layers' names.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                 layer_of: dict[int, int], modules, layer_names: Sequence[str]) -> None:
        self._n = len(layer_names)
        self._names = list(layer_names)
        owner = _owners(modules)
        self._fwd: list[list[float]] = [[] for _ in range(self._n)]
        self._bwd: list[list[float]] = [[] for _ in range(self._n)]
        self._upd = [0.0] * self._n
        self._steps = 0
        self._periods: list[float] = []     # forward start to forward start: step times
        self._start: float | None = None
        self._fwd_end: dict[int, float] = {}
        self._grad_at: dict[int, float] = {}
        self._model_end: float | None = None
        self._handles = [model.register_forward_pre_hook(self._forward_starts),
                         model.register_forward_hook(self._forward_ends)]
        self._arrive: dict[int, float] = {}
        self._wait: dict[int, float] = {}
        for layer, module in owner.items():
            # before and after every other pre-hook (legato's gate waits in one): the wait for
            # the previous step's update is not forward time
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, layer=layer: self._arrive.__setitem__(layer, time.perf_counter()),
                prepend=True))
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, layer=layer: self._wait.__setitem__(
                    layer, self._wait.get(layer, 0.0) + time.perf_counter()
                    - self._arrive.get(layer, time.perf_counter()))))
            self._handles.append(module.register_forward_hook(
                lambda m, a, o, layer=layer: self._fwd_end.__setitem__(layer,
                                                                      time.perf_counter())))
        for p in params:
            layer = layer_of[id(p)]
            self._handles.append(p.register_post_accumulate_grad_hook(
                lambda _p, layer=layer: self._grad_at.__setitem__(layer, time.perf_counter())))

    def _forward_starts(self, *_) -> None:
        now = time.perf_counter()
        if self._start is not None:
            self._periods.append(now - self._start)
        self._close_step()
        self._start = now

    def _forward_ends(self, *_) -> None:
        self._model_end = time.perf_counter()

    def _close_step(self) -> None:
        """The previous step's times, once its backward is over (at the next forward)."""
        if self._start is None or self._model_end is None or not self._grad_at:
            return
        before = [len(xs) for xs in self._fwd]
        _split(self._fwd, sorted(self._fwd_end.items(), key=lambda kv: kv[1]), self._start,
               self._model_end)
        for layer, waited in self._wait.items():
            if len(self._fwd[layer]) > before[layer]:
                self._fwd[layer][-1] = max(0.0, self._fwd[layer][-1] - waited)
        self._wait.clear()
        self._arrive.clear()
        events = sorted(self._grad_at.items(), key=lambda kv: kv[1])
        _split(self._bwd, events, self._model_end, events[-1][1])
        self._steps += 1
        self._fwd_end.clear()
        self._grad_at.clear()
        self._model_end = None

    def add_update(self, layer: int, seconds: float) -> None:
        self._upd[layer] += seconds

    @property
    def steps(self) -> int:
        """Whole steps recorded (a step counts once the next forward begins)."""
        return self._steps

    def costs(self, skip: int = 1) -> list[LayerCost]:
        """Median times per layer over the recorded steps after the first `skip`; each
        layer's update time the mean over the steps recorded."""
        med = lambda xs: statistics.median(xs[skip:] if len(xs) > skip else xs) if xs \
            else 0.0  # noqa: E731
        steps = max(1, self._steps)
        return [LayerCost(self._names[i], med(self._fwd[i]), med(self._bwd[i]),
                          self._upd[i] / steps) for i in range(self._n)]

    def step_time(self, skip: int = 1) -> float:
        """The median time from one forward's start to the next's, after the first `skip`."""
        xs = self._periods[skip:] if len(self._periods) > skip else self._periods
        return statistics.median(xs) if xs else 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _split(out: list[list[float]], events: Sequence[tuple[int, float]], start: float,
           end: float) -> None:
    """Gaps between consecutive events go to the event's layer; the tail to the last one."""
    seen = set()
    prev = start
    for layer, at in events:
        out[layer].append(at - prev)
        seen.add(layer)
        prev = at
    if events:
        out[events[-1][0]][-1] += end - prev
    for layer in range(len(out)):
        if layer not in seen:
            out[layer].append(0.0)


def link_samples(group=None, sizes: Sequence[int] = (1 << 14, 1 << 16, 1 << 18, 1 << 20,
                                                    1 << 22, 1 << 24),
                 repeats: int = 7, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> list[tuple[int, float]]:
    """(bytes, median seconds) of one all-reduce per size on `group` (a collective: every rank
    of the group calls it). The slowest rank's time counts (max over ranks). The buffers are on
    `device` (a CUDA device for an NCCL group; with gloo, CUDA buffers add gloo's copies
    through host memory, as a CUDA job's gradients pay them), synchronized before each clock
    reading."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ConfigError("link_samples needs torch.distributed to be initialized")
    item = torch.tensor([], dtype=dtype).element_size()
    now = _clock([device])
    out = []
    for size in sizes:
        buf = torch.zeros(max(1, size // item), dtype=dtype, device=device)
        times = []
        for i in range(repeats + 1):
            now()
            dist.barrier(group=group)
            t0 = now()
            dist.all_reduce(buf, group=group)
            elapsed = torch.tensor([now() - t0], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
            if i:  # the first is a warm-up
                times.append(float(elapsed))
        out.append((buf.numel() * item, statistics.median(times)))
    return out


def announce_s(group=None, *, repeats: int = 15, warmup: int = 0) -> float:
    """Median time of the leader's announcement of one message (a broadcast of 65 int64 from
    the group's first rank, as legato's order channel sends it) on `group` (a collective:
    every rank of the group calls it); `warmup` untimed ones first. A per-message cost on top
    of the collective's own alpha."""
    import torch.distributed as dist

    ann = torch.zeros(65, dtype=torch.int64)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    times = []
    for i in range(warmup + repeats):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.broadcast(ann, src, group=group)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
