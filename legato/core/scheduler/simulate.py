"""A discrete-event simulator of data-parallel steps under a scheduling policy.

It runs the scheduler's own pieces, not a model of them: the `ChunkPlan` (partitions, merges),
the policy's priorities (`priority_of`) and the priority queue with its credit window (the
pure-Python queue, driven through its pull API in simulated time). Around them it models:

- compute: per layer, forward and backward times; forward of layer i in step k+1 starts when
  forward of layer i-1 is done and, with dependency proxies (`overlap=True`), when layer i's own
  update of step k is done; without them (`overlap=False`, a global barrier as in DDP and
  Horovod) when every update of step k is done;
- the link: a first-in first-out pipe (as a token bucket or a switch queue is). A message is
  not one transfer but the rounds of its algorithm (ring all-reduce: 2 (n-1) rounds of bytes/n;
  parameter server: push, then pull), and each round joins the end of the pipe only when the
  previous one is done; so a small message committed beside a large one waits behind it once
  per round, as measured on shaped loopback. Alone, a message takes
  `LinkModel.message_s(bytes)` (alpha + bytes / bandwidth times 2 (n-1)/n for the ring, or 2
  for a parameter server);
- updates: a layer's update starts when all its chunks have arrived (and, without overlap,
  after backward), and takes `update_s`; updates run one at a time.

`simulate()` returns the steady-state step time and every span, which `SimResult.timeline()`
turns into a Chrome trace like the real one.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Sequence

from legato.core.errors import ConfigError
from legato.core.scheduler._pyqueue import PythonPriorityQueue
from legato.core.scheduler.plan import ChunkPlan, CommTask
from legato.core.scheduler.policy import SchedulerConfig, priority_of

__all__ = ["LayerCost", "LinkFit", "LinkModel", "SimResult", "fit_compute_scale", "fit_link",
           "scale_costs", "simulate"]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Compute time of one layer (seconds): forward, backward, and its optimizer update."""

    name: str
    forward_s: float
    backward_s: float
    update_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class LinkModel:
    """Time of one message: alpha + factor * bytes / bytes_per_s.

    Args:
        alpha_s: fixed cost per message (latency, framework overhead).
        bytes_per_s: bandwidth available to one rank's collective.
        world: number of ranks.
        algorithm: "ring" (all-reduce: factor 2 (n-1)/n) or "ps" (push then pull: factor 2).
    """

    alpha_s: float
    bytes_per_s: float
    world: int = 2
    algorithm: str = "ring"

    def __post_init__(self) -> None:
        if self.alpha_s < 0 or self.bytes_per_s <= 0 or self.world < 1:
            raise ConfigError(f"invalid link model {self}: alpha_s >= 0, bytes_per_s > 0 and "
                              "world >= 1 are required")
        if self.algorithm not in ("ring", "ps"):
            raise ConfigError(f"algorithm={self.algorithm!r} is unknown; known: ring, ps")

    @property
    def rounds(self) -> int:
        """Transfers one message takes, each after the previous one is done."""
        if self.world == 1:
            return 0
        return 2 * (self.world - 1) if self.algorithm == "ring" else 2

    def round_s(self, nbytes: int) -> float:
        """Time of one round of a message's transfer (alpha not included)."""
        return (self.message_s(nbytes) - self.alpha_s) / self.rounds if self.rounds else 0.0

    def message_s(self, nbytes: int) -> float:
        if self.world == 1:
            return 0.0
        factor = 2 * (self.world - 1) / self.world if self.algorithm == "ring" else 2.0
        return self.alpha_s + factor * nbytes / self.bytes_per_s


@dataclasses.dataclass(frozen=True)
class LinkFit:
    """A link model fitted to measured message times, and how well it fits."""

    link: LinkModel
    samples: tuple[tuple[int, float], ...]
    max_rel_error: float  # worst |predicted / measured - 1| over the larger samples (>= 1/16
    # of the largest)

    def describe(self) -> str:
        return (f"alpha {self.link.alpha_s * 1e6:.0f} us, "
                f"{self.link.bytes_per_s * 8 / 1e6:.0f} Mbit/s per rank "
                f"({len(self.samples)} sizes, worst error {self.max_rel_error:.0%})")


def fit_link(samples, *, world: int, algorithm: str = "ring") -> LinkFit:
    """Least-squares fit of alpha + factor * bytes / B to (bytes, seconds) samples, measured by
    a microbenchmark on the real backend (median time of one collective per size).

    Two stages: the bandwidth is an ordinary least-squares slope over the larger half of the
    sizes (a step's communication time is dominated by large messages, and small ones through
    a token bucket (tc tbf) can pass faster than its rate), then alpha is the median of what
    that leaves of every sample's time, clamped at 0.
    """
    samples = tuple((int(n), float(t)) for n, t in samples)
    sizes = sorted({n for n, _ in samples})
    if len(sizes) < 2:
        raise ConfigError(f"fit_link needs samples of at least 2 message sizes, got {sizes}")
    if any(t <= 0 or n < 0 for n, t in samples):
        raise ConfigError("fit_link: message times must be positive and sizes non-negative")
    factor = LinkModel(0.0, 1.0, world, algorithm).message_s(1) if world > 1 else 0.0
    if factor == 0.0:
        raise ConfigError("fit_link: a one-rank group has no link to fit")
    large = [(factor * n, t) for n, t in samples if n >= sizes[len(sizes) // 2 - 1]]
    mx = sum(x for x, _ in large) / len(large)
    my = sum(t for _, t in large) / len(large)
    sxx = sum((x - mx) ** 2 for x, _ in large)
    c = sum((x - mx) * (t - my) for x, t in large) / sxx if sxx else 0.0
    if c <= 0:
        raise ConfigError("fit_link: message time does not grow with size in these samples; "
                          "measure larger messages (several MiB)")
    rest = sorted(t - c * factor * n for n, t in samples)
    a = max(0.0, rest[len(rest) // 2])
    link = LinkModel(alpha_s=a, bytes_per_s=1.0 / c, world=world, algorithm=algorithm)
    worst = max(abs(link.message_s(n) / t - 1) for n, t in samples if n >= max(sizes) // 16)
    return LinkFit(link, samples, worst)


def scale_costs(layers: Sequence[LayerCost], factor: float) -> list[LayerCost]:
    """Every forward, backward and update time times `factor`."""
    return [dataclasses.replace(c, forward_s=c.forward_s * factor,
                                backward_s=c.backward_s * factor,
                                update_s=c.update_s * factor) for c in layers]


def fit_compute_scale(plan: ChunkPlan, layers: Sequence[LayerCost], config: SchedulerConfig,
                      link: LinkModel, measured_step_s: float, *, overlap: bool = False,
                      lo: float = 0.5, hi: float = 4.0) -> float:
    """The factor on compute times that makes the simulated step of a *baseline* (typically
    DDP: `plain`, no overlap) equal its measured step.

    Layer costs profiled alone are too small when compute shares cores with communication
    threads (reduction, copies, the kernel's loopback TCP) and with the job's own bookkeeping;
    one measured step of the baseline the job already runs calibrates that, and the factor then
    serves every other policy's prediction. Bisection; the step time grows with the factor.
    """
    def step(factor: float) -> float:
        return simulate(plan, scale_costs(layers, factor), config, link, steps=8,
                        overlap=overlap).step_s

    if step(lo) >= measured_step_s:
        return lo
    if step(hi) <= measured_step_s:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        if step(mid) < measured_step_s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclasses.dataclass
class SimResult:
    """Step times and spans (lane, name, start_s, end_s) of a simulated run."""

    step_s: float
    step_times_s: list[float]
    spans: list[tuple[str, str, float, float]]

    def timeline(self, rank: int = 0) -> list[dict]:
        """The spans as Chrome trace events (see legato.core.timeline)."""
        from legato.core.timeline import LANES

        return [{"name": name, "cat": lane, "ph": "X", "pid": rank,
                 "tid": LANES.get(lane, len(LANES)), "ts": start * 1e6,
                 "dur": (end - start) * 1e6} for lane, name, start, end in self.spans]


def _check(plan: ChunkPlan, layers: Sequence[LayerCost], steps: int) -> None:
    if steps < 2:
        raise ConfigError(f"steps={steps} is too few; simulate at least 2 steps (the first has "
                          "no previous updates to wait for)")
    used = {t.layer for t in plan.tasks}
    if used and max(used) >= len(layers):
        raise ConfigError(f"the plan has tasks in layer {max(used)} but only {len(layers)} "
                          "layer costs were given")
    for layer in layers:
        if min(layer.forward_s, layer.backward_s, layer.update_s) < 0:
            raise ConfigError(f"layer {layer.name!r} has a negative time")


def simulate(plan: ChunkPlan, layers: Sequence[LayerCost], config: SchedulerConfig,
             link: LinkModel, *, steps: int = 6, overlap: bool = True) -> SimResult:
    """Simulate `steps` training steps; the step time is the mean of the last half."""
    _check(plan, layers, steps)
    sim = _Sim(plan, layers, config, link, steps, overlap)
    return sim.run()


class _Sim:
    """Event loop state; see the module docstring for the model."""

    def __init__(self, plan: ChunkPlan, layers: Sequence[LayerCost], config: SchedulerConfig,
                 link: LinkModel, steps: int, overlap: bool) -> None:
        self.plan, self.layers, self.config, self.link = plan, list(layers), config, link
        self.steps, self.overlap = steps, overlap
        n = len(self.layers)
        self.tasks_of_layer: list[list[CommTask]] = [[] for _ in range(n)]
        for task in plan.tasks:
            self.tasks_of_layer[task.layer].append(task)
        self.events: list[tuple[float, int, str, int]] = []
        self.seq = itertools.count()
        self.spans: list[tuple[str, str, float, float]] = []
        self.queue = PythonPriorityQueue(config.credit_bytes, "overshoot")
        self.arrival = itertools.count()
        self.ready_parts = [0] * len(plan.chunks)
        self.chunks_left = {t.key: len(plan.chunks_of(t.key)) for t in plan.tasks}
        self.tasks_left = [len(ts) for ts in self.tasks_of_layer]
        self.chunks_left_in_step = len(plan.chunks)
        self.link_free_at = 0.0
        self.msg_start: dict[int, float] = {}
        self.rounds_left: dict[int, int] = {}
        self.update_free_at = 0.0
        self.updates_done = [0] * n
        self.deferred: list[int] = []  # barrier mode: layers waiting for the whole step
        self.step = 0
        self.fwd_layer = 0
        self.waiting = False  # compute idle, waiting for an update before a forward
        self.backward_end = 0.0
        self.step_starts: list[float] = []

    def at(self, t: float, kind: str, payload: int = -1) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> SimResult:
        self.try_forward(0.0)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            getattr(self, "on_" + kind)(now, payload)
        self.queue.shutdown(drain=False)
        if len(self.step_starts) < self.steps:
            raise ConfigError(f"simulation stalled after {len(self.step_starts)} of "
                              f"{self.steps} steps; is every layer's gradient in the plan?")
        deltas = [b - a for a, b in zip(self.step_starts, self.step_starts[1:])]
        tail = deltas[len(deltas) // 2:]
        return SimResult(sum(tail) / len(tail), deltas, self.spans)

    # -- compute ------------------------------------------------------------------------------
    def try_forward(self, now: float) -> None:
        i = self.fwd_layer
        need = self.step  # updates of steps 0 .. step-1
        done = self.updates_done[i] if self.overlap else min(self.updates_done)
        if done < need:
            self.waiting = True
            return
        self.waiting = False
        if i == 0:
            self.step_starts.append(now)
        end = now + self.layers[i].forward_s
        self.spans.append(("compute", f"forward {self.layers[i].name}", now, end))
        self.at(end, "forward_done", i)

    def on_forward_done(self, now: float, i: int) -> None:
        if i + 1 < len(self.layers):
            self.fwd_layer = i + 1
            self.try_forward(now)
            return
        t = now
        for j in reversed(range(len(self.layers))):
            end = t + self.layers[j].backward_s
            self.spans.append(("compute", f"backward {self.layers[j].name}", t, end))
            self.at(end, "grads", j)
            t = end
        self.backward_end = t
        self.at(t, "backward_done")

    def on_backward_done(self, now: float, _: int) -> None:
        self.step += 1
        if self.step < self.steps:
            self.fwd_layer = 0
            self.try_forward(now)

    # -- communication ------------------------------------------------------------------------
    def on_grads(self, now: float, layer: int) -> None:
        if not self.tasks_of_layer[layer]:
            self.layer_reduced(now, layer)
        for task in self.tasks_of_layer[layer]:
            for cid in self.plan.chunks_of(task.key):
                self.ready_parts[cid] += 1
                if self.ready_parts[cid] == len(self.plan.chunks[cid].parts):
                    self.ready_parts[cid] = 0
                    chunk = self.plan.chunks[cid]
                    self.queue.post(cid, priority_of(self.config, chunk, next(self.arrival)),
                                    chunk.nbytes)
        self.pump(now)

    def pump(self, now: float) -> None:
        """Commit admissible messages to the link: each one's first round joins the pipe."""
        while (task := self.queue.try_pop()) is not None:
            chunk = self.plan.chunks[task.id]
            self.msg_start[chunk.id] = now
            if self.link.rounds == 0:
                self.at(now, "round_done", chunk.id)
                continue
            self.rounds_left[chunk.id] = self.link.rounds
            self.send_round(now, chunk.id, self.link.alpha_s)

    def send_round(self, now: float, cid: int, extra_s: float = 0.0) -> None:
        start = max(now, self.link_free_at)
        end = start + extra_s + self.link.round_s(self.plan.chunks[cid].nbytes)
        self.link_free_at = end
        self.at(end, "round_done", cid)

    def on_round_done(self, now: float, cid: int) -> None:
        self.rounds_left[cid] = self.rounds_left.get(cid, 1) - 1
        if self.rounds_left[cid] > 0:
            self.send_round(now, cid)
            return
        chunk = self.plan.chunks[cid]
        self.spans.append(("comm", f"msg {chunk.id} ({chunk.nbytes} B)", self.msg_start[cid], now))
        self.on_sent(now, cid)

    def on_sent(self, now: float, cid: int) -> None:
        self.queue.complete(cid)
        for part in self.plan.chunks[cid].parts:
            self.chunks_left[part.key] -= 1
            if self.chunks_left[part.key] == 0:
                self.chunks_left[part.key] = len(self.plan.chunks_of(part.key))
                layer = self.plan.task(part.key).layer
                self.tasks_left[layer] -= 1
                if self.tasks_left[layer] == 0:
                    self.tasks_left[layer] = len(self.tasks_of_layer[layer])
                    self.layer_reduced(now, layer)
        self.chunks_left_in_step -= 1
        if self.chunks_left_in_step == 0:
            self.chunks_left_in_step = len(self.plan.chunks)
            if not self.overlap:  # barrier: the optimizer steps once everything is in
                for layer in self.deferred:
                    self.start_update(now, layer)
                self.deferred.clear()
        self.pump(now)

    # -- updates ------------------------------------------------------------------------------
    def layer_reduced(self, now: float, layer: int) -> None:
        if self.overlap:
            self.start_update(now, layer)
        else:
            self.deferred.append(layer)
            if not self.plan.chunks:
                self.start_update(now, self.deferred.pop())

    def start_update(self, now: float, layer: int) -> None:
        start = max(now, self.update_free_at, self.backward_end)
        end = start + self.layers[layer].update_s
        self.update_free_at = end
        self.spans.append(("update", f"update {self.layers[layer].name}", start, end))
        self.at(end, "updated", layer)

    def on_updated(self, now: float, layer: int) -> None:
        self.updates_done[layer] += 1
        if self.waiting:
            self.try_forward(now)
