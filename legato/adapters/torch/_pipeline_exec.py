"""The pipeline interpreter: runs one rank's action list for one training step, with weight
versions, a version ledger and a timeline.

[Note: weight versions without in-place tricks]
Stage s is at version k after k optimizer steps (counted over the trainer's life). A forward
runs `torch.func.functional_call(stage, weights, inputs)` where `weights` are either the live
parameters or a detached copy of one version (a snapshot), and the backward differentiates with
respect to exactly those tensors, then adds the gradients into the live parameters' `.grad`.
A forward runs on a snapshot when it asks for an older version (vertical sync, 2BW), or when a
STEP of its stage comes between it and its backward on this rank (weight stashing: the F is
followed by STASH). The copy of a version is made once and shared by every microbatch using
it; it is dropped when no microbatch in flight uses it and no later F asks for it. Otherwise
the forward uses the live parameters, which no STEP touches before the backward (the verifier
guarantees it, and autograd's version counters would catch it). BatchNorm running statistics
and other buffers are not versioned (PipeDream exempts them): every forward updates the live
buffers.

[Note: message tags]
Every point-to-point message carries the tag (((d * S + s) * M + i) * T + j): d = 0 for an
activation and 1 for a gradient, s the stage that receives it, i the microbatch, j the tensor's
index in the cut, S stages, M microbatches per step and T the most tensors in a cut. gloo
matches a receive by (source rank, tag), so messages meet by (kind, stage, microbatch) as the
IR says, whatever order the two ranks issue them in. NCCL ignores tags and matches in issue
order per pair; the trainer checks that the schedule's per-pair orders agree before using it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call

try:   # torch's own input/weight split of a stage's backward ([Note: split backward])
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
except ImportError:  # pragma: no cover - torch builds without pipelining
    stage_backward_input = stage_backward_weight = None

from legato.adapters._pipeline_graph import first_line
from legato.adapters.torch._pipeline_split import TensorSpec, Tie
from legato.core.errors import ConfigError, LegatoError
from legato.core.pipeline import Action, ActionKind, Schedule, Span

__all__ = ["PipelineCommError", "TieGroup", "VersionRecord", "equalize_ties", "make_tie_groups",
           "microbatch_rng", "microbatch_seed", "reduce_grads"]

K = ActionKind
TAG_LIMIT = 2 ** 31
LEDGER_STEPS = 16  # the ledger keeps the records of this many most recent steps


class PipelineCommError(LegatoError):
    """A point-to-point message or all-reduce of the pipeline failed or timed out (a peer rank
    died or stalled)."""


@dataclasses.dataclass
class VersionRecord:
    """Which weight version one (stage, microbatch) used, forward and backward.

    Versions count the stage's optimizer steps since the trainer (or checkpoint) began.
    Fingerprints (with `check_versions=True`) are the float64 sum of the weights each pass
    differentiated through, taken when the pass ran.
    """

    step: int
    stage: int
    microbatch: int
    rank: int
    forward_version: int
    backward_version: int | None = None
    stashed: bool = False
    forward_fingerprint: float | None = None
    backward_fingerprint: float | None = None


def microbatch_seed(seed: int, step: int, stage: int, microbatch: int) -> int:
    """The random seed of one stage's forward of one microbatch (dropout masks)."""
    digest = hashlib.blake2b(f"legato-pipeline/{seed}/{step}/{stage}/{microbatch}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


@contextlib.contextmanager
def microbatch_rng(seed: int, step: int, stage: int, microbatch: int,
                   device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's generator seeded for (seed, step, stage, microbatch), restoring
    the previous random state after; a single-process reference uses it to reproduce dropout."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(microbatch_seed(seed, step, stage, microbatch))
        yield


def fingerprint(weights: dict[str, torch.Tensor]) -> float:
    return float(sum(t.detach().double().sum().item() for t in weights.values()))


class StageRuntime:
    """One stage hosted on this rank: its module, trainable parameters, optimizer, group.

    `params` are every trainable parameter the stage runs with; `owned` those its optimizer
    steps and its replicas all-reduce: a tied parameter ([Note: tied weights] in pipeline.py)
    is summed by its tie group instead, and stepped by the first stage on this rank using it."""

    def __init__(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                 group: Any, replicas: int, num_stages: int,
                 in_specs: tuple[TensorSpec, ...], out_specs: tuple[TensorSpec, ...],
                 owned: list[nn.Parameter] | None = None, tied: frozenset[int] = frozenset()
                 ) -> None:
        self.index, self.module, self.optimizer = index, module, optimizer
        self.group, self.replicas = group, replicas
        self.first, self.last = index == 0, index == num_stages - 1
        self.in_specs, self.out_specs = in_specs, out_specs
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.owned = [p for _, p in self.params] if owned is None else list(owned)
        self.reduced = [p for p in self.owned if id(p) not in tied]
        self.version = 0
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def live(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def copy(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().requires_grad_(True) for n, p in self.params}


@dataclasses.dataclass(frozen=True)
class TieGroup:
    """The ranks holding copies of some tied parameters, their process group (None when one
    rank holds them all), and this rank's copies."""

    ranks: tuple[int, ...]
    group: Any
    params: tuple[nn.Parameter, ...]
    names: tuple[str, ...]


def make_tie_groups(ties: Sequence[Tie], modules: Sequence[nn.Module],
                    stage_ranks: Sequence[Sequence[int]], rank: int, *,
                    timeout: datetime.timedelta | None = None, backend: str | None = None
                    ) -> list[TieGroup]:
    """One process group per set of ranks holding tied parameters (the ranks of every stage
    using them, replicas included). Every rank must call this with the same ties, in the same
    place (new_group is collective); each gets the groups it is in, in one order."""
    by_ranks: dict[tuple[int, ...], list[Tie]] = {}
    for t in ties:
        ranks = tuple(sorted({r for s in t.stages for r in stage_ranks[s]}))
        by_ranks.setdefault(ranks, []).append(t)
    out = []
    for ranks, members in sorted(by_ranks.items()):
        kw: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        if backend is not None:
            kw["backend"] = backend
        group = dist.new_group(list(ranks), **kw) if len(ranks) > 1 else None
        if rank not in ranks:
            continue
        mine = [(t, next(s for s in t.stages if rank in stage_ranks[s])) for t in members]
        out.append(TieGroup(ranks, group, tuple(t.parameter_in(modules, s) for t, s in mine),
                            tuple(t.name for t, _ in mine)))
    return out


def equalize_ties(groups: Sequence[TieGroup]) -> None:
    """Every copy of a tied parameter starts as the lowest holding rank's."""
    with torch.no_grad():
        for g in groups:
            if g.group is not None:
                for p in g.params:
                    dist.broadcast(p.data, src=g.ranks[0], group=g.group)


def reduce_grads(params: Sequence[nn.Parameter], group: Any, *, divide: int = 1,
                 on_error: Callable[[str, Exception], Exception]) -> None:
    """Sum `params`' gradients over `group` in one all-reduce per dtype (a missing gradient
    counts as zeros), divided by `divide`; each parameter's .grad becomes its slice of the
    sum."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for k, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(k)
    for idx in by_dtype.values():
        flat = torch.cat([grads[k].reshape(-1) for k in idx])
        try:
            dist.all_reduce(flat, group=group, async_op=True).wait()
        except Exception as err:
            raise on_error("all-reduce", err) from err
        if divide != 1:
            flat.div_(divide)
        offset = 0
        for k in idx:
            p = params[k]
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()


@dataclasses.dataclass
class _InFlight:
    version: int
    weights: dict[str, torch.Tensor]
    on_snapshot: bool
    leaves: list[torch.Tensor | None]
    heads: list[torch.Tensor]
    record: VersionRecord
    grads: list[torch.Tensor | None] | None = None
    # after I: the intermediate gradients W starts from (torch's split backward), or None
    param_groups: list | None = None


class Program:
    """What the interpreter precomputes from one rank's action list."""

    def __init__(self, schedule: Schedule, rank: int) -> None:
        self.actions = list(schedule.actions.get(rank, []))
        back_at: dict[tuple[int, int], int] = {}
        steps_at: dict[int, list[int]] = {}
        self.explicit: dict[int, list[tuple[int, int]]] = {}
        for q, a in enumerate(self.actions):
            if a.kind in (K.BACKWARD, K.BACKWARD_INPUT):
                back_at[(a.stage, a.microbatch)] = q
            elif a.kind is K.STEP:
                steps_at.setdefault(a.stage, []).append(q)
            elif a.kind is K.FORWARD and a.version is not None:
                self.explicit.setdefault(a.stage, []).append((q, a.version))
        self.copy_at: set[int] = set()
        for p, a in enumerate(self.actions):
            if a.kind is K.FORWARD:
                q = back_at.get((a.stage, a.microbatch), len(self.actions))
                if any(p < x < q for x in steps_at.get(a.stage, ())):
                    self.copy_at.add(p)

    def needed_later(self, stage: int, pc: int, base: int) -> set[int]:
        return {base + v for q, v in self.explicit.get(stage, ()) if q > pc}


class Interpreter:
    """Runs this rank's actions; state that lives across steps (stages, groups, ledger)."""

    def __init__(self, *, schedule: Schedule, rank: int, stages: dict[int, StageRuntime],
                 boundaries: list[tuple[TensorSpec, ...]], p2p_group: Any,
                 device: torch.device, loss_fn: Callable, seed: int, timeout_s: float,
                 check_versions: bool, ties: Sequence[TieGroup] = ()) -> None:
        self.schedule, self.rank, self.stages = schedule, rank, stages
        self.ties = [t for t in ties if t.group is not None]
        self.ties_summed = False
        self.boundaries, self.p2p, self.device = boundaries, p2p_group, device
        self.loss_fn, self.seed, self.timeout_s = loss_fn, seed, timeout_s
        self.check_versions = check_versions
        self.program = Program(schedule, rank)
        mps = schedule.meta.get("microbatches_per_step")
        # [Note: loss scaling] synchronous schedules and 2BW accumulate `microbatches_per_step`
        # microbatches (over all replicas) into one step: each loss is divided by that count
        # and replicas sum their gradients. PipeDream's microbatches are minibatches: the loss
        # is not scaled and replicas average (as data parallelism does).
        self.loss_div = int(mps) if mps else 1
        self.average = not mps
        self.width = max([len(b) for b in boundaries] + [1])
        self.ledger: list[VersionRecord] = []
        self.spans: list[Span] = []
        tags = 2 * schedule.num_stages * schedule.num_microbatches * self.width
        if tags > TAG_LIMIT:
            raise ConfigError(f"{tags} message tags are needed (2 x {schedule.num_stages} "
                              f"stages x {schedule.num_microbatches} microbatches x "
                              f"{self.width} tensors per cut), more than gloo's {TAG_LIMIT}; "
                              "use fewer microbatches per step")

    def tag(self, direction: int, stage: int, microbatch: int, index: int) -> int:
        s, m = self.schedule.num_stages, self.schedule.num_microbatches
        return ((direction * s + stage) * m + microbatch) * self.width + index

    # -- one step ---------------------------------------------------------------------------
    def run(self, step_no: int, inputs: list | None, targets: list | None, origin: float
            ) -> list[torch.Tensor]:
        """Run the action list once; returns this rank's microbatch losses (last stage)."""
        self.step_no, self.inputs, self.targets = step_no, inputs, targets
        self.ledger = [r for r in self.ledger if r.step > step_no - LEDGER_STEPS]
        self.base = {s: st.version for s, st in self.stages.items()}
        self.inbox: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        self.outbox: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        self.flight: dict[tuple[int, int], _InFlight] = {}
        self.stashed: dict[tuple[int, int], int] = {}
        self.restored: dict[tuple[int, int], int] = {}
        self.sends: list[tuple[Any, torch.Tensor, Action, int]] = []
        self.losses: list[torch.Tensor] = []
        self.ties_summed = False
        spans: list[Span] = []
        handlers = {K.FORWARD: self._forward, K.BACKWARD: self._backward,
                    K.BACKWARD_INPUT: self._backward, K.BACKWARD_WEIGHT: self._backward,
                    K.SEND_F: self._send, K.SEND_B: self._send, K.RECV_F: self._recv,
                    K.RECV_B: self._recv, K.ALLREDUCE: self._allreduce, K.STEP: self._step,
                    K.STASH: self._stash, K.RESTORE: self._restore}
        try:
            for pc, a in enumerate(self.program.actions):
                t0 = time.perf_counter()
                try:
                    handlers[a.kind](a, pc)
                except LegatoError:
                    raise
                except Exception as err:
                    err.add_note(f"[rank {self.rank}] while running {a} (action {pc} of "
                                 f"trainer step {step_no})")
                    raise
                spans.append(Span(self.rank, a, t0 - origin, time.perf_counter() - origin))
            for work, _, a, pc in self.sends:
                self._wait(work, a, pc, "send")
        finally:
            self.spans = spans
            self.sends = []
            for st in self.stages.values():
                st.snapshots.clear()
        left = list(self.flight) + list(self.inbox) + list(self.outbox)
        if left:
            raise ConfigError(f"[rank {self.rank}] the schedule left work unfinished at the end "
                              f"of trainer step {step_no}: {left[:6]}; every F needs its "
                              "backward and every message its receive on this rank")
        return self.losses

    # -- compute ----------------------------------------------------------------------------
    def _forward(self, a: Action, pc: int) -> None:
        s, i = a.stage, a.microbatch
        st = self.stages[s]
        leaves: list[torch.Tensor | None] = []
        if st.first:
            if self.inputs is None:
                raise ConfigError(f"[rank {self.rank}] runs stage 0 but step() got "
                                  "inputs=None; pass the minibatch's inputs on the ranks of "
                                  "stage 0")
            fed = list(self.inputs[i])
        else:
            fed = []
            for v, spec in zip(self.inbox.pop(("F", s, i)), st.in_specs):
                if spec.differentiable:
                    leaf = v.detach().requires_grad_(True)
                    leaves.append(leaf)
                    fed.append(leaf.clone())  # the stage may write into its input in place
                else:
                    leaves.append(None)
                    fed.append(v)
        want = st.version if a.version is None else self.base[s] + a.version
        if want != st.version:
            weights = st.snapshots.get(want)
            if weights is None:
                raise ConfigError(f"[rank {self.rank}] {a} asks for weight version {want} of "
                                  f"stage {s}, which was not kept (current: {st.version})")
            on_snapshot = True
        elif pc in self.program.copy_at:
            weights = st.snapshots.setdefault(want, st.copy())
            on_snapshot = True
        else:
            weights, on_snapshot = st.live(), False
        record = VersionRecord(self.step_no, s, i, self.rank, want, stashed=on_snapshot)
        if self.check_versions:
            record.forward_fingerprint = fingerprint(weights)
        self.ledger.append(record)
        with microbatch_rng(self.seed, self.step_no, s, i, self.device), torch.enable_grad():
            # the live weights are the module's own: call it directly (functional_call's
            # reparametrization costs ~10% of a small stage's forward)
            out = (functional_call(st.module, weights, tuple(fed)) if on_snapshot
                   else st.module(*fed))
            if st.last:
                target = None if self.targets is None else self.targets[i]
                loss = self.loss_fn(out) if target is None else self.loss_fn(out, target)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    got = (f"a tensor of shape {list(loss.shape)}"
                           if isinstance(loss, torch.Tensor) else type(loss).__name__)
                    raise ConfigError(f"loss_fn returned {got}; it must return a scalar "
                                      "tensor (reduce with .mean() or .sum())")
                self.losses.append(loss.detach())
                heads = [loss / self.loss_div if self.loss_div != 1 else loss]
            else:
                outs = self._check_outputs(st, out)
                heads = [t for t, spec in zip(outs, st.out_specs) if spec.differentiable]
                vals = [t.detach() for t in outs]
                self._deliver(("F", s + 1, i), vals, self.schedule.rank_for(s + 1, i))
        self.flight[(s, i)] = _InFlight(want, weights, on_snapshot, leaves, heads, record)
        self._collect(s, pc)

    def _check_outputs(self, st: StageRuntime, out: Any) -> tuple:
        outs = out if isinstance(out, tuple) else (out,)
        specs = st.out_specs
        if len(outs) != len(specs) or any(
                not isinstance(t, torch.Tensor) or tuple(t.shape) != sp.shape
                or t.dtype != sp.dtype for t, sp in zip(outs, specs)):
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                   for t in outs]
            raise ConfigError(f"stage {st.index} produced {got} but the trainer was built for "
                              f"{[sp.shape for sp in specs]} (from example_inputs); a step's "
                              "inputs must have the shapes of example_inputs")
        return outs

    def _deliver(self, key: tuple[str, int, int], vals: list[torch.Tensor], dst: int) -> None:
        if dst == self.rank:  # a neighbour stage on this rank: the data stays here
            self.inbox[key] = vals
        else:
            self.outbox[key] = [v.contiguous() for v in vals]

    def _backward(self, a: Action, pc: int) -> None:
        s, i = a.stage, a.microbatch
        st = self.stages[s]
        rec = self.flight[(s, i)]
        if a.kind is not K.BACKWARD_WEIGHT:
            used = self.restored.pop((s, i), st.version)
            rec.record.backward_version = used
            if used != rec.version:
                raise ConfigError(f"[rank {self.rank}] {a} would use weight version {used} but "
                                  f"its forward used {rec.version}; the schedule needs "
                                  f"{s}STASH{i} after the F and {s}RESTORE{i} before this")
            if self.check_versions:
                rec.record.backward_fingerprint = fingerprint(rec.weights)
            if st.last:
                rec.grads = [None]
                heads = rec.heads
            else:
                got = self.inbox.pop(("B", s, i))
                pairs = [(h, g) for h, g in zip(rec.heads, got) if h.requires_grad]
                rec.heads, rec.grads = [h for h, _ in pairs], [g for _, g in pairs]
        heads = rec.heads
        inputs = [leaf for leaf in rec.leaves if leaf is not None]
        weights = list(rec.weights.values())
        if a.kind is K.BACKWARD:
            targets = inputs + weights
        elif a.kind is K.BACKWARD_INPUT:
            targets = inputs
        else:
            targets = weights
        # [Note: gradients accumulate in place] backward(inputs=...) adds each weight gradient
        # into .grad where autograd makes it, as loss.backward() does; autograd.grad would
        # return fresh tensors to add afterwards, and allocating a buffer per weight per
        # microbatch made the backward 1.5x slower than plain PyTorch on CPU.
        weight_targets = a.kind is not K.BACKWARD_INPUT
        if weight_targets and rec.on_snapshot:
            for w in weights:
                w.grad = None
        if a.kind is K.BACKWARD_INPUT and heads and inputs and weights and \
                stage_backward_input is not None:
            # [Note: split backward] I keeps the gradients flowing into every op that reads a
            # weight (torch.distributed.pipelining's stage_backward_input), so that W computes
            # only the weight gradients from them (stage_backward_weight) instead of running
            # the whole backward again: I + W then cost one backward, as zero-bubble schedules
            # assume. A stage without input gradients (the first) leaves all of it to W.
            # (clones of the outputs: torch detaches what it is given in place, which breaks
            # an output its own op saved for backward, as tanh and softmax do, and a view)
            _, rec.param_groups = stage_backward_input(
                [h.clone() for h in heads],
                None if all(g is None for g in rec.grads) else rec.grads, inputs,
                iter(weights))
        elif a.kind is K.BACKWARD_WEIGHT and rec.param_groups is not None:
            stage_backward_weight(iter(weights), rec.param_groups)
            rec.param_groups = None
        elif heads and targets:
            # a full backward reaches exactly the targets (the stage's input leaves and the
            # weights it ran with), and inputs= costs ~10% on small stages: leave it out there
            torch.autograd.backward(heads, rec.grads,
                                    inputs=None if a.kind is K.BACKWARD else targets,
                                    retain_graph=a.kind is K.BACKWARD_INPUT)
        if a.kind is not K.BACKWARD_WEIGHT and not st.first:
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                     for leaf in inputs]
            for leaf in inputs:
                leaf.grad = None
            self._deliver(("B", s - 1, i), grads, self.schedule.rank_for(s - 1, i))
        if weight_targets:
            if rec.on_snapshot:       # the gradient was taken at a stashed version: move it
                for (_, p), w in zip(st.params, weights):
                    if w.grad is None:
                        continue
                    if p.grad is None:
                        p.grad = w.grad
                    else:
                        p.grad.add_(w.grad)
                    w.grad = None
            del self.flight[(s, i)]
            self._collect(s, pc)

    # -- communication ----------------------------------------------------------------------
    def _send(self, a: Action, pc: int) -> None:
        forward = a.kind is K.SEND_F
        key = ("F", a.stage + 1, a.microbatch) if forward else ("B", a.stage - 1, a.microbatch)
        vals = self.outbox.pop(key)
        for j, t in enumerate(vals):
            tag = self.tag(0 if forward else 1, key[1], a.microbatch, j)
            try:
                work = dist.isend(t, dst=a.peer, group=self.p2p, tag=tag)
            except Exception as err:
                raise self._comm_error(a, pc, "send", err) from err
            self.sends.append((work, t, a, pc))

    def _recv(self, a: Action, pc: int) -> None:
        s, i = a.stage, a.microbatch
        if a.kind is K.RECV_F:
            direction, specs = 0, self.boundaries[s - 1]
        else:
            direction, specs = 1, tuple(sp for sp in self.boundaries[s] if sp.differentiable)
        bufs = [torch.empty(sp.shape, dtype=sp.dtype, device=self.device) for sp in specs]
        try:
            works = [dist.irecv(b, src=a.peer, group=self.p2p,
                                tag=self.tag(direction, s, i, j)) for j, b in enumerate(bufs)]
        except Exception as err:
            raise self._comm_error(a, pc, "receive", err) from err
        for w in works:
            self._wait(w, a, pc, "receive")
        self.inbox[("F" if direction == 0 else "B", s, i)] = bufs

    def _allreduce(self, a: Action, pc: int) -> None:
        st = self.stages[a.stage]
        if st.group is None or not st.reduced:
            return
        reduce_grads(st.reduced, st.group, divide=st.replicas if self.average else 1,
                     on_error=lambda what, err: self._comm_error(a, pc, what, err))

    def _sum_ties(self, a: Action, pc: int) -> None:
        """[Note: tied weights] in pipeline.py: once per step, at this rank's first STEP (after
        all of its forwards and backwards), every tie group this rank is in, in one order on
        every rank."""
        for tie in self.ties:
            def failed(what: str, err: Exception, tie: TieGroup = tie) -> Exception:
                return PipelineCommError(
                    f"[rank {self.rank}] summing the gradients of the tied parameters "
                    f"{list(tie.names)} over ranks {list(tie.ranks)} (before {a}, trainer step "
                    f"{self.step_no}) failed: {first_line(err)}; one of those ranks may have "
                    f"died (see its log) or be more than timeout_s={self.timeout_s:g} s behind")
            reduce_grads(tie.params, tie.group, on_error=failed)

    def _wait(self, work: Any, a: Action, pc: int, what: str) -> None:
        try:
            work.wait()
        except Exception as err:
            raise self._comm_error(a, pc, what, err) from err

    def _comm_error(self, a: Action, pc: int, what: str, err: Exception) -> PipelineCommError:
        peer = (f"rank {a.peer}" if a.peer is not None else
                f"a replica of stage {a.stage} ({self.schedule.stage_ranks[a.stage]})")
        return PipelineCommError(
            f"[rank {self.rank}] {what} of {a} (action {pc} of trainer step {self.step_no}) "
            f"failed: {first_line(err)}; {peer} may have died (see its log) or be more than "
            f"timeout_s={self.timeout_s:g} s behind")

    # -- weights ----------------------------------------------------------------------------
    def _step(self, a: Action, pc: int) -> None:
        st = self.stages[a.stage]
        if self.ties and not self.ties_summed:
            self._sum_ties(a, pc)
            self.ties_summed = True
        if st.version in self.program.needed_later(a.stage, pc, self.base[a.stage]):
            st.snapshots.setdefault(st.version, st.copy())
        if st.optimizer is not None:
            st.optimizer.step()
            st.optimizer.zero_grad(set_to_none=True)
        for p in st.owned:
            p.grad = None
        st.version += 1
        self._collect(a.stage, pc)

    def _stash(self, a: Action, pc: int) -> None:
        self.stashed[(a.stage, a.microbatch)] = self.flight[(a.stage, a.microbatch)].version

    def _restore(self, a: Action, pc: int) -> None:
        self.restored[(a.stage, a.microbatch)] = self.stashed.pop((a.stage, a.microbatch))

    def _collect(self, stage: int, pc: int) -> None:
        """Drop the copies of versions that nothing in flight uses and no later F asks for."""
        st = self.stages[stage]
        if not st.snapshots:
            return
        keep = {r.version for (s, _), r in self.flight.items() if s == stage and r.on_snapshot}
        keep |= self.program.needed_later(stage, pc, self.base[stage])
        for v in [v for v in st.snapshots if v not in keep]:
            del st.snapshots[v]


def fifo_mismatch(schedule: Schedule) -> str | None:
    """For backends that match messages in issue order (NCCL): the first rank pair whose
    sends and receives come in different orders, described; None when all agree."""
    sent: dict[tuple[int, int], list[tuple]] = {}
    received: dict[tuple[int, int], list[tuple]] = {}
    for rank, acts in schedule.actions.items():
        for a in acts:
            if a.kind is K.SEND_F:
                sent.setdefault((rank, a.peer), []).append(("F", a.stage + 1, a.microbatch))
            elif a.kind is K.SEND_B:
                sent.setdefault((rank, a.peer), []).append(("B", a.stage - 1, a.microbatch))
            elif a.kind.is_recv:
                key = ("F" if a.kind is K.RECV_F else "B", a.stage, a.microbatch)
                received.setdefault((a.peer, rank), []).append(key)
    for pair, order in sent.items():
        if received.get(pair) != order:
            return (f"rank {pair[0]} sends to rank {pair[1]} in the order {order[:6]} but "
                    f"rank {pair[1]} receives in the order {received.get(pair, [])[:6]}")
    return None
