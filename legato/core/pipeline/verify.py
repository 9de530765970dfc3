"""The static verifier: proves a schedule free of deadlock, checks its data dependencies, and
computes its memory bound (microbatches in flight, weight versions held).

`verify(schedule)` runs the schedule abstractly under the IR's semantics (see `ir.py`) and
returns a `VerifyReport`, or raises `ScheduleError` (`DeadlockError` for a cyclic wait) naming
the rank, the step and the action, with the step x rank grid around it.

[Note: why one greedy run proves deadlock freedom for every timing]
Each rank runs its list in order. An action is either always enabled (compute, STEP, STASH,
RESTORE, and sends, which are asynchronous and buffered) or waits for a condition that, once
true, stays true: a receive for its matching send to have been issued, an all-reduce for every
member of its group to have reached it. Nothing ever disables an action, and a rank's choices
do not depend on when others act (messages are matched by tag, not by arrival order). This is
a Kahn process network: the set of actions each rank can complete is the same for every
interleaving, i.e. every timing. So running each rank until it blocks, round after round,
until nothing moves, reaches the one final state; if some rank has not finished there, it is
blocked in every execution, and the blocked ranks' waits form a cycle (or wait on a rank that
finished without the action they need).
"""

from __future__ import annotations

import collections
import dataclasses

from legato.core.pipeline.ir import (
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    format_grid,
)

__all__ = ["DeadlockError", "VerifyReport", "verify"]

K = ActionKind
_BACKWARDS = (K.BACKWARD, K.BACKWARD_INPUT)


class DeadlockError(ScheduleError):
    """Some ranks block forever. `blocked` maps each to what it waits for; `cycle` lists the
    ranks of a cyclic wait (empty when they wait on a rank that has finished)."""

    def __init__(self, message: str, *, blocked: dict[int, str], cycle: list[int],
                 rank: int | None = None, step: int | None = None,
                 action: Action | None = None) -> None:
        super().__init__(message, rank=rank, step=step, action=action)
        self.blocked, self.cycle = blocked, cycle


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What the verifier proved and measured; keys (rank, stage) unless said otherwise.

    Attributes:
        name: the schedule's name.
        order: (rank, step) pairs in one valid execution order.
        peak_in_flight: most microbatches forwarded but not yet fully backwarded.
        peak_in_flight_rank: the same summed over the stages of a rank (interleaved).
        peak_weight_versions: most weight versions held at once (current, stashed, and older
            ones a later F still asks for).
        steps: optimizer steps taken.
        versions: (stage, microbatch) -> weight version its F and B used.
        trace: rank -> after each of its steps, (stage, in flight, versions held) per stage.
    """

    name: str
    order: tuple[tuple[int, int], ...]
    peak_in_flight: dict[tuple[int, int], int]
    peak_in_flight_rank: dict[int, int]
    peak_weight_versions: dict[tuple[int, int], int]
    steps: dict[tuple[int, int], int]
    versions: dict[tuple[int, int], int]
    trace: dict[int, tuple[tuple[tuple[int, int, int], ...], ...]]

    def by_stage(self, values: dict[tuple[int, int], int]) -> dict[int, int]:
        """Max over the replicas of each stage of a (rank, stage)-keyed result."""
        out: dict[int, int] = {}
        for (_, stage), value in values.items():
            out[stage] = max(out.get(stage, value), value)
        return dict(sorted(out.items()))

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())


def _fail(schedule: Schedule, rank: int, step: int, what: str) -> ScheduleError:
    action = schedule.actions[rank][step]
    return ScheduleError(f"rank {rank} step {step} ({action}): {what}\n"
                         f"{format_grid(schedule, (rank, step))}", rank=rank, step=step,
                         action=action)


def _check_placement(schedule: Schedule) -> dict[tuple, tuple[int, int]]:
    """Each action on a rank hosting its stage, peers hosting the neighbour stage, and every
    message sent once and received once. Returns message key -> (rank, step) of its send."""
    last = schedule.num_stages - 1
    sends: dict[tuple, tuple[int, int]] = {}
    recvs: dict[tuple, tuple[int, int]] = {}
    for rank, acts in schedule.actions.items():
        for step, a in enumerate(acts):
            if rank not in schedule.stage_ranks[a.stage]:
                raise _fail(schedule, rank, step, f"rank {rank} does not host stage {a.stage} "
                            f"(its ranks: {schedule.stage_ranks[a.stage]})")
            if a.kind not in (K.ALLREDUCE, K.STEP) and a.microbatch >= schedule.num_microbatches:
                raise _fail(schedule, rank, step, f"microbatch {a.microbatch} is out of range; "
                            f"the schedule has num_microbatches={schedule.num_microbatches}")
            if not (a.kind.is_send or a.kind.is_recv):
                continue
            forward = a.kind in (K.SEND_F, K.RECV_F)
            sending = a.kind.is_send
            other = a.stage + (1 if forward else -1) * (1 if sending else -1)
            if not 0 <= other <= last:
                raise _fail(schedule, rank, step, f"stage {a.stage} has no neighbour stage "
                            f"{other} to {'send to' if sending else 'receive from'}")
            if a.peer not in schedule.stage_ranks[other]:
                raise _fail(schedule, rank, step, f"peer rank {a.peer} does not host stage "
                            f"{other} (its ranks: {schedule.stage_ranks[other]})")
            key = a.message_key(rank)
            table = sends if sending else recvs
            if key in table:
                raise _fail(schedule, rank, step, f"the same message is "
                            f"{'sent' if sending else 'received'} again (first at step "
                            f"{table[key][1]})")
            table[key] = (rank, step)
    for key, (rank, step) in recvs.items():
        if key not in sends:
            want = _expected_send(key)
            raise _fail(schedule, rank, step, f"unmatched receive: no rank issues the matching "
                        f"{want} on rank {key[3]}; add it there or drop this receive")
    for key, (rank, step) in sends.items():
        if key not in recvs:
            raise _fail(schedule, rank, step, f"unmatched send: rank {key[4]} never receives "
                        f"it; add {_expected_recv(key)} on rank {key[4]} or drop this send")
    return sends


def _expected_send(key: tuple) -> str:
    direction, stage, mb, _, dst = key
    sender_stage = stage - 1 if direction == "F" else stage + 1
    return f"{sender_stage}SEND_{direction}{mb}@{dst}"


def _expected_recv(key: tuple) -> str:
    direction, stage, mb, src, _ = key
    return f"{stage}RECV_{direction}{mb}@{src}"


class _RankState:
    """Per-rank bookkeeping of the abstract run."""

    def __init__(self, schedule: Schedule, rank: int) -> None:
        self.pc = 0
        self.done: set[tuple[ActionKind, int, int]] = set()  # (kind, stage, mb)
        self.steps: collections.Counter = collections.Counter()  # stage -> STEPs
        self.rounds: collections.Counter = collections.Counter()  # stage -> ALLREDUCEs
        self.stashed: dict[tuple[int, int], int] = {}  # (stage, mb) -> version, until backward
        self.restored: set[tuple[int, int]] = set()
        self.in_flight: collections.Counter = collections.Counter()
        self.stages = schedule.stages_of(rank)
        # stage -> version -> last step whose F asks for that version explicitly
        self.last_use: dict[int, dict[int, int]] = collections.defaultdict(dict)
        for step, a in enumerate(schedule.actions[rank]):
            if a.kind is K.FORWARD and a.version is not None:
                self.last_use[a.stage][a.version] = step
        self.trace: list[tuple[tuple[int, int, int], ...]] = []

    def held(self, stage: int, step: int) -> int:
        current = self.steps[stage]
        versions = {current}
        versions.update(v for (s, _), v in self.stashed.items() if s == stage)
        versions.update(v for v, last in self.last_use[stage].items()
                        if last > step and v <= current)
        return len(versions)


def verify(schedule: Schedule) -> VerifyReport:
    """Prove `schedule` deadlock-free and dependency-correct; measure its memory bound.

    Args:
        schedule: the schedule to check.
    Returns:
        A `VerifyReport`.
    Raises:
        ScheduleError: a misplaced or unmatched action, a broken dependency, a microbatch not
            forwarded and backwarded exactly once per stage, or inconsistent weight versions.
        DeadlockError: ranks that block forever, with the cycle of waits.
    """
    sends = _check_placement(schedule)
    states = {r: _RankState(schedule, r) for r in schedule.ranks}
    issued: set[tuple] = set()
    arrived: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    forward_at: dict[tuple[int, int], tuple[int, int]] = {}   # (stage, mb) -> (rank, step)
    backward_at: dict[tuple[int, int], tuple[int, int]] = {}
    versions: dict[tuple[int, int], int] = {}
    order: list[tuple[int, int]] = []
    peak_versions: dict[tuple[int, int], int] = {}
    peak_flight: dict[tuple[int, int], int] = {}
    peak_rank: dict[int, int] = {}

    def run(rank: int, step: int, a: Action, st: _RankState) -> None:
        s, i, key = a.stage, a.microbatch, (a.stage, a.microbatch)

        def need(kind: ActionKind, stage: int, what: str) -> None:
            if (kind, stage, i) not in st.done:
                raise _fail(schedule, rank, step, what)

        def has(kind: ActionKind, stage: int) -> bool:
            return (kind, stage, i) in st.done

        if a.kind is K.FORWARD:
            if key in forward_at:
                r0, t0 = forward_at[key]
                raise _fail(schedule, rank, step, f"microbatch {i} is forwarded on stage {s} "
                            f"twice (first on rank {r0} step {t0}); keep one")
            if s > 0 and not (has(K.RECV_F, s) or has(K.FORWARD, s - 1)):
                raise _fail(schedule, rank, step, f"F runs before its input arrives; put "
                            f"{s}RECV_F{i}@<rank of stage {s - 1}> before it")
            current = st.steps[s]
            if a.version is not None and a.version > current:
                raise _fail(schedule, rank, step, f"F asks for weight version {a.version} but "
                            f"stage {s} has taken only {current} steps here (version "
                            f"{current}); use version <= {current} or move the F later")
            forward_at[key] = (rank, step)
            versions[key] = current if a.version is None else a.version
            st.in_flight[s] += 1
        elif a.kind in _BACKWARDS:
            name = a.kind.value
            if key in backward_at:
                raise _fail(schedule, rank, step, f"microbatch {i} is backwarded on stage {s} "
                            f"twice (first on rank {backward_at[key][0]} step "
                            f"{backward_at[key][1]}); keep one")
            need(K.FORWARD, s, f"{name} runs before {s}F{i} on this rank; a backward needs "
                 "the forward's activations on the same rank")
            if s < schedule.num_stages - 1 and not (has(K.RECV_B, s) or has(K.BACKWARD, s + 1)
                                                    or has(K.BACKWARD_INPUT, s + 1)):
                raise _fail(schedule, rank, step, f"{name} runs before its output gradient "
                            f"arrives; put {s}RECV_B{i}@<rank of stage {s + 1}> before it")
            if key in st.stashed and key not in st.restored:
                raise _fail(schedule, rank, step, f"{s}STASH{i} has no {s}RESTORE{i} before "
                            f"this backward; add it, or the backward uses the latest weights")
            used = st.stashed.pop(key, st.steps[s])
            if used != versions[key]:
                raise _fail(schedule, rank, step, f"the forward of microbatch {i} used weight "
                            f"version {versions[key]} but this backward uses version {used} "
                            f"(a STEP ran in between); stash the weights: {s}STASH{i} after "
                            f"the F and {s}RESTORE{i} before the backward")
            backward_at[key] = (rank, step)
            if a.kind is K.BACKWARD:
                st.in_flight[s] -= 1
        elif a.kind is K.BACKWARD_WEIGHT:
            need(K.BACKWARD_INPUT, s, f"W runs before {s}I{i}; the input gradient comes first")
            if has(K.BACKWARD_WEIGHT, s):
                raise _fail(schedule, rank, step, f"W of microbatch {i} runs twice; keep one")
            st.in_flight[s] -= 1
        elif a.kind is K.SEND_F:
            need(K.FORWARD, s, f"SEND_F before {s}F{i}; send the output after computing it")
        elif a.kind is K.SEND_B:
            if not (has(K.BACKWARD, s) or has(K.BACKWARD_INPUT, s)):
                raise _fail(schedule, rank, step, f"SEND_B before {s}B{i} (or {s}I{i}); send "
                            "the input gradient after computing it")
        elif a.kind is K.STASH:
            need(K.FORWARD, s, f"STASH before {s}F{i}; stash after the forward")
            if key in backward_at:
                raise _fail(schedule, rank, step, "STASH after the backward has no effect")
            st.stashed[key] = versions[key]
        elif a.kind is K.RESTORE:
            if key not in st.stashed:
                raise _fail(schedule, rank, step, f"RESTORE without a pending {s}STASH{i}; "
                            "stash after the F, restore once before its backward")
            st.restored.add(key)
        elif a.kind is K.ALLREDUCE:
            pass  # round checked when the rank arrives
        elif a.kind is K.STEP:
            if i != st.steps[s]:
                raise _fail(schedule, rank, step, f"STEP round {i} out of order; stage {s} "
                            f"has taken {st.steps[s]} steps here, so it should be "
                            f"{s}STEP{st.steps[s]}")
            if schedule.replicas(s) > 1 and st.rounds[s] <= i:
                raise _fail(schedule, rank, step, f"stage {s} is replicated "
                            f"({schedule.stage_ranks[s]}) but runs STEP {i} without "
                            f"{s}ALLREDUCE{i} first; replicas would diverge")
            st.steps[s] += 1
        st.done.add((a.kind, s, i))
        flight = sum(st.in_flight[x] for x in st.stages)
        peak_rank[rank] = max(peak_rank.get(rank, 0), flight)
        point = []
        for x in st.stages:
            held = st.held(x, step)
            point.append((x, st.in_flight[x], held))
            peak_flight[(rank, x)] = max(peak_flight.get((rank, x), 0), st.in_flight[x])
            peak_versions[(rank, x)] = max(peak_versions.get((rank, x), 1), held)
        st.trace.append(tuple(point))

    progress = True
    while progress:
        progress = False
        for rank, st in states.items():
            acts = schedule.actions[rank]
            while st.pc < len(acts):
                a = acts[st.pc]
                if a.kind.is_recv and a.message_key(rank) not in issued:
                    break
                if a.kind is K.ALLREDUCE:
                    group = (a.stage, a.microbatch)
                    if rank not in arrived[group]:
                        if a.microbatch != st.rounds[a.stage]:
                            raise _fail(schedule, rank, st.pc, f"ALLREDUCE round "
                                        f"{a.microbatch} out of order; expected "
                                        f"{a.stage}ALLREDUCE{st.rounds[a.stage]}")
                        arrived[group].add(rank)
                    if len(arrived[group]) < schedule.replicas(a.stage):
                        break
                    st.rounds[a.stage] += 1
                if a.kind.is_send:
                    issued.add(a.message_key(rank))
                run(rank, st.pc, a, st)
                order.append((rank, st.pc))
                st.pc += 1
                progress = True

    if any(st.pc < len(schedule.actions[r]) for r, st in states.items()):
        raise _deadlock(schedule, states, arrived, sends)
    _check_complete(schedule, forward_at, backward_at, states)
    steps = {(r, s): st.steps[s] for r, st in states.items() for s in st.stages}
    for r, st in states.items():
        for s in st.stages:
            peak_flight.setdefault((r, s), 0)
            peak_versions.setdefault((r, s), 1)
        peak_rank.setdefault(r, 0)
    return VerifyReport(schedule.name, tuple(order), dict(sorted(peak_flight.items())),
                        dict(sorted(peak_rank.items())), dict(sorted(peak_versions.items())),
                        dict(sorted(steps.items())), dict(sorted(versions.items())),
                        {r: tuple(st.trace) for r, st in states.items()})


def _check_complete(schedule: Schedule, forward_at: dict, backward_at: dict,
                    states: dict[int, _RankState]) -> None:
    """Every microbatch forwarded and backwarded once per stage, on one rank; I has its W."""
    for s in range(schedule.num_stages):
        for i in range(schedule.num_microbatches):
            f, b = forward_at.get((s, i)), backward_at.get((s, i))
            if f is None and b is None:
                r = schedule.rank_for(s, i)
                raise ScheduleError(f"stage {s} never runs microbatch {i}: no {s}F{i} or "
                                    f"{s}B{i} on any rank; add them (round-robin puts them on "
                                    f"rank {r})\n{format_grid(schedule)}", rank=r)
            if b is None:
                raise _fail(schedule, f[0], f[1], f"missing backward: {s}F{i} runs here but "
                            f"no rank runs {s}B{i} (or {s}I{i} and {s}W{i}); add it on rank "
                            f"{f[0]}")
            if f is None:
                raise _fail(schedule, b[0], b[1], f"missing forward: no rank runs {s}F{i}")
            if f[0] != b[0]:
                raise _fail(schedule, b[0], b[1], f"backward on rank {b[0]} but the forward "
                            f"ran on rank {f[0]}; run both where the activations are")
            kind = schedule.actions[b[0]][b[1]].kind
            st = states[b[0]]
            if kind is K.BACKWARD_INPUT and (K.BACKWARD_WEIGHT, s, i) not in st.done:
                raise _fail(schedule, b[0], b[1], f"{s}I{i} has no {s}W{i} after it; the "
                            "weight gradient would be lost")
    for r, st in states.items():
        for (s, i) in st.stashed:
            raise ScheduleError(f"rank {r}: {s}STASH{i} is never used by a backward; drop it",
                                rank=r)


def _deadlock(schedule: Schedule, states: dict[int, _RankState],
              arrived: dict[tuple[int, int], set[int]], sends: dict) -> DeadlockError:
    blocked: dict[int, str] = {}
    waits: dict[int, list[int]] = {}
    finished_waits: list[str] = []
    for rank, st in states.items():
        acts = schedule.actions[rank]
        if st.pc >= len(acts):
            continue
        a = acts[st.pc]
        if a.kind.is_recv:
            src, step = sends[a.message_key(rank)]
            blocked[rank] = (f"rank {rank} step {st.pc} ({a}) waits for rank {src} to issue "
                             f"{schedule.actions[src][step]} (its step {step}; it is at step "
                             f"{states[src].pc})")
            waits[rank] = [src]
        else:  # ALLREDUCE
            group = (a.stage, a.microbatch)
            missing = [r for r in schedule.stage_ranks[a.stage] if r not in arrived[group]]
            blocked[rank] = (f"rank {rank} step {st.pc} ({a}) waits for rank(s) {missing} to "
                             f"reach {a}")
            waits[rank] = missing
            done = [r for r in missing if states[r].pc >= len(schedule.actions[r])]
            if done:
                finished_waits.append(f"rank(s) {done} finished without {a}; give every "
                                      f"replica of stage {a.stage} the same ALLREDUCE rounds")
    cycle: list[int] = []
    start = min(blocked)
    path: list[int] = []
    node = start
    while True:  # follow waits from the lowest blocked rank until a rank repeats
        if node in path:
            cycle = path[path.index(node):] + [node]
            break
        path.append(node)
        nxt = [w for w in waits[node] if w in blocked]
        if not nxt:
            break
        node = nxt[0]
    rank = cycle[0] if cycle else start
    head = (f"deadlock: {len(blocked)} of {schedule.num_ranks} ranks block forever, "
            "whatever the timing:")
    lines = [head] + [f"  {blocked[r]}" for r in sorted(blocked)]
    if cycle:
        lines.append("cycle of waits: " + " -> ".join(f"rank {r}" for r in cycle)
                     + "; reorder so that one of them sends (or reaches the all-reduce) "
                     "before it waits")
    lines += finished_waits
    lines.append(format_grid(schedule, (rank, states[rank].pc), note="<-- BLOCKED HERE"))
    return DeadlockError("\n".join(lines), blocked=blocked, cycle=cycle, rank=rank,
                         step=states[rank].pc, action=schedule.actions[rank][states[rank].pc])
