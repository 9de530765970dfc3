"""Partition planner (after PipeDream, SOSP'19 §3.1): which layers form each pipeline stage, how
many workers replicate each stage, and which ranks run it.

Dynamic programming over the cut points of the layer DAG (`_states.py`), the workers of each
topology level and each stage's replication. Two cost modes:

- `pipedream`: the state space and arithmetic of PipeDream's released optimizer
  (`optimizer_graph_hierarchical.py`); its answers are checked against that tool's own
  (tests/data/pipedream_golden.json).
  A stage on m workers takes `(C + 4(m-1)W/(B m)) / m` (compute and weight all-reduce added);
  activation transfer `2a/(B m)` into and out of a stage (a: a state's augmented antichain)
  counts only when an activation compression ratio is given (and is divided by it); with a
  memory cap a stage is rejected when `ceil((M - used)/m) * (stage activations + stage
  parameters)` exceeds it.
- `paper`: the paper's equations. A stage takes `max(C, 2(m-1)W/B) / m` (all-reduce overlaps
  compute), a split costs `2a/B` for the activations and gradients crossing it, and a worker's
  memory is `W * v + optimizer state + stage activations * v` with `v = ceil(workers from this
  stage on / m)` weight versions and in-flight minibatches (weight stashing).

Both minimise the steady-state time per minibatch of PipeDream's asynchronous 1F1B schedule (the
slowest stage). `objective="sync"` instead minimises the makespan of a synchronous schedule
(GPipe, 1F1B-flush) of `microbatches` microbatches: the sum of the stages' per-microbatch times
plus (microbatches - 1) times the slowest, by a min-sum DP under each candidate bound on the
slowest stage.

Tied parameters (`meta["tied"]`: a tied embedding and output head) stay in one stage under the
async objective, whose schedules give each stage its own weight version; under the sync
objective they may be split, and each stage holding only some of a parameter's users pays
`2P/B` per minibatch (P its bytes) in its update term, for summing the copies' gradients
between the stages before the step (what the runtime does, as Megatron-LM does for its
embeddings). `keep_tied=True` keeps them in one stage under either objective.

Topology levels are solved innermost first; a level's best times become the compute times of the
next (PipeDream's hierarchical scheme). The states are every ideal in `paper` mode and PipeDream's
antichain DAG in `pipedream` mode (`_states.py`). [In pipedream mode, as in PipeDream's loop, an
inner level's sub-pipeline may start after any state earlier in the DAG's order, its costs the
differences of the states' totals; in paper mode the start must be a proper subset of the end,
which excludes meaningless stages on DAGs.]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import numpy as np

from legato.core._files import atomic_json, read_text
from legato.core.errors import ConfigError
from legato.core.pipeline._states import StateSpace, build_states
from legato.core.pipeline.profile import LayerProfile
from legato.core.pipeline.topology import Topology
from legato.core.stop import StopReason

__all__ = ["MODES", "OBJECTIVES", "Plan", "PlanError", "PlanStage", "plan"]

MODES = ("pipedream", "paper")
OBJECTIVES = ("async", "sync")
PLAN_FORMAT = "legato.pipeline.plan"
_CARRY, _BASE = -2, -1


class PlanError(ConfigError):
    """No plan satisfies the constraints, or the planner's inputs are unusable."""


@dataclasses.dataclass(frozen=True)
class PlanStage:
    """One stage: its layers (profile ids, forward order), replicas and ranks."""

    nodes: tuple[str, ...]
    replicas: int
    ranks: tuple[int, ...]
    compute_s: float            # forward + backward of one minibatch on one worker
    time_s: float               # its predicted time per minibatch (the planner's term)
    parameter_bytes: int
    activation_bytes: int       # sum of its layers' activations for one minibatch
    optimizer_state_bytes: int
    output_bytes: int           # activations it sends to later stages per minibatch

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["nodes"], d["ranks"] = list(self.nodes), list(self.ranks)
        return d


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's answer; `speedup` is over data parallelism on the same workers."""

    stages: tuple[PlanStage, ...]
    time_per_minibatch_s: float
    dp_time_s: float
    mode: str
    objective: str
    topology: Topology
    microbatches: int | None = None
    state_space: str = "exact"
    notes: tuple[str, ...] = ()
    model: str = ""
    placeholders: tuple[str, ...] = ()     # layers placed but not costed (Input*, __getitem__)
    # EXHAUSTED: every cut point and bound was planned over; CONVERGED: the sync objective
    # stopped once a larger bound could not win; BUDGET: max_states or max_caps cut it short
    stop_reason: StopReason = StopReason.EXHAUSTED

    @property
    def speedup(self) -> float:
        return self.dp_time_s / self.time_per_minibatch_s if self.time_per_minibatch_s else 0.0

    @property
    def workers_used(self) -> int:
        return sum(s.replicas for s in self.stages)

    @property
    def stage_of(self) -> dict[str, int]:
        return {n: i for i, s in enumerate(self.stages) for n in s.nodes}

    def shape(self) -> str:
        """Replicas per stage, as PipeDream writes it: `3-1`."""
        return "-".join(str(s.replicas) for s in self.stages)

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "version": 1, "model": self.model,
                "stages": [s.to_json() for s in self.stages],
                "time_per_minibatch_s": self.time_per_minibatch_s,
                "dp_time_s": self.dp_time_s, "speedup": self.speedup,
                "mode": self.mode, "objective": self.objective,
                "microbatches": self.microbatches, "topology": self.topology.to_json(),
                "workers": self.topology.workers, "workers_used": self.workers_used,
                "state_space": self.state_space, "stop_reason": self.stop_reason,
                "notes": list(self.notes), "placeholders": list(self.placeholders)}

    @classmethod
    def from_json(cls, data: dict, *, where: str = "plan") -> "Plan":
        from legato.core.pipeline.topology import Level

        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{where} is not a legato plan (no \"format\": \"{PLAN_FORMAT}\"); "
                            "write one with `legato plan ... -o plan.json`")
        try:
            stages = tuple(PlanStage(**{**s, "nodes": tuple(s["nodes"]),
                                        "ranks": tuple(s["ranks"])}) for s in data["stages"])
            topo = Topology(tuple(Level(**lv) for lv in data["topology"]))
            state_space = data.get("state_space", "exact")
            # plans written before stop_reason existed: a bounded state space was the limit
            stop = StopReason(data.get("stop_reason") or (
                "exhausted" if state_space == "exact" else "budget"))
            return cls(stages, float(data["time_per_minibatch_s"]), float(data["dp_time_s"]),
                       data["mode"], data["objective"], topo, data.get("microbatches"),
                       state_space, tuple(data.get("notes", ())),
                       data.get("model", ""), tuple(data.get("placeholders", ())), stop)
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"{where} is missing or has a malformed field: {err}") from err

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically."""
        return atomic_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        p = Path(path)
        text = read_text(p, PlanError, what="the plan ", kind="a plan is JSON (legato plan -o)")
        try:
            return cls.from_json(json.loads(text), where=str(p))
        except json.JSONDecodeError as err:
            raise PlanError(f"{p} is not JSON ({err.msg} at line {err.lineno})") from err

    def describe(self) -> str:
        lines = [f"plan for {self.model or 'the model'} on {self.topology.describe()} "
                 f"({self.mode} costs, {self.objective} objective"
                 + (f", {self.microbatches} microbatches" if self.microbatches else "") + ")"]
        lines.append(f"  {'stage':>5} {'layers':>6} {'first..last':<24} {'replicas':>8} "
                     f"{'ranks':<16} {'compute ms':>10} {'time ms':>9} {'params MiB':>10}")
        for i, s in enumerate(self.stages):
            span = f"{s.nodes[0]}..{s.nodes[-1]}" if len(s.nodes) > 1 else s.nodes[0]
            ranks = _ranges(s.ranks)
            lines.append(f"  {i:>5} {len(s.nodes):>6} {span:<24} {s.replicas:>8} "
                         f"{ranks:<16} {s.compute_s * 1e3:>10.2f} {s.time_s * 1e3:>9.2f} "
                         f"{s.parameter_bytes / 2**20:>10.1f}")
        lines.append(f"  time per minibatch {self.time_per_minibatch_s * 1e3:.2f} ms; data "
                     f"parallel {self.dp_time_s * 1e3:.2f} ms; speedup {self.speedup:.2f}x "
                     f"({self.shape()} on {self.workers_used} of {self.topology.workers} "
                     "workers)")
        lines.append(f"  search stopped: {self.stop_reason} ({self.state_space} state space)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _ranges(ranks: tuple[int, ...]) -> str:
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


@dataclasses.dataclass
class _Costs:
    """Per level: what one stage (rows x states) costs, and the options."""

    mode: str
    objective: str
    workers: int
    bandwidth_Bps: float
    inner_workers: int
    compute: np.ndarray          # (S+1, S): row l = from after state l-1; inf where not a stage
    params: np.ndarray
    acts: np.ndarray
    opt: np.ndarray
    update: np.ndarray           # optimizer step time of the stage's parameters
    cut: np.ndarray              # (S,) bytes crossing state k (paper) ...
    frontier: np.ndarray         # (S,) ... or of its maximal layers (pipedream)
    ratio: float | None
    memory_bytes: float | None
    straight: bool
    fewer: bool
    microbatches: int


def _stage_time(c: _Costs, compute, params, m, update=0.0, *, base: bool):
    """Time of a stage on m replicas (arrays broadcast); `update` is its optimizer step time,
    which PipeDream's arithmetic leaves out."""
    B, mb = c.bandwidth_Bps, c.microbatches
    if c.objective == "sync":
        allreduce = 2.0 * (m - 1) / m * params / B
        return compute / (mb * m) + (allreduce + update) / mb
    if c.mode == "pipedream":
        comm = 4.0 * (m - 1) * params / (B * m)
        if base:   # PipeDream divides by the machines within a machine in its base case only
            comm = comm / c.inner_workers
        return (compute + comm) / m
    # each replica steps once per round of m minibatches
    return (np.maximum(compute, 2.0 * (m - 1) * params / B) + update) / m


def _memory_ok(c: _Costs, params, acts, opt, m, downstream):
    """Whether a stage on m replicas with `downstream` workers after it fits the cap."""
    if c.memory_bytes is None:
        return np.ones(np.broadcast(params, m, downstream).shape, dtype=bool)
    if c.mode == "pipedream" and c.objective == "async":
        need = np.ceil(downstream / m) * (acts + params)
    elif c.objective == "async":
        versions = np.ceil((downstream + m) / m)
        need = params * versions + opt + acts * versions
    else:  # sync: one weight version; in flight at most min(m, stages from here on)
        in_flight = np.minimum(c.microbatches, downstream + 1)
        need = params + opt + acts / c.microbatches * in_flight
    return need <= c.memory_bytes


def _solve(c: _Costs, sub: np.ndarray, preds: list[np.ndarray], rows: int, *,
           combine: str = "max", cap: float = math.inf):
    """One level's DP over `rows` start points. A[row, j, r]: best value of the layers from the
    row's start to state j on r workers; terms above `cap` are excluded; `combine` is how a
    prefix and its last stage combine ("max": throughput; "sum": latency)."""
    S, M = c.compute.shape[1], c.workers
    A = np.full((rows, S, M + 1), np.inf)
    choice_k = np.full((rows, S, M + 1), _BASE, dtype=np.int64)
    choice_m = np.zeros((rows, S, M + 1), dtype=np.int64)
    r_all = np.arange(1, M + 1, dtype=np.float64)
    bounded = math.isfinite(cap)
    for j in range(S):
        vr = np.flatnonzero(sub[:rows, j])          # the rows that may end at state j
        if len(vr) == 0:
            continue
        # base: the row's start..j as one stage on r replicas
        par = c.params[vr, j][:, None]
        base = _stage_time(c, c.compute[vr, j][:, None], par, r_all[None, :],
                           c.update[vr, j][:, None], base=True)
        ok = _memory_ok(c, par, c.acts[vr, j][:, None], c.opt[vr, j][:, None],
                        r_all[None, :], M - r_all[None, :])
        base = np.where(ok, base, np.inf)
        if c.straight:
            base[:, 1:] = np.inf
        if bounded:
            base = np.where(base <= cap, base, np.inf)
        A[vr, j, 1:] = base
        ks = preds[j]
        if len(ks) == 0 or M == 1:
            if c.fewer:                 # no earlier state: only leaving workers idle helps
                for r in range(2, M + 1):
                    better = A[vr, j, r - 1] < A[vr, j, r]
                    A[vr, j, r] = np.where(better, A[vr, j, r - 1], A[vr, j, r])
                    choice_k[vr, j, r] = np.where(better, _CARRY, choice_k[vr, j, r])
            continue
        kp = c.params[ks + 1, j][:, None]
        last = _stage_time(c, c.compute[ks + 1, j][:, None], kp, r_all[None, :],
                           c.update[ks + 1, j][:, None], base=False)
        xfer = _transfer(c, ks, j, S - 1, r_all)                               # (nK, M)
        if bounded:
            last = np.where(last <= cap, last, np.inf)
            xfer = np.where(xfer <= cap, xfer, np.inf)
        ka, ko = c.acts[ks + 1, j][:, None], c.opt[ks + 1, j][:, None]
        before = A[vr][:, ks, :]              # final: every k in preds(j) precedes j (nv, nK, M+1)
        here = A[vr, j, :]                    # (nv, M+1), written back below
        ck, cm = choice_k[vr, j, :], choice_m[vr, j, :]
        nv = len(vr)
        for r in range(2, M + 1):
            if c.fewer:
                better = here[:, r - 1] < here[:, r]
                here[:, r] = np.where(better, here[:, r - 1], here[:, r])
                ck[:, r] = np.where(better, _CARRY, ck[:, r])
            mp = np.arange(1, 2 if c.straight else r)                # replicas of the last stage
            ok = _memory_ok(c, kp, ka, ko, mp[None, :].astype(np.float64), M - r)
            lt = np.where(ok, last[:, mp - 1], np.inf)[None]                  # (1, nK, nm)
            prev = before[:, :, r - mp]                                        # (nv, nK, nm)
            xt = xfer[None, :, mp - 1]
            if combine == "sum":
                cand = prev + lt + xt
            else:
                cand = np.maximum(np.maximum(prev, lt), xt)
            flat = cand.reshape(nv, -1)
            idx = np.argmin(flat, axis=1)            # first minimum: smallest k, then fewest m'
            best = flat[np.arange(nv), idx]
            improve = best < here[:, r]
            here[:, r] = np.where(improve, best, here[:, r])
            ck[:, r] = np.where(improve, ks[idx // len(mp)], ck[:, r])
            cm[:, r] = np.where(improve, mp[idx % len(mp)], cm[:, r])
        A[vr, j, :] = here
        choice_k[vr, j, :], choice_m[vr, j, :] = ck, cm
    return A, choice_k, choice_m


def _transfer(c: _Costs, ks: np.ndarray, j: int, last_state: int, r_all: np.ndarray):
    B = c.bandwidth_Bps
    if c.objective == "sync":
        t = 2.0 * c.cut[ks] / (B * c.microbatches)
        return np.repeat(t[:, None], len(r_all), axis=1)
    if c.mode == "paper":
        return np.repeat((2.0 * c.cut[ks] / B)[:, None], len(r_all), axis=1)
    if c.ratio is None:
        return np.zeros((len(ks), len(r_all)))
    inp = 2.0 * c.frontier[ks][:, None] / (B * r_all[None, :]) / c.ratio
    if j < last_state:
        out = 2.0 * c.frontier[j] / (B * r_all) / c.ratio
        inp = np.maximum(inp, out[None, :])
    return inp


def _backtrack(choice_k, choice_m, row: int, j: int, r: int) -> list[tuple[int, int, int]]:
    """(row, state, replicas) of each stage, front first."""
    out = []
    while True:
        k = int(choice_k[row, j, r])
        if k == _CARRY:
            r -= 1
            continue
        if k == _BASE:
            out.append((row, j, r))
            break
        m = int(choice_m[row, j, r])
        out.append((k + 1, j, m))
        j, r = k, r - m
    return out[::-1]


def plan(profile: LayerProfile, topology: Topology | int, *, bandwidth: str | float = "1GB/s",
         mode: str = "pipedream", objective: str = "async", microbatches: int | None = None,
         activation_compression_ratio: float | None = None, memory_bytes: float | None = None,
         straight: bool = False, fewer_machines: bool = False, max_states: int | None = None,
         max_caps: int = 256, keep_tied: bool | None = None,
         boundary_slack: float = 0.02) -> Plan:
    """Partition `profile` over `topology` (or N workers at `bandwidth`).

    Args:
        profile: the layer DAG with costs for one minibatch.
        topology: a `Topology`, or a worker count for one level at `bandwidth`.
        mode: "pipedream" (its released optimizer's arithmetic) or "paper".
        objective: "async" (PipeDream's 1F1B: the slowest stage) or "sync" (GPipe/1F1B-flush
            makespan with `microbatches`; single-level topologies).
        activation_compression_ratio: in pipedream mode, count activation transfer divided by it.
        memory_bytes: per-worker memory cap.
        straight: no stage replication. fewer_machines: allow leaving workers idle.
        max_states: bound on cut points before the graph is linearized (see `_states.py`);
            default 1000 for one topology level, 500 for several (an inner level is solved
            for every start point, which costs the cube of the states).
        max_caps: sync objective: bound on slowest-stage candidates tried.
        keep_tied: keep the layers sharing a parameter (`meta["tied"]`) in one stage; default
            True for the async objective, False for sync (see the module docstring).
        boundary_slack: for profiles of traced models (layer ids are module paths), move each
            cut to the outermost module boundary whose plan is at most this fraction slower
            than the best (0: keep the best plan's cuts); the notes say what moved.
    Returns:
        The `Plan`; `stop_reason` says whether a limit (`max_states`, `max_caps`) cut the
        search short (BUDGET) and `notes` say which.
    """
    if mode not in MODES:
        raise PlanError(f"mode={mode!r} is unknown; use one of {list(MODES)}")
    if objective not in OBJECTIVES:
        raise PlanError(f"objective={objective!r} is unknown; use one of {list(OBJECTIVES)}")
    if isinstance(topology, int):
        topology = Topology.flat(topology, bandwidth)
    if objective == "sync":
        if not microbatches or microbatches < 1:
            raise PlanError("objective='sync' needs microbatches >= 1 (the number per minibatch "
                            "of the synchronous schedule)")
        if len(topology.levels) > 1:
            raise PlanError("objective='sync' plans one topology level; give --workers N "
                            "--bandwidth B, or use the async objective for a hierarchy")
    if activation_compression_ratio is not None and activation_compression_ratio <= 0:
        raise PlanError(f"activation_compression_ratio={activation_compression_ratio} must be "
                        "positive")
    if max_states is None:
        max_states = 1000 if len(topology.levels) == 1 else 500
    if max_states < 2:
        raise PlanError(f"max_states={max_states} must be at least 2")
    if not 0 <= boundary_slack < 1:
        raise PlanError(f"boundary_slack={boundary_slack!r} must be a fraction in [0, 1) (the "
                        "slowdown a cut at a module boundary may cost; 0 turns it off)")
    if max_caps < 1:
        raise PlanError(f"max_caps={max_caps} must be at least 1 (sync objective: candidate "
                        "bounds on the slowest stage to try)")
    if keep_tied is None:
        keep_tied = objective == "async"
    space = build_states(profile, max_states=max_states,
                         space="antichain" if mode == "pipedream" else "ideals",
                         keep_tied=keep_tied)
    S = space.size
    if space.kind == "antichain":
        # PipeDream's rows: a run of states may start after state i-1 and end at any later
        # state j of its order (costs are differences of the states' totals)
        sub = np.triu(np.ones((S + 1, S), dtype=bool))
    else:
        sub = np.zeros((S + 1, S), dtype=bool)
        sub[0, :] = True
        for j, ks in enumerate(space.preds):
            sub[ks + 1, j] = True

    def diff(total: np.ndarray) -> np.ndarray:
        prefix = np.concatenate([[0.0], total])
        m = total[None, :] - prefix[:, None]
        return np.where(sub, m, np.inf)

    compute = diff(space.compute_s)
    params, acts, opt, update = (np.where(sub, diff(x), 0.0) for x in
                                 (space.parameter_bytes, space.activation_bytes,
                                  space.optimizer_state_bytes, space.update_s))
    notes = list(space.notes)
    stops = [space.stop_reason]
    levels = topology.levels
    if space.tied:          # sync objective, one level: the copies' gradient sum per stage
        update = update + np.where(sub, 2.0 * _split_tied_bytes(space, sub)
                                   / levels[0].bandwidth_Bps, 0.0)
    results = []
    inner = 1
    for li, level in enumerate(levels):
        final = li == len(levels) - 1
        # an outer level's compute times already hold the inner stages' updates
        costs = _Costs(mode, objective, level.workers, level.bandwidth_Bps, inner, compute,
                       params, acts, opt, update if li == 0 else np.zeros_like(update),
                       space.cut_bytes, space.frontier_bytes,
                       activation_compression_ratio, memory_bytes, straight, fewer_machines,
                       microbatches or 1)
        rows = 1 if final else S + 1
        if objective == "sync":
            A, ck, cm, value, sync_note, sync_stop = _solve_sync(costs, sub, space.preds,
                                                                 max_caps)
            stops.append(sync_stop)
            if sync_note:
                notes.append(sync_note)
        else:
            A, ck, cm = _solve(costs, sub, space.preds, rows)
            value = A[0, S - 1, level.workers]
        results.append((A, ck, cm))
        if not final:
            compute = np.where(sub, A[:, :, level.workers], np.inf)
        inner = level.workers
    if not math.isfinite(value):
        why = _why_infeasible(space, topology, memory_bytes, straight, fewer_machines)
        if keep_tied and profile.meta.get("tied"):
            why += ("; layers sharing a parameter (tied weights) were kept in one stage"
                    + (" (the async objective's schedules keep a weight version per stage): "
                       "plan with objective='sync' (--objective sync --microbatches M) to let "
                       "their stages share it" if objective == "async" else ""))
        raise PlanError(why)

    segments = _expand(results, levels, S)
    if boundary_slack > 0 and len(levels) == 1 and profile.meta.get("graph") == "fx":
        segments, value, moved = _snap_to_modules(space, profile, costs, sub, segments,
                                                  float(value), boundary_slack)
        notes += moved
    stages = _stages(space, profile, segments, levels, mode, objective, microbatches or 1)
    notes += _tied_notes(space, stages)
    dp = _dp_time(space, topology, mode, objective, microbatches or 1)
    return Plan(tuple(stages), float(value), dp, mode, objective, topology,
                microbatches if objective == "sync" else None, space.kind, tuple(notes),
                str(profile.meta.get("model", "")), tuple(space.attached), _overall(stops))


def _overall(stops: list[StopReason]) -> StopReason:
    """The plan's stop reason: BUDGET if any part hit a limit, else CONVERGED if the sync
    search stopped on its bound, else EXHAUSTED."""
    for reason in (StopReason.BUDGET, StopReason.CONVERGED):
        if reason in stops:
            return reason
    return StopReason.EXHAUSTED


def _solve_sync(c: _Costs, sub, preds, max_caps: int):
    """min over caps of (sum of stage terms under the cap) + (microbatches - 1) * slowest;
    returns (A, choice_k, choice_m, value, note, stop_reason): CONVERGED when a larger cap
    could not win, BUDGET after `max_caps` caps, EXHAUSTED when every cap was tried."""
    S, M = c.compute.shape[1], c.workers
    A_max, ck_max, cm_max = _solve(c, sub, preds, 1, combine="max")
    floor = A_max[0, S - 1, M]
    if not math.isfinite(floor):
        return A_max, ck_max, cm_max, math.inf, None, StopReason.EXHAUSTED
    A_sum, ck, cm = _solve(c, sub, preds, 1, combine="sum")
    sum_floor = A_sum[0, S - 1, M]
    # the optimum's slowest term is one of the terms a plan can have
    r_all = np.arange(1, M + 1, dtype=np.float64)
    finite = np.isfinite(c.compute)
    terms = _stage_time(c, c.compute[finite][:, None], c.params[finite][:, None],
                        r_all[None, :], c.update[finite][:, None], base=True).ravel()
    terms = np.concatenate([terms, 2.0 * c.cut / (c.bandwidth_Bps * c.microbatches)])
    caps = np.unique(terms[np.isfinite(terms) & (terms >= floor * (1 - 1e-12))])
    note = None
    stop = StopReason.EXHAUSTED
    best: tuple[float, tuple | None] = (math.inf, None)
    for tried, cap in enumerate(caps):
        if (c.microbatches - 1) * cap + sum_floor >= best[0]:
            stop = StopReason.CONVERGED   # a larger bound cannot win: the sum only gets smaller
            break
        if tried == max_caps:
            note = (f"sync objective: stopped after {max_caps} of {len(caps)} candidate bounds "
                    "on the slowest stage without proving the best (raise max_caps)")
            stop = StopReason.BUDGET
            break
        A, ck, cm = _solve(c, sub, preds, 1, combine="sum", cap=float(cap))
        total = A[0, S - 1, M]
        if not math.isfinite(total):
            continue
        slowest = max(_segment_terms(c, _backtrack(ck, cm, 0, S - 1, M)))
        value = total + (c.microbatches - 1) * slowest
        if value < best[0]:
            best = (value, (A, ck, cm))
    if best[1] is None:
        # no cap tried gave a plan (the first caps can sit an ulp below the floor, so a
        # max_caps of 1 or 2 may try none that works): the min-max plan, at its own makespan
        terms = _segment_terms(c, _backtrack(ck_max, cm_max, 0, S - 1, M))
        return (A_max, ck_max, cm_max, sum(terms) + (c.microbatches - 1) * max(terms), note,
                stop)
    A, ck, cm = best[1]
    return A, ck, cm, best[0], note, stop


def _segment_terms(c: _Costs, segs) -> list[float]:
    """The stage and transfer terms of a backtracked sync plan."""
    out = []
    for row, j, r in segs:
        out.append(float(_stage_time(c, c.compute[row, j], c.params[row, j], float(r),
                                     c.update[row, j], base=True)))
        if row > 0:
            out.append(2.0 * c.cut[row - 1] / (c.bandwidth_Bps * c.microbatches))
    return out


def _module_depth(a: str, b: str) -> int:
    """How deep in the module tree an edge from layer `a` to layer `b` runs: the length of
    the common prefix of their dotted ids (`h.0.mlp.0` -> `h.0.mlp.1`: 3, inside h.0.mlp;
    `h.0.add#2` -> `h.1.ln_1`: 1, between two blocks of h)."""
    depth = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        depth += 1
    return depth


def _plan_value(c: _Costs, segs: list[tuple[int, int, int]], last_state: int) -> float:
    """A one-level plan's objective: the slowest stage or transfer (async), or the sum of the
    terms plus (microbatches - 1) times the slowest (sync)."""
    if c.objective == "sync":
        terms = _segment_terms(c, segs)
        return sum(terms) + (c.microbatches - 1) * max(terms)
    worst = 0.0
    r_all = np.arange(1, c.workers + 1, dtype=np.float64)
    for row, j, r in segs:
        worst = max(worst, float(_stage_time(c, c.compute[row, j], c.params[row, j], float(r),
                                             c.update[row, j], base=row == 0)))
        if row > 0:
            worst = max(worst, float(_transfer(c, np.array([row - 1]), j, last_state,
                                               r_all)[0, r - 1]))
    return worst


def _snap_to_modules(space: StateSpace, profile: LayerProfile, c: _Costs, sub: np.ndarray,
                     segments: list, best: float, slack: float):
    """Move each cut, front first, to the state whose crossing edges run least deep in the
    module tree, among those keeping the plan within `slack` of `best` (ties: the faster);
    returns (segments, value, notes)."""
    index = {x: i for i, x in enumerate(space.node_ids)}
    edges = [(index[a], index[b], _module_depth(a, b)) for a, b in profile.edges
             if a in index and b in index]

    @functools.cache
    def depth(k: int) -> int:
        m = space.masks[k]
        return max((d for a, b, d in edges if (m >> a) & 1 and not (m >> b) & 1), default=0)

    def last_layers(k: int) -> str:
        inside = set(space.nodes_of(space.masks[k]))
        ends = [a for a, b in profile.edges if a in inside and b in index and b not in inside]
        return ", ".join(sorted(set(ends))[:3])

    segs = [list(x) for x in segments]
    S = space.size
    value = best
    base = _plan_value(c, [(a, b, r) for a, b, _, r in segs], S - 1)
    notes = []
    for i in range(len(segs) - 1):
        row, j = segs[i][0], segs[i][1]
        end = segs[i + 1][1]
        here = depth(j)
        options = []
        for k in range(S):
            if k == j or not sub[row, k] or not sub[k + 1, end]:
                continue
            d = depth(k)
            if d >= here:
                continue
            trial = [(a, b, r) for a, b, _, r in segs]
            trial[i] = (row, k, segs[i][3])
            trial[i + 1] = (k + 1, end, segs[i + 1][3])
            v = _plan_value(c, trial, S - 1)
            if v <= base * (1 + slack):
                options.append((d, v, k))
        if options:
            d, v, k = min(options)
            notes.append(f"cut {i} moved from after {last_layers(j)} (module depth {here}) to "
                         f"after {last_layers(k)} (depth {d}), a module boundary: "
                         f"{(v / base - 1) * 100:+.1f}% predicted time (boundary_slack "
                         f"{slack:g})")
            segs[i][1], segs[i + 1][0], value = k, k + 1, v
    return [tuple(x) for x in segs], value, notes


def _split_tied_bytes(space: StateSpace, sub: np.ndarray) -> np.ndarray:
    """(S+1, S): per stage (row: after state row-1, to state j) the bytes of the tied
    parameters it holds only some users of."""
    S = space.size
    out = np.zeros((S + 1, S))
    for mask, nbytes, _ in space.tied:
        inside = np.array([0] + [(m & mask).bit_count() for m in space.masks])
        held = inside[1:][None, :] - inside[:, None]       # users in the stage (prev ⊂ j)
        partial = (held > 0) & (held < mask.bit_count())
        out += np.where(partial & sub, nbytes, 0.0)
    return out


def _stage_tied_bytes(space: StateSpace, nodes: tuple[str, ...]) -> float:
    index = {x: i for i, x in enumerate(space.node_ids)}
    mask = 0
    for x in nodes:
        if x in index:
            mask |= 1 << index[x]
    return sum(b for g, b, _ in space.tied if 0 < (g & mask).bit_count() < g.bit_count())


def _tied_notes(space: StateSpace, stages: list[PlanStage]) -> list[str]:
    notes = []
    for mask, nbytes, name in space.tied:
        users = set(space.nodes_of(mask))
        holding = [i for i, st in enumerate(stages) if users & set(st.nodes)]
        if len(holding) > 1:
            notes.append(f"tied parameter {name} ({nbytes:.0f} B) is used by stages {holding}: "
                         "each keeps a copy and their gradients are summed between them every "
                         "step (costed as 2 x bytes / bandwidth in each)")
    return notes


def _expand(results, levels, S: int) -> list[tuple[int, int, tuple[int, ...], int]]:
    """Backtrack from the outermost level inwards: (row, state, ranks, innermost replicas).

    A stage of level l on r units runs, on each of those units, the level-(l-1) plan of its
    layers; ranks number workers innermost first (rank = unit * unit_size + index)."""
    sizes = [math.prod(lv.workers for lv in levels[:i]) for i in range(len(levels))]
    top = len(levels) - 1
    _, ck, cm = results[top]
    segs, offset = [], 0
    for row, j, r in _backtrack(ck, cm, 0, S - 1, levels[top].workers):
        segs.append((row, j, [(offset + t) * sizes[top] for t in range(r)], r))
        offset += r
    for li in range(top - 1, -1, -1):
        _, ck, cm = results[li]
        nxt = []
        for row, j, bases, _ in segs:
            g = 0
            for row2, j2, r2 in _backtrack(ck, cm, row, j, levels[li].workers):
                nxt.append((row2, j2, [b + (g + t) * sizes[li] for b in bases
                                       for t in range(r2)], r2))
                g += r2
        segs = nxt
    return [(row, j, tuple(sorted(ranks)), r) for row, j, ranks, r in segs]


def _stages(space: StateSpace, profile: LayerProfile, segments, levels, mode: str,
            objective: str, microbatches: int) -> list[PlanStage]:
    order = {x: i for i, x in enumerate(profile.topological_order())}
    inner = _Costs(mode, objective, levels[0].workers, levels[0].bandwidth_Bps, 1,
                   np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)),
                   np.zeros((1, 1)), space.cut_bytes, space.frontier_bytes, None, None, False, False, microbatches)
    stages = []
    member: dict[str, int] = {}
    placed = 0
    for i, (row, j, ranks, r_inner) in enumerate(segments):
        # a stage holds the layers of its last state not placed before (the difference from
        # the previous state when that is a subset, as it always is outside PipeDream's rows)
        for x in space.nodes_of(space.masks[j] & ~placed):
            member[x] = i
        placed |= space.masks[j]
    for x, host in space.attached.items():
        member[x] = member[host]
    for i, (row, j, ranks, r_inner) in enumerate(segments):
        nodes = sorted((x for x, s in member.items() if s == i), key=order.get)
        layer = [profile.node(x) for x in nodes if x not in space.attached]   # costed layers
        compute = sum(n.compute_s for n in layer)
        params = sum(n.parameter_bytes for n in layer)
        update = sum(n.update_s for n in layer)
        if space.tied:
            update += 2.0 * _stage_tied_bytes(space, tuple(nodes)) / levels[0].bandwidth_Bps
        t = float(_stage_time(inner, compute, params, float(r_inner), update, base=row == 0))
        t /= len(ranks) / r_inner                 # outer replication shares the minibatches
        out = 0 if j == space.size - 1 else int(space.cut_bytes[j])
        stages.append(PlanStage(tuple(nodes), len(ranks), ranks, compute, t, params,
                                sum(n.activation_bytes for n in layer),
                                sum(n.optimizer_state_bytes for n in layer), out))
    return stages


def _dp_time(space: StateSpace, topology: Topology, mode: str, objective: str,
             microbatches: int) -> float:
    """Data parallelism over every worker, in the same cost mode."""
    t = float(space.compute_s[-1])
    P = float(space.parameter_bytes[-1])
    U = float(space.update_s[-1])   # data parallelism: every worker updates every weight
    if objective == "sync":
        M = topology.workers
        ar = sum(2.0 * (lv.workers - 1) / lv.workers * P / lv.bandwidth_Bps
                 for lv in topology.levels)
        return t / M + ar + U
    inner = 1
    for lv in topology.levels:
        M, B = lv.workers, lv.bandwidth_Bps
        if mode == "pipedream":
            t = (t + 4.0 * (M - 1) * P / (B * M) / inner) / M
        else:
            t = max(t, 2.0 * (M - 1) * P / B) / M
        inner = M
    return t if mode == "pipedream" else t + U


def _why_infeasible(space: StateSpace, topology: Topology, memory_bytes, straight: bool,
                    fewer: bool) -> str:
    N = topology.workers
    if straight and not fewer and space.size < N:
        return (f"a straight pipeline (no replication) needs one stage per worker, but the "
                f"profile has {space.size} cut points for {N} workers; pass fewer_machines "
                "(--fewer-machines), allow replication, or use fewer workers")
    if memory_bytes is not None:
        P = float(space.parameter_bytes[-1])
        return (f"no plan fits the memory cap of {memory_bytes / 2**30:.2f} GiB per worker "
                f"(the model has {P / 2**30:.2f} GiB of parameters and "
                f"{float(space.activation_bytes[-1]) / 2**30:.2f} GiB of activations per "
                "minibatch, and weight stashing keeps several versions); raise --memory, use "
                "more workers, or a smaller minibatch")
    return (f"no plan for {N} workers satisfies the constraints (straight={straight}, "
            f"fewer_machines={fewer}); relax one of them")
