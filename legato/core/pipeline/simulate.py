"""A discrete-event simulator of pipeline schedules: makespan, bubble, peak memory, Gantt chart.

`simulate(schedule, costs, link)` runs each rank's actions in order on per-stage costs
(`StageCost`, one per stage and microbatch) and a link model (`Link`: alpha + bytes / B):

- compute (F, B, I, W) and STEP occupy their rank, one at a time, in program order;
- a send is issued at once (asynchronous) and its transfer takes `link.transfer_s(bytes)`
  on the directed link between the two ranks, one transfer at a time per direction, in the
  order the sender issues them; so communication overlaps compute;
- a receive blocks its rank until the data has arrived;
- ALLREDUCE s,k starts when every replica of stage s reaches it and takes a ring all-reduce
  of the stage's parameter bytes on `allreduce_link` (its own link: it does not contend with
  sends); its ranks are blocked meanwhile;
- STASH and RESTORE take no time (their cost is memory, which the verifier counts).

Bubble fraction = 1 - (compute time summed over ranks) / (ranks x makespan), where compute is
F, B, I and W. With equal stage costs, no communication and `optimizer_step_s=0`, GPipe and
1F1B give (p - 1) / (m + p - 1) and interleaved 1F1B (p - 1) / (v m + p - 1).

Peak memory of a rank = max over its program of, summed over its stages: parameter_bytes x
weight versions held + optimizer_state_bytes + activation_bytes x microbatches in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from legato.core._files import atomic_write
from legato.core.errors import ConfigError
from legato.core.pipeline.ir import Action, ActionKind, Schedule, ScheduleError
from legato.core.pipeline.verify import VerifyReport, verify

__all__ = ["Link", "SimResult", "Span", "StageCost", "simulate"]

K = ActionKind


@dataclasses.dataclass(frozen=True)
class Link:
    """A link whose transfer of n bytes takes alpha_s + n / bandwidth_Bps seconds.

    Args:
        alpha_s: fixed cost per message (latency).
        bandwidth_Bps: bytes per second (math.inf: free).
    """

    alpha_s: float = 0.0
    bandwidth_Bps: float = math.inf

    def __post_init__(self) -> None:
        if not self.alpha_s >= 0 or not self.bandwidth_Bps > 0:
            raise ConfigError(f"Link(alpha_s={self.alpha_s}, bandwidth_Bps="
                              f"{self.bandwidth_Bps}) is invalid; pass alpha_s >= 0 and "
                              "bandwidth_Bps > 0 (math.inf for a free link)")

    def transfer_s(self, nbytes: int) -> float:
        """Time of one point-to-point message of `nbytes`."""
        return self.alpha_s + nbytes / self.bandwidth_Bps

    def allreduce_s(self, nbytes: int, num_ranks: int) -> float:
        """Ring all-reduce of `nbytes` over `num_ranks`: 2(r-1)/r bytes/B + 2(r-1) alpha."""
        if num_ranks <= 1:
            return 0.0
        steps = 2 * (num_ranks - 1)
        return steps / num_ranks * nbytes / self.bandwidth_Bps + steps * self.alpha_s


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Costs of one stage for one microbatch (seconds, bytes).

    Args:
        forward_s, backward_s: forward and full-backward time.
        backward_input_s, backward_weight_s: the I and W halves of the backward (both or
            neither; default half of backward_s each).
        optimizer_step_s: one optimizer step of the stage.
        output_bytes: the activation sent to the next stage (its gradient comes back).
        activation_bytes: memory held per microbatch in flight (forward done, backward not).
        parameter_bytes: one weight version.
        optimizer_state_bytes: optimizer state (one copy, whatever the versions).
        send_s: processor time the sending rank spends issuing one message of this stage (its
            activation forward or its input gradient backward: copying, posting the isend);
            the rank goes on after it while the link carries the bytes. Measured in a
            pipeline's own run (`costs_from_timeline`); 0 when costs come from a profile.
    """

    forward_s: float
    backward_s: float
    backward_input_s: float | None = None
    backward_weight_s: float | None = None
    optimizer_step_s: float = 0.0
    output_bytes: int = 0
    activation_bytes: int = 0
    parameter_bytes: int = 0
    optimizer_state_bytes: int = 0
    send_s: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not value >= 0:
                raise ConfigError(f"StageCost.{f.name}={value!r} is invalid; pass a number "
                                  ">= 0")
        if (self.backward_input_s is None) != (self.backward_weight_s is None):
            raise ConfigError("StageCost: give both backward_input_s and backward_weight_s, or "
                              "neither (then each is half of backward_s)")

    @property
    def input_s(self) -> float:
        return self.backward_s / 2 if self.backward_input_s is None else self.backward_input_s

    @property
    def weight_s(self) -> float:
        return self.backward_s / 2 if self.backward_weight_s is None else self.backward_weight_s

    @classmethod
    def from_layers(cls, nodes: Sequence, *, batch_fraction: float = 1.0,
                    optimizer_step_s: float = 0.0) -> StageCost:
        """A stage made of profiled layers (`LayerNode`s, in forward order).

        Args:
            nodes: the stage's layers; the last one's output goes to the next stage.
            batch_fraction: microbatch size / profiled batch size; scales times and
                activation bytes, not parameters.
            optimizer_step_s: time of the stage's optimizer step.
        Returns:
            The summed costs.
        """
        if not nodes:
            raise ConfigError("StageCost.from_layers needs at least one layer")
        f = batch_fraction
        split = all(n.backward_input_s is not None for n in nodes)
        return cls(forward_s=f * sum(n.forward_s for n in nodes),
                   backward_s=f * sum(n.backward_s for n in nodes),
                   backward_input_s=f * sum(n.backward_input_s for n in nodes) if split else None,
                   backward_weight_s=f * sum(n.backward_weight_s for n in nodes) if split
                   else None,
                   optimizer_step_s=optimizer_step_s,
                   output_bytes=int(f * nodes[-1].activation_bytes),
                   activation_bytes=int(f * sum(n.activation_bytes for n in nodes)),
                   parameter_bytes=sum(n.parameter_bytes for n in nodes),
                   optimizer_state_bytes=sum(n.optimizer_state_bytes for n in nodes))


@dataclasses.dataclass(frozen=True)
class Span:
    """One action on the timeline: compute or a wait on its rank, a transfer for a send."""

    rank: int
    action: Action
    start_s: float
    end_s: float


@dataclasses.dataclass(frozen=True)
class SimResult:
    """What `simulate` predicts. Memory keys are ranks; `report` is the verifier's."""

    schedule: str
    makespan_s: float
    busy_s: dict[int, float]
    bubble_fraction: float
    peak_memory_bytes: dict[int, int]
    timeline: tuple[Span, ...]
    report: VerifyReport

    @property
    def stages(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, set[int]] = collections.defaultdict(set)
        for rank, stage in self.report.peak_in_flight:
            out[rank].add(stage)
        return {r: tuple(sorted(s)) for r, s in sorted(out.items())}

    def to_json(self) -> dict:
        """A JSON-ready dict: totals, per-rank results and the timeline."""
        r = self.report
        return {"schedule": self.schedule, "makespan_s": self.makespan_s,
                "bubble_fraction": self.bubble_fraction,
                "busy_s": {str(k): v for k, v in self.busy_s.items()},
                "peak_memory_bytes": {str(k): v for k, v in self.peak_memory_bytes.items()},
                "stages": [{"rank": rank, "stage": stage, "in_flight": n,
                            "weight_versions": r.peak_weight_versions[(rank, stage)],
                            "steps": r.steps[(rank, stage)]}
                           for (rank, stage), n in r.peak_in_flight.items()],
                "timeline": [[s.rank, str(s.action), s.start_s, s.end_s]
                             for s in self.timeline]}

    def gantt(self, path: str | os.PathLike, *, title: str | None = None, dpi: int = 100
              ) -> Path:
        """Draw the timeline as a PNG Gantt chart (ranks on y), written atomically.

        Args:
            path: the PNG to write (its folder is created).
            title: the chart title (default: schedule, makespan and bubble).
            dpi: resolution.
        Returns:
            The path written.
        """
        title = title or (f"{self.schedule}: makespan {self.makespan_s:.4g} s, bubble "
                          f"{self.bubble_fraction:.1%}")
        return atomic_write(path, lambda f: _draw_gantt(f, self.timeline, self.stages,
                                                        self.makespan_s, title, dpi),
                            binary=True, suffix=".png")


def _stage_costs(costs: StageCost | Sequence[StageCost], num_stages: int) -> list[StageCost]:
    if isinstance(costs, StageCost):
        return [costs] * num_stages
    costs = list(costs)
    if len(costs) != num_stages or not all(isinstance(c, StageCost) for c in costs):
        raise ConfigError(f"costs has {len(costs)} entries for a schedule of {num_stages} "
                          "stages; pass one StageCost per (virtual) stage, or one for all")
    return costs


def simulate(schedule: Schedule, costs: StageCost | Sequence[StageCost],
             link: Link = Link(), *, allreduce_link: Link | None = None,
             cores: int | None = None) -> SimResult:
    """Run `schedule` in simulated time (see the module docstring for the model).

    Args:
        schedule: a schedule; it is verified first.
        costs: one `StageCost` per (virtual) stage, or one for every stage.
        link: the point-to-point link between any two ranks.
        allreduce_link: the link of the all-reduce within a replicated stage (default: link).
        cores: processors the ranks share (None: one each). With k ranks computing at once on
            fewer than k cores, each computes at cores/k of its speed (processor sharing), as
            when more ranks than cores run on one CPU.
    Returns:
        A `SimResult`.
    Raises:
        ScheduleError: the schedule does not verify.
    """
    report = verify(schedule)
    stage_costs = _stage_costs(costs, schedule.num_stages)
    ar_link = allreduce_link or link
    if cores is not None:
        if not isinstance(cores, int) or cores < 1:
            raise ConfigError(f"cores={cores!r} is invalid; pass an int >= 1, or None for one "
                              "core per rank")
        if cores < schedule.num_ranks:
            return _simulate_shared(schedule, stage_costs, link, ar_link, cores, report)
    clock = {r: 0.0 for r in schedule.ranks}
    pc = {r: 0 for r in schedule.ranks}
    busy = {r: 0.0 for r in schedule.ranks}
    link_free: dict[tuple[int, int], float] = collections.defaultdict(float)
    arrival: dict[tuple, float] = {}
    reached: dict[tuple[int, int], dict[int, float]] = collections.defaultdict(dict)
    spans: list[Span] = []

    def duration(a: Action) -> float:
        c = stage_costs[a.stage]
        return {K.FORWARD: c.forward_s, K.BACKWARD: c.backward_s, K.BACKWARD_INPUT: c.input_s,
                K.BACKWARD_WEIGHT: c.weight_s, K.STEP: c.optimizer_step_s}.get(a.kind, 0.0)

    progress = True
    while progress:
        progress = False
        for rank in schedule.ranks:
            acts = schedule.actions[rank]
            while pc[rank] < len(acts):
                a, now = acts[pc[rank]], clock[rank]
                if a.kind.is_send:
                    nbytes = stage_costs[a.stage if a.kind is K.SEND_F else a.stage - 1
                                         ].output_bytes
                    issued = now + stage_costs[a.stage].send_s      # the sender's own time
                    start = max(issued, link_free[(rank, a.peer)])
                    end = start + link.transfer_s(nbytes)
                    link_free[(rank, a.peer)] = end
                    arrival[a.message_key(rank)] = end
                    clock[rank] = issued
                elif a.kind.is_recv:
                    if a.message_key(rank) not in arrival:
                        break
                    start, end = now, max(now, arrival[a.message_key(rank)])
                elif a.kind is K.ALLREDUCE:
                    group = reached[(a.stage, a.microbatch)]
                    group.setdefault(rank, now)
                    if len(group) < schedule.replicas(a.stage):
                        break
                    start = max(group.values())
                    end = start + ar_link.allreduce_s(stage_costs[a.stage].parameter_bytes,
                                                      schedule.replicas(a.stage))
                else:
                    start, end = now, now + duration(a)
                    if a.kind.is_compute:
                        busy[rank] += end - start
                if not a.kind.is_send:
                    clock[rank] = end
                spans.append(Span(rank, a, start, end))
                pc[rank] += 1
                progress = True
    if any(pc[r] < len(schedule.actions[r]) for r in schedule.ranks):  # verify() excludes it
        raise ScheduleError(f"simulation of {schedule.name!r} stalled at {pc}")
    makespan = max(clock.values(), default=0.0)
    work = sum(busy.values())
    bubble = 1.0 - work / (schedule.num_ranks * makespan) if makespan > 0 else 0.0
    return SimResult(schedule.name, makespan, busy, bubble,
                     _peak_memory(report, stage_costs), tuple(spans), report)


def _simulate_shared(schedule: Schedule, costs: list[StageCost], link: Link, ar_link: Link,
                     cores: int, report: VerifyReport) -> SimResult:
    """The same model with compute on `cores` shared processors: a global event loop in which
    k computing ranks each progress at min(1, cores / k) of their speed."""
    ranks = schedule.ranks
    pc = {r: 0 for r in ranks}
    busy = {r: 0.0 for r in ranks}
    left: dict[int, float] = {}            # rank -> remaining dedicated-core seconds
    began: dict[int, float] = {}           # rank -> start of its current action
    wake: dict[int, float] = {}            # rank -> end of its current receive / all-reduce
    link_free: dict[tuple[int, int], float] = collections.defaultdict(float)
    arrival: dict[tuple, float] = {}
    reached: dict[tuple[int, int], dict[int, float]] = collections.defaultdict(dict)
    spans: list[Span] = []
    now = 0.0

    def work(a: Action) -> float:
        c = costs[a.stage]
        return {K.FORWARD: c.forward_s, K.BACKWARD: c.backward_s, K.BACKWARD_INPUT: c.input_s,
                K.BACKWARD_WEIGHT: c.weight_s, K.STEP: c.optimizer_step_s}.get(a.kind, 0.0)

    def post(rank: int, a: Action, issued: float) -> None:
        """The link carries a message issued at `issued` (its span: the transfer)."""
        nbytes = costs[a.stage if a.kind is K.SEND_F else a.stage - 1].output_bytes
        start = max(issued, link_free[(rank, a.peer)])
        link_free[(rank, a.peer)] = start + link.transfer_s(nbytes)
        arrival[a.message_key(rank)] = link_free[(rank, a.peer)]
        spans.append(Span(rank, a, start, link_free[(rank, a.peer)]))

    def finish(rank: int, end: float) -> None:
        a = schedule.actions[rank][pc[rank]]
        if a.kind.is_send:                 # issued: the link carries it from here
            began.pop(rank)
            post(rank, a, end)
        else:
            spans.append(Span(rank, a, began.pop(rank), end))
            if a.kind.is_compute:
                busy[rank] += spans[-1].end_s - spans[-1].start_s
        pc[rank] += 1

    while True:
        moved = True
        while moved:                       # start everything that can start at `now`
            moved = False
            for rank in ranks:
                acts = schedule.actions[rank]
                while rank not in left and rank not in wake and pc[rank] < len(acts):
                    a = acts[pc[rank]]
                    if a.kind.is_send:
                        if costs[a.stage].send_s > 0:     # issuing takes processor time
                            began[rank] = now
                            left[rank] = costs[a.stage].send_s
                        else:
                            post(rank, a, now)
                            pc[rank] += 1
                    elif a.kind.is_recv:
                        if a.message_key(rank) not in arrival:
                            break
                        began[rank] = now
                        wake[rank] = max(now, arrival[a.message_key(rank)])
                    elif a.kind is K.ALLREDUCE:
                        group = reached[(a.stage, a.microbatch)]
                        if rank not in group:
                            group[rank] = now
                        if len(group) < schedule.replicas(a.stage):
                            break
                        end = max(group.values()) + ar_link.allreduce_s(
                            costs[a.stage].parameter_bytes, schedule.replicas(a.stage))
                        for member in schedule.stage_ranks[a.stage]:
                            if member not in wake:
                                began[member] = group[member]
                                wake[member] = end
                        moved = True
                    else:
                        began[rank] = now
                        if work(a) > 0:
                            left[rank] = work(a)
                        else:
                            finish(rank, now)
                    moved = True
        due = [r for r, t in wake.items() if t <= now]
        if due:                            # receives and all-reduces that end now
            for rank in due:
                del wake[rank]
                finish(rank, now)
            continue
        if not left and not wake:
            break                          # finished (or stalled: checked below)
        rate = min(1.0, cores / len(left)) if left else 1.0
        step = min([t - now for t in wake.values()] + [w / rate for w in left.values()])
        now += step
        for rank in list(left):
            left[rank] -= step * rate
            if left[rank] <= 1e-12:
                del left[rank]
                finish(rank, now)
    if any(pc[r] < len(schedule.actions[r]) for r in ranks):
        raise ScheduleError(f"simulation of {schedule.name!r} stalled at {pc}")
    makespan = max((sp.end_s for sp in spans), default=0.0)
    work_total = sum(busy.values())
    bubble = 1.0 - work_total / (schedule.num_ranks * makespan) if makespan > 0 else 0.0
    return SimResult(schedule.name, makespan, busy, bubble, _peak_memory(report, costs),
                     tuple(sorted(spans, key=lambda sp: (sp.rank, sp.start_s))), report)


def _peak_memory(report: VerifyReport, costs: list[StageCost]) -> dict[int, int]:
    def size(point: Iterable[tuple[int, int, int]]) -> int:
        return sum(costs[s].parameter_bytes * versions + costs[s].optimizer_state_bytes
                   + costs[s].activation_bytes * in_flight for s, in_flight, versions in point)

    out = {}
    for rank, trace in report.trace.items():
        stages = sorted({s for (r, s) in report.peak_in_flight if r == rank})
        start = size((s, 0, 1) for s in stages)
        out[rank] = max([start] + [size(p) for p in trace])
    return dict(sorted(out.items()))


_COLOURS = {K.FORWARD: "#4C72B0", K.BACKWARD: "#55A868", K.BACKWARD_INPUT: "#DD8452",
            K.BACKWARD_WEIGHT: "#8172B3", K.SEND_F: "#937860", K.SEND_B: "#937860",
            K.ALLREDUCE: "#C44E52", K.STEP: "#222222"}
_LABELS = {K.FORWARD: "forward", K.BACKWARD: "backward", K.BACKWARD_INPUT: "input grad",
           K.BACKWARD_WEIGHT: "weight grad", K.SEND_F: "send", K.ALLREDUCE: "all-reduce",
           K.STEP: "optimizer step"}


def _draw_gantt(file, timeline: Sequence[Span], stages: dict[int, tuple[int, ...]],
                makespan_s: float, title: str, dpi: int) -> None:
    """Draw with matplotlib's Agg canvas (no pyplot, no global backend change)."""
    from legato._extras import require

    require("matplotlib", what="a Gantt chart of the schedule (--gantt)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranks = sorted(stages)
    row = {r: i for i, r in enumerate(ranks)}
    width_in, height_in = 14.0, 1.2 + 0.45 * len(ranks)
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.6 / height_in, 0.88, 0.45 * len(ranks) / height_in))
    px_per_s = 0.88 * width_in * dpi / makespan_s if makespan_s > 0 else 0.0
    seen = set()
    for span in timeline:
        kind = K.SEND_F if span.action.kind is K.SEND_B else span.action.kind
        if kind not in _COLOURS or span.end_s <= span.start_s:
            continue
        seen.add(kind)
        y = row[span.rank]
        comm = kind is K.SEND_F  # transfers: a thin bar under the rank's compute
        bottom, height = (y + 0.24, 0.16) if comm else (y - 0.4, 0.6)
        ax.broken_barh([(span.start_s, span.end_s - span.start_s)], (bottom, height),
                       facecolors=_COLOURS[kind], edgecolor="white",
                       linewidth=0 if comm else 0.4)
        label = str(span.action.microbatch)
        if kind in (K.FORWARD, K.BACKWARD, K.BACKWARD_INPUT, K.BACKWARD_WEIGHT) and (
                (span.end_s - span.start_s) * px_per_s >= 7 * len(label) + 4):
            ax.text((span.start_s + span.end_s) / 2, y - 0.1, label, ha="center",
                    va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r} (stage {','.join(map(str, stages[r]))})" for r in ranks],
                       fontsize=8)
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlim(0, makespan_s or 1.0)
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(handles=[Patch(color=_COLOURS[k], label=_LABELS[k]) for k in _LABELS
                       if k in seen], loc="lower right", bbox_to_anchor=(1.0, 1.0),
              ncol=len(_LABELS), fontsize=8, frameon=False)
    fig.savefig(file, format="png", dpi=dpi, bbox_inches="tight")
