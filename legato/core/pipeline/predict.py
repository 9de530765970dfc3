"""From a plan to a prediction: the plan's schedule, its stage costs, and its simulation.

`schedule_for(plan, "1f1b", microbatches=8)` builds the named schedule with the plan's stages
and replicas and renames its ranks to the plan's; `stage_costs(profile, plan, ...)` turns the
profiled layers of each stage into the simulator's per-microbatch `StageCost`;
`predict(profile, plan, "1f1b", microbatches=8)` does both and simulates on a link derived from
the plan's topology.

What a microbatch is depends on the schedule: the synchronous ones (GPipe, 1F1B-flush,
interleaved 1F1B) and 2BW split one profiled minibatch into `microbatches` pieces, so each costs
1/microbatches of the profile; PipeDream's asynchronous 1F1B runs whole minibatches, each with
its own update, so each "microbatch" costs the whole profile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from legato.core.errors import ConfigError
from legato.core.pipeline.ir import ActionKind
from legato.core.pipeline.planner import Plan
from legato.core.pipeline.profile import LayerProfile
from legato.core.pipeline.schedules import get_schedule
from legato.core.pipeline.simulate import Link, SimResult, StageCost, simulate

__all__ = ["Prediction", "batch_fraction", "costs_from_timeline", "link_from_timeline", "predict",
           "schedule_for", "stage_costs"]

WHOLE_MINIBATCH = ("pipedream", "1f1b-rr")
NO_REPLICAS = ("interleaved-1f1b",)


def batch_fraction(schedule: str, microbatches: int) -> float:
    """The share of a profiled minibatch that one microbatch of `schedule` carries."""
    return 1.0 if schedule in WHOLE_MINIBATCH else 1.0 / microbatches


def schedule_for(plan: Plan, schedule: str, *, microbatches: int, **options):
    """The named schedule for `plan`'s stages and replicas, on the plan's ranks."""
    if schedule in NO_REPLICAS and any(s.replicas > 1 for s in plan.stages):
        raise ConfigError(f"schedule {schedule!r} has no replicated stages but the plan is "
                          f"{plan.shape()}; plan with straight=True (--straight) or pick gpipe, "
                          "1f1b, pipedream or 2bw")
    make = get_schedule(schedule)
    kwargs = dict(options)
    if schedule in NO_REPLICAS:
        # [Note: interleaving a plan] the plan's stages are the virtual stages; stage k and
        # k + p (p = stages / v) share the rank of stage k
        v = kwargs.setdefault("virtual_stages", 2)
        if len(plan.stages) % v:
            raise ConfigError(f"interleaved 1F1B with virtual_stages={v} needs a plan whose "
                              f"stage count is a multiple of {v}; this one has "
                              f"{len(plan.stages)}")
        sched = make(len(plan.stages) // v, microbatches, **kwargs)
        mapping = {sched.stage_ranks[k][0]: plan.stages[k].ranks[0]
                   for k in range(len(plan.stages) // v)}
    else:
        kwargs["replicas"] = [s.replicas for s in plan.stages]
        sched = make(len(plan.stages), microbatches, **kwargs)
        mapping = {}
        for stage_ranks, ps in zip(sched.stage_ranks, plan.stages):
            mapping.update(zip(stage_ranks, ps.ranks))
    return sched.relabel(mapping) if mapping != {r: r for r in mapping} else sched


def stage_costs(profile: LayerProfile, plan: Plan, *, fraction: float,
                optimizer_step_s: float | Sequence[float] | None = None) -> list[StageCost]:
    """Per-stage costs of one microbatch carrying `fraction` of the profiled minibatch (1.0
    when the profile was taken at the microbatch size); `optimizer_step_s` is one time for
    every stage or one per stage (default: the sum of the stage's layers' `update_s`)."""
    if optimizer_step_s is None:
        steps = [sum(profile.node(x).update_s for x in st.nodes if x not in plan.placeholders
                     and x in _ids(profile)) for st in plan.stages]
    elif isinstance(optimizer_step_s, (int, float)):
        steps = [float(optimizer_step_s)] * len(plan.stages)
    else:
        steps = list(optimizer_step_s)
    if len(steps) != len(plan.stages):
        raise ConfigError(f"optimizer_step_s has {len(steps)} entries for "
                          f"{len(plan.stages)} stages; give one per stage or one number")
    costs = []
    for i, st in enumerate(plan.stages):
        try:
            layers = [profile.node(x) for x in st.nodes if x not in plan.placeholders]
        except KeyError as err:
            raise ConfigError(f"the plan's stage {i} names layer {err.args[0]!r}, which the "
                              "profile does not have; plan with this profile") from None
        split = bool(layers) and all(n.backward_input_s is not None for n in layers)
        costs.append(StageCost(
            forward_s=fraction * sum(n.forward_s for n in layers),
            backward_s=fraction * sum(n.backward_s for n in layers),
            backward_input_s=fraction * sum(n.backward_input_s for n in layers) if split
            else None,
            backward_weight_s=fraction * sum(n.backward_weight_s for n in layers) if split
            else None,
            optimizer_step_s=steps[i],
            output_bytes=int(fraction * st.output_bytes),
            activation_bytes=int(fraction * st.activation_bytes),
            parameter_bytes=st.parameter_bytes,
            optimizer_state_bytes=st.optimizer_state_bytes))
    return costs


def _work_of(spans: Sequence, cores: int) -> dict[int, float]:
    """Per span index: the processor work in it when the ranks share `cores` processors.

    Every span that uses a processor (compute, optimizer step, a send's issue) ran at
    min(1, cores / k) of full speed while k such spans ran at once (processor sharing, as
    `simulate(cores=)` models it); its work is the integral of that rate over the span."""
    using = [i for i, sp in enumerate(spans)
             if sp.action.kind.is_compute or sp.action.kind.is_send
             or sp.action.kind is ActionKind.STEP]
    events = sorted({t for i in using for t in (spans[i].start_s, spans[i].end_s)})
    work = {i: 0.0 for i in using}
    order = sorted(using, key=lambda i: spans[i].start_s)
    active: list[int] = []
    nxt = 0
    for t0, t1 in zip(events, events[1:]):
        while nxt < len(order) and spans[order[nxt]].start_s <= t0:
            active.append(order[nxt])
            nxt += 1
        active = [i for i in active if spans[i].end_s > t0]
        if not active:
            continue
        rate = min(1.0, cores / len(active))
        for i in active:
            work[i] += (t1 - t0) * rate
    return work


def costs_from_timeline(spans: Sequence, base: Sequence[StageCost], *,
                        cores: int | None = None) -> list[StageCost]:
    """Per-stage costs measured in a pipeline's own run: the calibration of a short warm-up.

    Layers timed alone on an idle machine miss what the stages of a running pipeline share
    (cores, memory bandwidth, the transport's threads); a step or two of the pipeline itself
    measures each action with all of that in it. Each stage's forward, backward (or input and
    weight halves), optimizer step and message issue (`send_s`: the sender's own time per
    SEND) is the mean of its spans (a makespan is a sum of durations: the mean is what adds
    up); sizes come from `base` (`stage_costs` of the plan).

    Args:
        spans: the run's `Span`s (e.g. `PipelineTrainer.timeline(gather=True)` after a warm-up
            step; a SEND's span is its issue).
        base: one `StageCost` per stage, for the byte counts and for kinds the run lacks.
        cores: the processors the run's ranks shared, when fewer than the ranks: each span's
            duration is turned into the work it held at full speed (`_work_of`: k spans at
            once each ran at cores / k), for `simulate(..., cores=cores)` to share again in
            the schedule it predicts; None: durations as measured (one processor per rank).
    Returns:
        One `StageCost` per stage.
    """
    spans = list(spans)
    work = _work_of(spans, cores) if cores is not None else {}
    got: dict[tuple[int, ActionKind], list[float]] = {}
    for i, sp in enumerate(spans):
        got.setdefault((sp.action.stage, sp.action.kind), []).append(
            work.get(i, sp.end_s - sp.start_s))
    out = []
    K = ActionKind
    for s, c in enumerate(base):
        def mean(kind: ActionKind, default: float, s: int = s) -> float:
            v = got.get((s, kind))
            return sum(v) / len(v) if v else default
        split = (s, K.BACKWARD_INPUT) in got and (s, K.BACKWARD) not in got
        sends = got.get((s, K.SEND_F), []) + got.get((s, K.SEND_B), [])
        inp, wgt = mean(K.BACKWARD_INPUT, c.input_s), mean(K.BACKWARD_WEIGHT, c.weight_s)
        out.append(dataclasses.replace(
            c, forward_s=mean(K.FORWARD, c.forward_s),
            backward_s=inp + wgt if split else mean(K.BACKWARD, c.backward_s),
            backward_input_s=inp if split else None, backward_weight_s=wgt if split else None,
            optimizer_step_s=mean(K.STEP, c.optimizer_step_s),
            send_s=sum(sends) / len(sends) if sends else c.send_s))
    return out


def link_from_timeline(spans: Sequence, base: Sequence[StageCost], link: Link) -> Link:
    """The link as a running pipeline saw it, from its own timeline.

    A message whose receiver was already waiting when it was sent shows its whole transfer:
    from the end of the send's issue to the end of the wait. The returned link keeps `link`'s
    bandwidth and takes as its latency the median of what those transfers took beyond
    bytes / bandwidth (on a shared machine the transport's threads compete with compute, which
    a round trip timed on idle ranks does not see). Without such a message, `link` itself.

    Args:
        spans: the run's `Span`s, on one clock (`PipelineTrainer.timeline(gather=True)`).
        base: one `StageCost` per stage (message sizes: `output_bytes`).
        link: the link to adjust (e.g. fitted to round trips).
    """
    sends = {sp.action.message_key(sp.rank): sp for sp in spans if sp.action.kind.is_send}
    excess = []
    for sp in spans:
        if not sp.action.kind.is_recv:
            continue
        sent = sends.get(sp.action.message_key(sp.rank))
        if sent is None or sp.start_s > sent.end_s:       # the data may have waited for it
            continue
        a = sp.action
        nbytes = base[a.stage - 1 if a.kind is ActionKind.RECV_F else a.stage].output_bytes
        excess.append(sp.end_s - sent.end_s - nbytes / link.bandwidth_Bps)
    if not excess:
        return link
    excess.sort()
    return Link(max(0.0, excess[len(excess) // 2]), link.bandwidth_Bps)


def _ids(profile: LayerProfile) -> set[str]:
    return {n.id for n in profile.nodes}


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A simulated run of a plan: the simulator's result and the time per minibatch."""

    result: SimResult
    minibatches: float
    time_per_minibatch_s: float


def predict(profile: LayerProfile, plan: Plan, schedule: str = "1f1b", *, microbatches: int = 8,
            link: Link | None = None, alpha_s: float = 0.0, fraction: float | None = None,
            optimizer_step_s: float | Sequence[float] | None = None, cores: int | None = None,
            **options) -> Prediction:
    """Simulate `plan` under `schedule`; the link defaults to the topology's slowest level.

    `fraction` is the share of the profile one microbatch carries (default
    `batch_fraction(schedule, microbatches)`; pass 1.0 for a profile taken at the microbatch
    size, which is more accurate: small batches run less efficiently than a 1/m share).
    `cores`: processors the ranks share (see `simulate`)."""
    sched = schedule_for(plan, schedule, microbatches=microbatches, **options)
    if fraction is None:
        fraction = batch_fraction(schedule, microbatches)
    if link is None:
        bandwidth = min(level.bandwidth_Bps for level in plan.topology.levels)
        link = Link(alpha_s, bandwidth)
    result = simulate(sched, stage_costs(profile, plan, fraction=fraction,
                                         optimizer_step_s=optimizer_step_s), link, cores=cores)
    total_mbs = len({a.microbatch for acts in sched.actions.values() for a in acts
                     if a.kind is ActionKind.FORWARD})
    minibatches = total_mbs * batch_fraction(schedule, microbatches)
    return Prediction(result, minibatches, result.makespan_s / minibatches)
