"""Schedule generators: GPipe, 1F1B-flush, PipeDream (async 1F1B with weight stashing, vertical
sync, round-robin over replicated stages), PipeDream-2BW, interleaved 1F1B and zero-bubble
ZB-H1.

Every generator takes the number of pipeline stages and of microbatches and returns a
`Schedule`. It first orders each rank's computation (F, B, STEP, ...), then
`add_communication` inserts the sends and receives, and `split_backward=True` turns every B
into I, SEND_B, W (input gradient first, so the previous stage can go on; weight gradient
after). Ranks are numbered stage by stage: with `replicas=[3, 1]` ranks 0-2 host stage 0 and
rank 3 hosts stage 1; microbatch i of stage s runs on its replica i % replicas[s].
`get_schedule(name)` returns a generator by name (`SCHEDULES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from legato.core.pipeline.ir import Action, ActionKind, Schedule, ScheduleError

__all__ = ["SCHEDULES", "add_communication", "get_schedule", "gpipe", "interleaved_1f1b",
           "one_f_one_b", "pipedream", "pipedream_2bw", "zb_h1"]

K = ActionKind


# -- helpers ----------------------------------------------------------------------------------
def _layout(num_stages: int, num_microbatches: int, replicas: Sequence[int] | None
            ) -> list[tuple[int, ...]]:
    """Stage -> ranks, numbering ranks stage by stage; validates the arguments."""
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{name}={value!r} is invalid; pass an int >= 1")
    reps = [1] * num_stages if replicas is None else list(replicas)
    if len(reps) != num_stages or any(not isinstance(r, int) or r < 1 for r in reps):
        raise ScheduleError(f"replicas={replicas!r} is invalid; pass one int >= 1 per stage "
                            f"({num_stages} stages), e.g. [2] + [1] * {num_stages - 1}")
    if max(reps) > num_microbatches:
        raise ScheduleError(f"num_microbatches={num_microbatches} leaves replicas of a stage "
                            f"with {max(reps)} replicas idle; pass num_microbatches >= "
                            f"{max(reps)}")
    layout, rank = [], 0
    for r in reps:
        layout.append(tuple(range(rank, rank + r)))
        rank += r
    return layout


def _in_flight(layout: list[tuple[int, ...]], stage: int) -> int:
    """Microbatches one replica of `stage` keeps in flight so that every later worker is busy.

    [Note: in-flight count] A straight pipeline needs p - s at stage s (the 1F1B warm-up).
    With replicas, PipeDream's NOAM generalises to ceil(workers at stages >= s / replicas of
    s): the microbatches between this replica's forward and backward of one microbatch are
    spread round-robin over its replicas.
    """
    workers = sum(len(r) for r in layout[stage:])
    return math.ceil(workers / len(layout[stage]))


def _one_f_one_b(mbs: Sequence[int], warmup: int) -> list[tuple[str, int]]:
    """Order of ('F'|'B', mb): `warmup` forwards, then alternate B, F, then the remaining B."""
    warmup = min(warmup, len(mbs))
    order = [("F", i) for i in mbs[:warmup]]
    for j in range(len(mbs) - warmup):
        order += [("B", mbs[j]), ("F", mbs[j + warmup])]
    order += [("B", i) for i in mbs[len(mbs) - warmup:]]
    return order


def _update(stage: int, layout: list[tuple[int, ...]], round_: int) -> list[Action]:
    ops = [Action(stage, K.ALLREDUCE, round_)] if len(layout[stage]) > 1 else []
    return ops + [Action(stage, K.STEP, round_)]


def add_communication(compute: dict[int, list[Action]], stage_ranks: list[tuple[int, ...]],
                      *, split_backward: bool = False) -> dict[int, list[Action]]:
    """Insert RECV_F before each F and SEND_F after it, RECV_B before each B (or I) and SEND_B
    after.

    Peers follow the round-robin rule (`Schedule.rank_for`); no message is sent between two
    stages on one rank. With `split_backward`, each B becomes I, SEND_B, W; a schedule that
    places its own W (zero bubble) gives I and W and leaves `split_backward` off.

    Args:
        compute: rank -> its computation in order (F, B, STEP, ALLREDUCE, STASH, RESTORE).
        stage_ranks: stage -> ranks, as in `Schedule`.
        split_backward: emit I and W instead of B.
    Returns:
        rank -> the full action list.
    """
    last = len(stage_ranks) - 1

    def rank_for(stage: int, mb: int) -> int:
        return stage_ranks[stage][mb % len(stage_ranks[stage])]

    out: dict[int, list[Action]] = {}
    for rank, ops in compute.items():
        acts: list[Action] = []
        for a in ops:
            s, i = a.stage, a.microbatch
            if a.kind is K.FORWARD:
                if s > 0 and (src := rank_for(s - 1, i)) != rank:
                    acts.append(Action(s, K.RECV_F, i, src))
                acts.append(a)
                if s < last and (dst := rank_for(s + 1, i)) != rank:
                    acts.append(Action(s, K.SEND_F, i, dst))
            elif a.kind in (K.BACKWARD, K.BACKWARD_INPUT):   # I: a schedule placing W itself
                if s < last and (src := rank_for(s + 1, i)) != rank:
                    acts.append(Action(s, K.RECV_B, i, src))
                acts.append(Action(s, K.BACKWARD_INPUT, i) if split_backward else a)
                if s > 0 and (dst := rank_for(s - 1, i)) != rank:
                    acts.append(Action(s, K.SEND_B, i, dst))
                if split_backward and a.kind is K.BACKWARD:
                    acts.append(Action(s, K.BACKWARD_WEIGHT, i))
            else:
                acts.append(a)
        out[rank] = acts
    return out


def _schedule(name: str, compute: dict[int, list[Action]], layout: list[tuple[int, ...]],
              num_microbatches: int, split_backward: bool, **meta) -> Schedule:
    meta.update(num_stages=len(layout), replicas=[len(r) for r in layout],
                split_backward=split_backward)
    return Schedule(name, add_communication(compute, layout, split_backward=split_backward),
                    layout, num_microbatches, meta)


def _replica_mbs(layout: list[tuple[int, ...]], stage: int, replica: int, count: int
                 ) -> list[int]:
    return [i for i in range(count) if i % len(layout[stage]) == replica]


# -- synchronous schedules ------------------------------------------------------------------
def gpipe(num_stages: int, num_microbatches: int, *, replicas: Sequence[int] | None = None,
          split_backward: bool = False) -> Schedule:
    """GPipe: every forward, then every backward, then one synchronous update per stage.

    Args:
        num_stages: pipeline depth p.
        num_microbatches: microbatches m per minibatch (one optimizer step).
        replicas: replicas per stage (default 1 each); replicas all-reduce before the step.
        split_backward: I then W instead of B.
    Returns:
        The schedule; each stage keeps all m microbatches in flight and one weight version.
    """
    layout = _layout(num_stages, num_microbatches, replicas)
    compute: dict[int, list[Action]] = {}
    for s, ranks in enumerate(layout):
        for j, rank in enumerate(ranks):
            mbs = _replica_mbs(layout, s, j, num_microbatches)
            compute[rank] = ([Action(s, K.FORWARD, i) for i in mbs]
                             + [Action(s, K.BACKWARD, i) for i in mbs] + _update(s, layout, 0))
    return _schedule("gpipe", compute, layout, num_microbatches, split_backward,
                     synchronous=True, microbatches_per_step=num_microbatches, num_steps=1)


def one_f_one_b(num_stages: int, num_microbatches: int, *,
                replicas: Sequence[int] | None = None, split_backward: bool = False
                ) -> Schedule:
    """1F1B with a flush (PipeDream-Flush, Megatron): warm-up, one F one B, cool-down, update.

    Stage s of a straight pipeline runs p - s - 1 warm-up forwards, so at most min(p - s, m)
    microbatches are in flight there (GPipe: m). With `replicas`, each replica runs 1F1B over
    its round-robin share (see [Note: in-flight count]).

    Args:
        num_stages: pipeline depth p.
        num_microbatches: microbatches m per minibatch (one optimizer step).
        replicas: replicas per stage (default 1 each).
        split_backward: I then W instead of B.
    Returns:
        The schedule.
    """
    layout = _layout(num_stages, num_microbatches, replicas)
    compute: dict[int, list[Action]] = {}
    for s, ranks in enumerate(layout):
        for j, rank in enumerate(ranks):
            mbs = _replica_mbs(layout, s, j, num_microbatches)
            order = _one_f_one_b(mbs, _in_flight(layout, s))
            compute[rank] = [Action(s, K.FORWARD if k == "F" else K.BACKWARD, i)
                             for k, i in order] + _update(s, layout, 0)
    return _schedule("1f1b", compute, layout, num_microbatches, split_backward,
                     synchronous=True, microbatches_per_step=num_microbatches, num_steps=1)


def interleaved_1f1b(num_stages: int, num_microbatches: int, *, virtual_stages: int = 2,
                     split_backward: bool = False) -> Schedule:
    """Interleaved 1F1B (Megatron-LM's virtual pipeline): rank r hosts stages r, r+p, r+2p...

    Microbatches go through in groups of p; each rank runs a group's forwards on one model
    chunk, then on the next. The bubble is the 1F1B bubble divided by v:
    (p - 1) / (v m + p - 1) of the time with equal stage costs.

    Args:
        num_stages: ranks p in the pipeline (the model has p * virtual_stages stages).
        num_microbatches: microbatches m per minibatch; a multiple of p.
        virtual_stages: model chunks v per rank.
        split_backward: I then W instead of B.
    Returns:
        The schedule, with p * v stages.
    """
    p, v, m = num_stages, virtual_stages, num_microbatches
    _layout(p, m, None)
    if not isinstance(v, int) or v < 1:
        raise ScheduleError(f"virtual_stages={v!r} is invalid; pass an int >= 1")
    if m % p:
        fix = f"{m + p - m % p}" + (f" or {m - m % p}" if m > p else "")
        raise ScheduleError(f"interleaved 1F1B sends microbatches through in groups of "
                            f"num_stages={p}, so num_microbatches={m} must be a multiple of "
                            f"{p}; pass num_microbatches={fix}")
    layout = [(vs % p,) for vs in range(p * v)]
    total = v * m

    def unit(k: int, forward: bool, rank: int) -> Action:
        group, j = divmod(k, p * v)
        chunk = j // p if forward else v - 1 - j // p
        mb = group * p + j % p
        return Action(chunk * p + rank, K.FORWARD if forward else K.BACKWARD, mb)

    compute: dict[int, list[Action]] = {}
    for r in range(p):
        # [Note: interleaved warm-up] the first backward on rank r (microbatch 0 on its last
        # chunk) needs microbatch 0's forward through all p*v stages and back down p - 1 - r
        # ranks; meanwhile rank r can run (v - 1) p forwards of earlier chunks plus two per
        # rank between it and the end of the pipeline.
        # With v = 1 this is plain 1F1B (p - 1 - r warm-up forwards).
        extra = 2 * (p - 1 - r) if v > 1 else p - 1 - r
        warmup = min(total, (v - 1) * p + extra)
        ops = [unit(k, True, r) for k in range(warmup)]
        for k in range(total - warmup):
            ops += [unit(warmup + k, True, r), unit(k, False, r)]
        ops += [unit(k, False, r) for k in range(max(0, total - warmup), total)]
        ops += [Action(c * p + r, K.STEP, 0) for c in range(v)]
        compute[r] = ops
    return _schedule("interleaved-1f1b", compute, layout, m, split_backward,
                     synchronous=True, virtual_stages=v, microbatches_per_step=m,
                     num_steps=1)


def zb_h1(num_stages: int, num_microbatches: int, *, replicas: Sequence[int] | None = None
          ) -> Schedule:
    """ZB-H1, the zero-bubble schedule of Qi et al. (ICLR'24) that keeps 1F1B's memory.

    Every backward is split into I (input gradient, on the critical path: the previous stage
    waits for it) and W (weight gradient, which nothing waits for). Stage s runs 1F1B's order
    of F and I, and after each I the oldest W only while more than s are pending; the s
    deferred W's run after the last I, while the stages before it drain. Stage s then holds at
    most p activations (1F1B: p - s), the memory of 1F1B's first stage, and with F, I and W
    each taking t the bubble is (p - 1) t instead of 1F1B's 3 (p - 1) t: the paper's
    (p - 1)(T_F + T_B - T_W).

    Args:
        num_stages: pipeline depth p.
        num_microbatches: microbatches m per minibatch (one optimizer step).
        replicas: straight pipelines only (None or all 1).
    Returns:
        The schedule.
    """
    layout = _layout(num_stages, num_microbatches, replicas)
    if any(len(r) > 1 for r in layout):
        raise ScheduleError(f"zb-h1: replicas={[len(r) for r in layout]}; the zero-bubble "
                            "schedule runs straight pipelines only: drop replication, or use "
                            "1f1b with split_backward=True")
    compute: dict[int, list[Action]] = {}
    for s, (rank,) in enumerate(layout):
        ops: list[Action] = []
        pending: list[int] = []
        for kind, i in _one_f_one_b(range(num_microbatches), num_stages - s):
            if kind == "F":
                ops.append(Action(s, K.FORWARD, i))
                continue
            ops.append(Action(s, K.BACKWARD_INPUT, i))
            pending.append(i)
            if len(pending) > s:
                ops.append(Action(s, K.BACKWARD_WEIGHT, pending.pop(0)))
        ops += [Action(s, K.BACKWARD_WEIGHT, i) for i in pending]
        compute[rank] = ops + _update(s, layout, 0)
    sched = _schedule("zb-h1", compute, layout, num_microbatches, False, synchronous=True,
                      microbatches_per_step=num_microbatches, num_steps=1)
    sched.meta["split_backward"] = True
    return sched


# -- asynchronous schedules -----------------------------------------------------------------
def pipedream(num_stages: int, num_microbatches: int, *, replicas: Sequence[int] | None = None,
              vertical_sync: bool = False, split_backward: bool = False) -> Schedule:
    """PipeDream's asynchronous 1F1B with weight stashing (1F1B-RR over replicated stages).

    Every microbatch is a minibatch: each backward is followed by the stage's update (an
    all-reduce over its replicas first), with no flush. F stashes the weight version it used
    and B restores it, so stage s holds p - s versions (a straight pipeline). With
    `vertical_sync`, every stage runs microbatch i with the version stage 0 used for it.

    Args:
        num_stages: pipeline depth p.
        num_microbatches: microbatches (minibatches) m to run; a multiple of each stage's
            replicas, so that replicas all-reduce in matching rounds.
        replicas: replicas per stage (default 1 each); microbatch i goes to replica
            i % replicas[s].
        vertical_sync: tag each F with stage 0's version of that microbatch (straight
            pipelines only).
        split_backward: I then W instead of B (the update follows W).
    Returns:
        The schedule.
    """
    layout = _layout(num_stages, num_microbatches, replicas)
    bad = [s for s, r in enumerate(layout) if num_microbatches % len(r)]
    if bad:
        need = math.lcm(*(len(r) for r in layout))
        raise ScheduleError(f"pipedream: num_microbatches={num_microbatches} is not a multiple "
                            f"of the replicas of stage(s) {bad} ({[len(layout[s]) for s in bad]})"
                            f"; replicas all-reduce after every backward in matching rounds, "
                            f"so pass a multiple of {need}")
    if vertical_sync and any(len(r) > 1 for r in layout):
        raise ScheduleError("pipedream: vertical_sync=True supports straight pipelines only "
                            f"(replicas={[len(r) for r in layout]}); drop replication or "
                            "vertical_sync")
    orders = {}
    for s, ranks in enumerate(layout):
        for j, rank in enumerate(ranks):
            mbs = _replica_mbs(layout, s, j, num_microbatches)
            orders[rank] = (s, _one_f_one_b(mbs, _in_flight(layout, s)))
    # stage 0's version for each microbatch: the steps it has taken before that forward
    entry_version: dict[int, int] = {}
    for rank in layout[0]:
        steps = 0
        for kind, i in orders[rank][1]:
            if kind == "F":
                entry_version[i] = steps
            else:
                steps += 1
    compute: dict[int, list[Action]] = {}
    for rank, (s, order) in orders.items():
        ops: list[Action] = []
        steps = 0
        for kind, i in order:
            if kind == "F":
                ops += [Action(s, K.FORWARD, i, version=entry_version[i] if vertical_sync
                               else None), Action(s, K.STASH, i)]
            else:
                ops += [Action(s, K.RESTORE, i), Action(s, K.BACKWARD, i)]
                ops += _update(s, layout, steps)
                steps += 1
        compute[rank] = ops
    return _schedule("pipedream", compute, layout, num_microbatches, split_backward,
                     synchronous=False, weight_stashing=True, vertical_sync=vertical_sync)


def pipedream_2bw(num_stages: int, num_microbatches: int, *, num_steps: int = 3,
                  replicas: Sequence[int] | None = None, split_backward: bool = False
                  ) -> Schedule:
    """PipeDream-2BW: 1F1B without flush, a step every m microbatches, two weight versions.

    All microbatches of step n run forward and backward with weight version max(0, n - 1)
    and their accumulated gradient is applied to the latest version:
    W(n+1) = W(n) - lr * grad(W(n-1)). So each stage holds 2 versions (double buffering).

    Args:
        num_stages: pipeline depth p.
        num_microbatches: microbatches m per optimizer step (gradient accumulation); m >= p
            (more with replicas: each replica's share >= its in-flight count), and a multiple
            of each stage's replicas.
        num_steps: optimizer steps to run (microbatch ids 0 .. m * num_steps - 1).
        replicas: replicas per stage (default 1 each).
        split_backward: I then W instead of B.
    Returns:
        The schedule.
    """
    m = num_microbatches
    layout = _layout(num_stages, m, replicas)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ScheduleError(f"num_steps={num_steps!r} is invalid; pass an int >= 1")
    multiple = math.lcm(*(len(r) for r in layout))
    # each replica must run at least as many microbatches per step as it keeps in flight, or
    # a step's first forward would need a version not yet made (a third version would live)
    least = max(len(r) * _in_flight(layout, s) for s, r in enumerate(layout))
    if m % multiple or m < least:
        fix = least + (-least) % multiple
        raise ScheduleError(f"2bw: num_microbatches={m} per step must be a multiple of the "
                            f"replicas of every stage ({[len(r) for r in layout]}) and at "
                            f"least {least} (the microbatches in flight, num_stages for a "
                            f"straight pipeline); pass num_microbatches={fix}")
    total = m * num_steps
    compute: dict[int, list[Action]] = {}
    for s, ranks in enumerate(layout):
        for j, rank in enumerate(ranks):
            mbs = _replica_mbs(layout, s, j, total)
            per_step = m // len(ranks)
            ops: list[Action] = []
            done = 0
            for kind, i in _one_f_one_b(mbs, _in_flight(layout, s)):
                if kind == "F":
                    ops += [Action(s, K.FORWARD, i, version=max(0, i // m - 1)),
                            Action(s, K.STASH, i)]
                else:
                    ops += [Action(s, K.RESTORE, i), Action(s, K.BACKWARD, i)]
                    done += 1
                    if done % per_step == 0:
                        ops += _update(s, layout, done // per_step - 1)
            compute[rank] = ops
    return _schedule("2bw", compute, layout, total, split_backward, synchronous=False,
                     weight_stashing=True, microbatches_per_step=m, num_steps=num_steps)


# -- registry ---------------------------------------------------------------------------------
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "pipedream": pipedream,
    "1f1b-rr": pipedream,
    "2bw": pipedream_2bw,
    "zb-h1": zb_h1,
}


def get_schedule(name: str) -> Callable[..., Schedule]:
    """The generator registered as `name` (see `SCHEDULES`).

    Raises:
        ScheduleError: unknown name; the message lists the known ones.
    """
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ScheduleError(f"unknown schedule {name!r}; known: "
                            f"{', '.join(sorted(SCHEDULES))}") from None
