"""legato's plans on PyTorch's own pipeline runtime (`torch.distributed.pipelining`), and torch's
schedules in legato's action IR.

    from legato.adapters.torch import torch_pipeline
    pipe = torch_pipeline(model, the_plan, example_inputs=x, microbatches=8,
                          schedule="Interleaved1F1B", loss_fn=F.cross_entropy)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    for x, y in loader:
        loss = pipe.step(x, y)          # the mean microbatch loss on the last stage, else None
        opt.step(); opt.zero_grad()

The plan's stages are cut by the same splitter as `PipelineTrainer` (`split_model`: the same
layer ids, the same checks), each wrapped in a `torch.distributed.pipelining.PipelineStage`, and
run by torch's schedule class of that name (`get_schedule_class`: GPipe, 1F1B, Interleaved1F1B,
LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV). Single-stage schedules take one
stage per rank; the others several, placed as torch places them (looped: stage s on rank
s mod p; V-shaped for ZBVZeroBubble and DualPipeV: p stages down the ranks, then back up).

`read_torch_schedule` reads torch's schedule CSV (`_dump_csv`: one row per rank, actions like
`0F1`, `1I0`, `2W3`, `0SEND_F1`) into a legato `Schedule`, so that `verify` and `simulate` check
and time torch's schedules.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from legato.adapters.torch._pipeline_exec import (
    PipelineCommError,
    TieGroup,
    equalize_ties,
    make_tie_groups,
    reduce_grads,
)
from legato.adapters.torch._pipeline_split import as_args, chunk, preserved, split_model
from legato.core.errors import ConfigError
from legato.core.pipeline.ir import Action, ActionKind, Schedule
from legato.core.pipeline.schedules import add_communication

__all__ = ["TORCH_SCHEDULES", "TorchPipeline", "read_torch_schedule", "torch_pipeline"]

K = ActionKind
# torch's schedule names -> (stages per rank: None for one, else the default), placement style
TORCH_SCHEDULES: dict[str, tuple[int | None, str]] = {
    "GPipe": (None, "loop"), "1F1B": (None, "loop"), "Interleaved1F1B": (2, "loop"),
    "LoopedBFS": (2, "loop"), "InterleavedZeroBubble": (2, "loop"),
    "ZBVZeroBubble": (2, "v"), "DualPipeV": (2, "v"),
}


def stage_rank(stage: int, ranks: int, style: str) -> int:
    """The rank torch places `stage` on: looped (stage mod ranks) or V-shaped (down the ranks,
    then back up)."""
    chunk, j = divmod(stage, ranks)
    return j if style == "loop" or chunk % 2 == 0 else ranks - 1 - j


class TorchPipeline:
    """This rank's `PipelineStage`s and torch's schedule over them (see `torch_pipeline`)."""

    def __init__(self, stages: list, schedule: Any, modules: dict[int, nn.Module],
                 stage_ids: list[tuple[str, ...]], is_first: bool, is_last: bool,
                 ties: Sequence[TieGroup] = (), microbatches: int = 1) -> None:
        self.stages, self.schedule, self.modules = stages, schedule, modules
        self.microbatches = microbatches
        self.stage_ids = stage_ids
        self.is_first, self.is_last = is_first, is_last
        self.ties = [t for t in ties if t.group is not None]

    def parameters(self) -> list[nn.Parameter]:
        """The parameters of this rank's stages, each once (give them to the optimizer)."""
        seen: set[int] = set()
        out = []
        for m in self.modules.values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def step(self, inputs: Any = None, targets: Any = None) -> torch.Tensor | None:
        """One minibatch through torch's schedule: inputs on the first stage's rank, targets on
        the last's (others may pass None). Returns the mean of the microbatch losses on the
        rank of the last stage, else None; gradients are left in `.grad`, divided by
        microbatches as torch's schedules divide them, for the optimizer. The gradients of a parameter several stages
        use (tied weights) are summed between the ranks holding them before this returns."""
        losses: list = []
        args = () if not self.is_first else (inputs if isinstance(inputs, tuple) else (inputs,))
        kwargs: dict = {}
        if self.is_last:
            kwargs = {"target": targets, "losses": losses}
        self.schedule.step(*args, **kwargs)
        # torch divides each stage's gradients by m (scale_grads), which would divide a
        # parameter two stages on this rank share twice: the schedule is built with
        # scale_grads=False and every parameter is divided once here, as torch divides
        for p in self.parameters():
            if p.grad is not None:
                p.grad.div_(self.microbatches)
        for tie in self.ties:       # tied weights: every copy gets the sum of their gradients
            def failed(what: str, err: Exception, tie: TieGroup = tie) -> Exception:
                return PipelineCommError(
                    f"summing the gradients of the tied parameters {list(tie.names)} over "
                    f"ranks {list(tie.ranks)} failed: {err}; one of them may have died")
            reduce_grads(tie.params, tie.group, on_error=failed)
        return torch.stack([x.detach() for x in losses]).mean() if self.is_last else None

    def dump_csv(self, path: str | os.PathLike) -> Path | None:
        """Write torch's schedule as its CSV (every rank's actions, communication included for
        multi-stage schedules; single-stage schedules have no action list: None)."""
        order = getattr(self.schedule, "pipeline_order_with_comms", None) or getattr(
            self.schedule, "pipeline_order", None)
        if not order:
            return None
        p = Path(path)
        with open(p, "w", newline="") as f:
            writer = csv.writer(f)
            for rank in sorted(order):
                writer.writerow(["" if a is None else str(a) for a in order[rank]])
        return p


def torch_pipeline(model: nn.Module, plan: Any, *, example_inputs: Any, microbatches: int,
                   loss_fn: Callable[..., torch.Tensor], schedule: str = "1F1B",
                   group: Any = None, device: torch.device | str | None = None,
                   capture: str = "auto") -> TorchPipeline:
    """Turn a legato plan into `torch.distributed.pipelining` stages and a torch schedule.

    Args:
        model: the model (an `nn.Sequential` or an FX-traceable module), the same on every
            rank; each rank keeps its stages.
        plan: a `Plan` with one replica per stage, or a list of layer-id lists (or layer counts)
            per stage. Single-stage schedules need as many stages as ranks; Interleaved1F1B,
            LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble and DualPipeV a multiple of them.
        example_inputs: one minibatch (the splitter runs it once to check the cuts).
        microbatches: microbatches per step (torch's n_microbatches).
        loss_fn: `loss_fn(output, target) -> scalar`, as torch's schedules call it.
        schedule: torch's schedule name (see `TORCH_SCHEDULES`).
        group: the process group of the pipeline (default: the whole world).
        device: where the stages run (default: the model's device).
        capture: how the model is captured ("auto", "fx", "export"), as for the profile.
    Raises:
        ConfigError: an unknown schedule, replicated stages, a stage count that does not fit
            the ranks, or a cut the splitter refuses.
    """
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    if schedule not in TORCH_SCHEDULES:
        raise ConfigError(f"schedule {schedule!r} is not one of torch's pipeline schedules "
                          f"legato can place; use one of {sorted(TORCH_SCHEDULES)}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("torch.distributed is not initialised; call "
                          "dist.init_process_group on every rank before torch_pipeline")
    if hasattr(plan, "stages") and not isinstance(plan, (list, tuple)):
        if any(s.replicas > 1 for s in plan.stages):
            raise ConfigError(f"the plan replicates stages ({plan.shape()}); torch's pipeline "
                              "schedules run one replica per stage (compose data parallelism "
                              "separately): plan with straight=True (--straight)")
        stages_spec: Sequence = [list(s.nodes) for s in plan.stages]
    else:
        stages_spec = plan
    ranks = dist.get_world_size(group)
    rank = dist.get_rank(group)
    per_rank, style = TORCH_SCHEDULES[schedule]
    n = len(stages_spec)
    if per_rank is None and n != ranks:
        raise ConfigError(f"{schedule} runs one stage per rank, but the plan has {n} stages "
                          f"for {ranks} ranks; plan for {ranks} workers, or use a multi-stage "
                          "schedule (Interleaved1F1B, ZBVZeroBubble, ...)")
    if per_rank is not None and (n % ranks or (style == "v" and n < 2 * ranks)):
        raise ConfigError(f"{schedule} places stages on the ranks in turn and needs a multiple "
                          f"of {ranks} stages{' (at least 2 per rank)' if style == 'v' else ''}; "
                          f"the plan has {n}: plan for {max(2, n // ranks + 1) * ranks} "
                          "workers with straight=True")
    split = split_model(model, stages_spec, example_inputs, microbatches=microbatches,
                        capture=capture)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    mine = [s for s in range(n) if stage_rank(s, ranks, style) == rank]
    # Every stage's input and output for one microbatch, given to torch up front: without them
    # torch infers shapes by running a real forward at the first step, which updates BatchNorm
    # statistics once more than training does (buffers and random state restored here).
    micro = chunk(as_args(example_inputs, "example_inputs"), microbatches, "example_inputs")[0]
    io_args: dict[int, tuple[tuple, tuple]] = {}
    with preserved(model):
        h = tuple(micro)
        for s, module in enumerate(split.modules):
            out = module(*h)
            outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            # a gradient comes back for every floating-point value a stage receives or sends
            io_args[s] = (tuple(_meta(t, s > 0) for t in h), tuple(_meta(t, True) for t in outs))
            h = outs
    stages = [PipelineStage(split.modules[s], s, n, torch.device(device),
                            input_args=io_args[s][0], output_args=io_args[s][1], group=group)
              for s in mine]
    # tied weights (a parameter several stages use): each rank holding one keeps a copy, made
    # equal here; step() sums the copies' gradients (PipelineTrainer's [Note: tied weights])
    world = (dist.get_process_group_ranks(group) if group is not None
             else list(range(dist.get_world_size())))
    ties = make_tie_groups(split.ties, split.modules,
                           [[world[stage_rank(s, ranks, style)]] for s in range(n)],
                           dist.get_rank())
    equalize_ties(ties)
    cls = get_schedule_class(schedule)
    try:
        sched = cls(stages[0] if per_rank is None else stages, n_microbatches=microbatches,
                    loss_fn=loss_fn, scale_grads=False)
    except (ValueError, RuntimeError, AssertionError) as err:
        raise ConfigError(f"torch's {schedule} refused this pipeline ({err}); see the torch."
                          "distributed.pipelining docs for its constraints") from err
    return TorchPipeline(stages, sched, {s: split.modules[s] for s in mine}, split.nodes,
                         0 in mine, n - 1 in mine, ties, microbatches)


def _meta(t: torch.Tensor, grad: bool) -> torch.Tensor:
    """`t` as torch's stage metadata: its shape and dtype, and whether a gradient flows."""
    return t.detach().clone().requires_grad_(grad and (t.is_floating_point() or t.is_complex()))


# -- torch's schedule CSV -> legato's IR ----------------------------------------------------------
_TORCH_ACTION = re.compile(r"(\d+)(F|I|B|W|SEND_F|RECV_F|SEND_B|RECV_B|UNSHARD|RESHARD|"
                           r"REDUCE_GRAD)(\d*)")
_KINDS = {"F": K.FORWARD, "B": K.BACKWARD, "I": K.BACKWARD_INPUT, "W": K.BACKWARD_WEIGHT,
          "SEND_F": K.SEND_F, "RECV_F": K.RECV_F, "SEND_B": K.SEND_B, "RECV_B": K.RECV_B}
_IGNORED = ("UNSHARD", "RESHARD", "REDUCE_GRAD")    # FSDP bookkeeping: no data dependence


def read_torch_schedule(source: str | os.PathLike, *, name: str = "torch") -> Schedule:
    """Read torch's pipeline schedule CSV into a legato `Schedule`.

    Rows are ranks; cells are torch `_Action` strings (`0F1`, `1B0`, `2I3`, `2W3`, and in the
    compute-and-communication form `0SEND_F1`, `1RECV_B0`), empty cells are idle steps, and
    `(a;b)OVERLAP_F_B` cells run a then b. A stage's rank is the row that computes it.
    Compute-only CSVs get legato's sends and receives (`add_communication`); a CSV with torch's
    own communication keeps torch's order, each message's peer being the neighbour stage's
    rank, and each receive waited for where torch waits for it: at the computation that reads
    it (torch posts an `irecv` early). UNSHARD, RESHARD and REDUCE_GRAD (FSDP) are left out.

    Args:
        source: a path to the CSV, or its text.
        name: the schedule's name in reports.
    Raises:
        ConfigError: a cell that is not a torch action, or a stage computed on two ranks.
    """
    text = (Path(source).read_text() if isinstance(source, os.PathLike)
            or (isinstance(source, str) and "\n" not in source and Path(source).is_file())
            else str(source))
    rows = list(csv.reader(io.StringIO(text)))
    parsed: dict[int, list[tuple[int, str, int | None]]] = {}
    for rank, row in enumerate(rows):
        acts = []
        for col, cell in enumerate(row):
            for part in _cells(cell.strip()):
                m = _TORCH_ACTION.fullmatch(part)
                if m is None:
                    raise ConfigError(f"row {rank + 1}, column {col + 1}: {part!r} is not a "
                                      "torch pipeline action ([stage][F|I|B|W|SEND_F|RECV_F|"
                                      "SEND_B|RECV_B][microbatch], e.g. 0F1)")
                stage, kind, mb = m.groups()
                if kind in _IGNORED:
                    continue
                acts.append((int(stage), kind, int(mb) if mb else None))
        parsed[rank] = acts
    owner: dict[int, int] = {}
    for rank, acts in parsed.items():
        for stage, kind, _ in acts:
            if kind in ("F", "B", "I", "W"):
                if owner.setdefault(stage, rank) != rank:
                    raise ConfigError(f"stage {stage} is computed on ranks {owner[stage]} and "
                                      f"{rank}; a torch schedule CSV places each stage on one "
                                      "rank")
    if not owner:
        raise ConfigError("the CSV holds no forward or backward action; pass the CSV torch's "
                          "schedule wrote with _dump_csv")
    num_stages = max(owner) + 1
    missing = [s for s in range(num_stages) if s not in owner]
    if missing:
        raise ConfigError(f"stages {missing} have no actions in the CSV; it does not hold a "
                          "whole pipeline")
    stage_ranks = [(owner[s],) for s in range(num_stages)]
    mbs = [mb for acts in parsed.values() for _, _, mb in acts if mb is not None]
    comms = any(kind in ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
                for acts in parsed.values() for _, kind, _ in acts)
    actions: dict[int, list[Action]] = {}
    for rank, acts in parsed.items():
        out = []
        for stage, kind, mb in acts:
            if mb is None:
                raise ConfigError(f"rank {rank}: {stage}{kind} names no microbatch")
            peer = None
            if kind in ("SEND_F", "RECV_B"):
                peer = owner.get(stage + 1)
            elif kind in ("RECV_F", "SEND_B"):
                peer = owner.get(stage - 1)
            out.append(Action(stage, _KINDS[kind], mb, peer))
        actions[rank] = out
    if not comms:
        actions = add_communication(actions, stage_ranks)
    else:
        actions = {r: _recv_at_use(acts) for r, acts in actions.items()}
    for r in range(len(rows)):
        actions.setdefault(r, [])
    return Schedule(name, actions, stage_ranks, max(mbs) + 1,
                    {"source": "torch.distributed.pipelining CSV",
                     "communication": "torch's" if comms else "legato's"})


def _recv_at_use(acts: list[Action]) -> list[Action]:
    """torch posts a RECV (`irecv`) where the CSV puts it and waits for it at the computation
    that reads it; legato's RECV blocks where it stands. Each RECV moves to just before its
    reader (F for RECV_F, I or B for RECV_B of the same stage and microbatch), so that legato
    runs torch's order with torch's semantics."""
    pending: dict[tuple, Action] = {}
    out: list[Action] = []
    for a in acts:
        if a.kind in (K.RECV_F, K.RECV_B):
            pending[("F" if a.kind is K.RECV_F else "B", a.stage, a.microbatch)] = a
            continue
        if a.kind is K.FORWARD:
            key = ("F", a.stage, a.microbatch)
        elif a.kind in (K.BACKWARD, K.BACKWARD_INPUT):
            key = ("B", a.stage, a.microbatch)
        else:
            key = None
        if key in pending:
            out.append(pending.pop(key))
        out.append(a)
    out.extend(pending.values())        # read by nothing: left at the end for verify to report
    return out


def _cells(cell: str) -> list[str]:
    """A CSV cell's actions: none (idle), one, or the sub-actions of `(a;b)OVERLAP_F_B`."""
    if not cell:
        return []
    if cell.startswith("(") and ")" in cell:
        inner, _, kind = cell[1:].partition(")")
        if kind != "OVERLAP_F_B":
            raise ConfigError(f"{cell!r}: only OVERLAP_F_B groups actions in torch's CSV")
        return [p.strip() for p in inner.split(";") if p.strip()]
    return [cell]
