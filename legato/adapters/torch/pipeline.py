"""PipelineTrainer: pipeline-parallel training of an unchanged PyTorch model on
torch.distributed, by a legato plan and schedule (PipeDream, SOSP'19; GPipe; 1F1B).

Every rank runs the same script (as under torchrun) after `dist.init_process_group`:

    trainer = PipelineTrainer(model, [["0", "1"], ["2", "3"]], example_inputs=x,
                              loss_fn=nn.functional.cross_entropy, schedule="1f1b",
                              microbatches=4, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    for x, y in loader:
        loss = trainer.step(x, y)          # a tensor on the last stage's ranks, else None

[Note: what one step() runs]
`step(inputs, targets)` cuts the minibatch into `trainer.num_microbatches` equal parts along
dim 0 and runs the schedule's action list once:
- gpipe, 1f1b, interleaved-1f1b: one synchronous update. The m microbatch losses are each divided
  by m and their gradients summed (over replicas too), so the update is that of the minibatch's
  mean loss, as in single-process gradient accumulation.
- pipedream (1f1b-rr): each microbatch is a PipeDream minibatch with its own update (m updates
  per step; replicas average their gradients); the pipeline fills at the start of step() and
  drains at its end, with weight stashing in between (and vertical sync if asked).
- 2bw: `num_steps` updates (schedule_options, default 3) over m * num_steps microbatches, each
  update the mean over m microbatches, computed on the weights one update behind.
The returned loss is the mean of the unscaled microbatch losses this rank computed (only ranks
of the last stage compute losses; a replica of it averages its own share); other ranks get None.

[Note: tied weights]
A trainable parameter used by several stages (a tied token embedding and output head, a
module called twice) is kept by every rank hosting one of them, as Megatron-LM keeps its word
embeddings on the first and last stage. At construction the copies are made equal (a broadcast
from the lowest of those ranks); in every step, once each rank has run all of its forwards and
backwards (at its first STEP), the copies' gradients are summed over every rank holding one
(replicas included, so a tied parameter is not in its stage's replica all-reduce), and each
rank's optimizer steps its copy with the same sum: the copies stay equal without sending
weights. On one rank, two stages sharing a parameter share the object itself; the first of
them steps it. This needs a schedule whose updates come after every forward and backward of
the step (gpipe, 1f1b, interleaved-1f1b, zb-h1); PipeDream's asynchronous schedule and 2BW
update stages at different points (different weight versions per stage), and are refused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from legato.adapters.torch._pipeline_exec import (
    Interpreter,
    PipelineCommError,
    StageRuntime,
    VersionRecord,
    equalize_ties,
    fifo_mismatch,
    make_tie_groups,
    microbatch_rng,
    microbatch_seed,
)
from legato.adapters.torch._pipeline_split import (
    ModelSplit,
    Tie,
    as_args,
    chunk,
    layer_ids,
    map_tensors,
    split_model,
    tensors_of,
)
from legato.core._files import atomic_json, atomic_write
from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.pipeline import ActionKind, Schedule, Span, VerifyReport, get_schedule, verify

__all__ = ["PipelineCommError", "PipelineTrainer", "VersionRecord", "layer_ids",
           "microbatch_rng", "microbatch_seed", "share_plan", "split_model"]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "legato.pipeline.checkpoint"


class PipelineTrainer:
    """Train `model` as a pipeline: this rank keeps and runs only its stages.

    Args:
        model: an `nn.Sequential` or an FX-traceable module, identical on every rank. It is
            consumed: parameters and buffers of stages this rank does not host are released
            (their storage replaced by empty tensors) unless `release_others=False`.
        plan: a `legato.core.pipeline.Plan` (stages' `nodes`, `replicas`, `ranks`), or per
            stage a list of layer ids (child names of an nn.Sequential, else the node ids of
            `profile_pipeline`), or per stage a layer count.
        example_inputs: one minibatch as `step` receives it (tensor or tuple of positional
            arguments; values unused, e.g. zeros), on every rank. Cut into microbatches and run
            once through the whole model without gradients (buffers and random state restored)
            to find the shape and dtype of every tensor crossing a cut; every step's inputs must
            have these shapes.
        loss_fn: `loss_fn(output, targets) -> scalar` for one microbatch (`loss_fn(output)` when
            step gets targets=None).
        optimizer: `optimizer(params) -> torch.optim.Optimizer`, called once per hosted stage
            with its trainable parameters.
        schedule: a name for `get_schedule` ("gpipe", "1f1b", "interleaved-1f1b", "pipedream",
            "2bw") or a ready `Schedule` over the plan's stages and ranks.
        microbatches: microbatches per step (the generators' num_microbatches).
        replicas: replicas per stage for the list forms of `plan` (a `Plan` carries its own).
        schedule_options: extra keyword arguments of the generator (split_backward,
            vertical_sync, num_steps, virtual_stages).
        seed: dropout seed: stage s's forward of microbatch i in step n runs with torch's
            generator seeded by `microbatch_seed(seed, n, s, i)`.
        timeout_s: timeout of every process group the trainer makes: a receive or all-reduce
            waiting on a dead or stalled peer fails with `PipelineCommError` after it.
        check_versions: also fingerprint the weights each forward and backward used (ledger).
        release_others: free the parameters of stages hosted elsewhere.
        capture: how a module other than an nn.Sequential is captured: "auto" (torch.fx, else
            torch.export), "fx" or "export"; the same as the profile the plan came from (its
            `meta["capture"]`), so that the layer ids agree.
    Raises:
        ConfigError: an invalid argument, plan, schedule or split (before any communication
            other than the group set-up), naming the value and the fix.
    """

    def __init__(self, model: nn.Module, plan: Any, *, example_inputs: Any,
                 loss_fn: Callable[..., torch.Tensor],
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 schedule: str | Schedule = "1f1b", microbatches: int = 1,
                 replicas: Sequence[int] | None = None, schedule_options: dict | None = None,
                 seed: int = 0, timeout_s: float = 300.0, check_versions: bool = False,
                 release_others: bool = True, capture: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn={loss_fn!r} is not callable; pass "
                              "loss_fn(output, targets) -> scalar tensor")
        if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError("optimizer must be a factory, optimizer(params) -> "
                              "torch.optim.Optimizer (e.g. lambda ps: torch.optim.SGD(ps, "
                              "lr=0.1)): each rank builds it over its own stages' parameters")
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) \
                or microbatches < 1:
            raise ConfigError(f"microbatches={microbatches!r} is invalid; pass an int >= 1")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s={timeout_s!r} is invalid; pass seconds > 0")
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("torch.distributed is not initialised; call "
                              "dist.init_process_group('gloo') (or 'nccl') on every rank before "
                              "building a PipelineTrainer")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        stages, reps, ranks = _normalize_plan(plan, replicas)
        self.schedule = _build_schedule(schedule, len(stages), reps, ranks, microbatches,
                                        dict(schedule_options or {}))
        self.report: VerifyReport = verify(self.schedule)
        used = sorted(self.schedule.ranks)
        if used != list(range(self.world_size)):
            raise ConfigError(f"the plan and schedule use ranks {used} but the job has "
                              f"world_size={self.world_size}; launch {len(used)} processes, or "
                              "give the plan one rank per process (every rank must host a stage)")
        self.num_microbatches = self.schedule.num_microbatches
        self.split: ModelSplit = split_model(model, stages, example_inputs,
                                             microbatches=self.num_microbatches,
                                             capture=capture)
        self.stage_ids = self.split.nodes
        _check_ties(self.split.ties, self.schedule)
        self.loss_fn, self.seed, self.timeout_s = loss_fn, int(seed), float(timeout_s)
        self.device = _device_of(model)
        self.backend = self._backend()
        timeout = datetime.timedelta(seconds=self.timeout_s)
        # every rank creates every group, in the same order
        self._ctrl = dist.new_group(list(range(self.world_size)), timeout=timeout,
                                    backend="gloo")
        # before any group that depends on the plan: every rank must run the same one
        self.plan_digest = _plan_digest(self.schedule, self.stage_ids)
        _check_same_plan(self.plan_digest, self.rank, self.world_size, self._ctrl,
                         self.stage_ids, self.schedule)
        p2p = (self._ctrl if self.backend == "gloo" else
               dist.new_group(list(range(self.world_size)), timeout=timeout,
                              backend=self.backend))
        groups: dict[int, Any] = {}
        for s, sranks in enumerate(self.schedule.stage_ranks):
            if len(sranks) > 1:
                g = dist.new_group(list(sranks), timeout=timeout, backend=self.backend)
                if self.rank in sranks:
                    groups[s] = g
        self.stages = self.schedule.stages_of(self.rank)
        tie_groups = make_tie_groups(self.split.ties, self.split.modules,
                                     self.schedule.stage_ranks, self.rank, timeout=timeout,
                                     backend=self.backend)
        tied = frozenset(id(p) for t in tie_groups for p in t.params)
        self.modules: dict[int, nn.Module] = {}
        self.optimizers: dict[int, torch.optim.Optimizer | None] = {}
        runtimes: dict[int, StageRuntime] = {}
        last = self.schedule.num_stages - 1
        stepped: set[int] = set()     # a parameter two hosted stages share is stepped once
        for s in self.stages:
            module = self.split.modules[s]
            params = [p for p in module.parameters() if p.requires_grad and id(p) not in stepped]
            stepped.update(id(p) for p in params)
            opt = optimizer(params) if params else None  # a stage without weights: no steps
            if opt is not None and not isinstance(opt, torch.optim.Optimizer):
                raise ConfigError(f"optimizer(params) returned a {type(opt).__name__}, not a "
                                  "torch.optim.Optimizer")
            self.modules[s], self.optimizers[s] = module, opt
            runtimes[s] = StageRuntime(
                s, module, opt, groups.get(s), self.schedule.replicas(s),
                self.schedule.num_stages,
                self.split.boundaries[s - 1] if s > 0 else self.split.inputs,
                self.split.boundaries[s] if s < last else (), owned=params, tied=tied)
        if release_others:
            _release(self.split.modules, self.stages)
        equalize_ties(tie_groups)
        self._interp = Interpreter(schedule=self.schedule, rank=self.rank, stages=runtimes,
                                   boundaries=self.split.boundaries, p2p_group=p2p,
                                   device=self.device, loss_fn=loss_fn, seed=self.seed,
                                   timeout_s=self.timeout_s, check_versions=check_versions,
                                   ties=tie_groups)
        self._runtimes = runtimes
        self.ties: tuple[Tie, ...] = self.split.ties
        self.steps_done = 0
        dist.barrier(group=self._ctrl)
        self._origin = time.perf_counter()
        log.info("[rank %d] pipeline %s: stages %s of %d, %d microbatches per step",
                 self.rank, self.schedule.name, list(self.stages), self.schedule.num_stages,
                 self.num_microbatches)

    # -- properties ---------------------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        """This rank hosts stage 0 (it needs the inputs)."""
        return 0 in self.stages

    @property
    def is_last(self) -> bool:
        """This rank hosts the last stage (it needs the targets and computes the loss)."""
        return self.schedule.num_stages - 1 in self.stages

    def _backend(self) -> str:
        if self.device.type == "cuda":
            if not dist.is_nccl_available():
                raise BackendUnavailable("the model is on CUDA but this torch has no NCCL; "
                                         "move the model to the CPU (gloo) or install a CUDA "
                                         "build of torch")
            problem = fifo_mismatch(self.schedule)
            if problem:
                raise ConfigError(f"NCCL matches messages in issue order, but {problem}; use "
                                  "a schedule whose sends and receives agree in order, or gloo")
            return "nccl"
        if not dist.is_gloo_available():
            raise BackendUnavailable("this torch build has no gloo backend for CPU tensors")
        return "gloo"

    # -- training -----------------------------------------------------------------------------
    def step(self, inputs: Any = None, targets: Any = None) -> torch.Tensor | None:
        """Run one call of the schedule on a minibatch (see [Note: what one step() runs]).

        Args:
            inputs: the minibatch's model inputs (a tensor or a tuple of positional
                arguments), needed on the ranks of stage 0 only (others may pass None).
            targets: what `loss_fn` takes besides the output, needed on the ranks of the last
                stage only; None calls `loss_fn(output)`.
        Returns:
            On the last stage's ranks, the mean of their microbatch losses (a detached scalar
            tensor); None elsewhere.
        Raises:
            ConfigError: inputs missing on stage 0 or of other shapes than example_inputs.
            PipelineCommError: a peer died or stalled past timeout_s.
        """
        m = self.num_microbatches
        in_chunks = tgt_chunks = None
        if self.is_first:
            if inputs is None:
                raise ConfigError(f"[rank {self.rank}] hosts stage 0 but step() got "
                                  "inputs=None; pass the minibatch's inputs on stage 0's ranks")
            args = as_args(inputs)
            shapes = [tuple(t.shape) for t in tensors_of(args)]
            want = [(sp.shape[0] * m, *sp.shape[1:]) for sp in self.split.inputs]
            if shapes != want:
                raise ConfigError(f"step() got inputs of shapes {shapes} but the trainer was "
                                  f"built for {want} (example_inputs); build it with "
                                  "example_inputs of the new shape")
            in_chunks = chunk(map_tensors(args, lambda t: t.to(self.device)), m, "inputs")
        if self.is_last and targets is not None:
            tgt_chunks = chunk(map_tensors(targets, lambda t: t.to(self.device)), m, "targets")
        losses = self._interp.run(self.steps_done, in_chunks, tgt_chunks, self._origin)
        self.steps_done += 1
        if not losses:
            return None
        return torch.stack(losses).mean()

    # -- records ------------------------------------------------------------------------------
    def timeline(self, *, gather: bool = False) -> list[Span]:
        """The spans of the last step: (rank, action, start_s, end_s) for each action run.

        Times are `time.perf_counter` seconds since a barrier at construction (one clock on
        one host). A send's span is its issue (isend), a receive's its wait, an all-reduce's
        the collective. On CUDA, times are host times (kernels may still run).

        Args:
            gather: collect every rank's spans (every rank must call), shifted so the earliest
                start is 0, sorted by rank then start.
        """
        spans = list(self._interp.spans)
        if not gather:
            return spans
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, spans, group=self._ctrl)
        flat = [sp for part in everyone for sp in part]
        t0 = min((sp.start_s for sp in flat), default=0.0)
        return sorted((Span(sp.rank, sp.action, sp.start_s - t0, sp.end_s - t0) for sp in flat),
                      key=lambda sp: (sp.rank, sp.start_s))

    def ledger(self) -> list[VersionRecord]:
        """This rank's weight-version records, one per (step, stage, microbatch) it ran, for
        the last 16 steps."""
        return list(self._interp.ledger)

    def versions(self) -> dict[int, int]:
        """Stage -> its current weight version (optimizer steps taken) on this rank."""
        return {s: rt.version for s, rt in self._runtimes.items()}

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write every stage's state into folder `path` (every rank must call).

        One file per stage (`stage-<s>.pt`: module state, optimizer state, weight version,
        steps), written by the stage's first replica; other replicas write their buffers
        (`stage-<s>.replica-<j>.pt`, BatchNorm statistics differ between replicas); then rank 0
        writes `manifest.json`. Each file is written to a temporary name and renamed.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for s in self.stages:
            j = self.schedule.stage_ranks[s].index(self.rank)
            if j == 0:
                state = {"format": CHECKPOINT_FORMAT, "stage": s, "nodes": list(self.stage_ids[s]),
                         "module": self.modules[s].state_dict(),
                         "optimizer": (self.optimizers[s].state_dict()
                                       if self.optimizers[s] is not None else None),
                         "version": self._runtimes[s].version, "steps_done": self.steps_done}
                _atomic_save(state, folder / f"stage-{s}.pt")
            elif any(True for _ in self.modules[s].buffers()):
                _atomic_save({"buffers": dict(self.modules[s].named_buffers())},
                             folder / f"stage-{s}.replica-{j}.pt")
        dist.barrier(group=self._ctrl)
        if self.rank == 0:
            manifest = {"format": CHECKPOINT_FORMAT, "version": 1,
                        "steps_done": self.steps_done, "seed": self.seed,
                        "schedule": self.schedule.name,
                        "num_microbatches": self.num_microbatches,
                        "stages": [{"nodes": list(n), "ranks": list(r), "file": f"stage-{s}.pt"}
                                   for s, (n, r) in enumerate(zip(self.stage_ids,
                                                                  self.schedule.stage_ranks))]}
            atomic_json(folder / "manifest.json", manifest)
        dist.barrier(group=self._ctrl)
        return folder

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore what `save_checkpoint` wrote (every rank reads its own stages).

        Raises:
            ConfigError: no checkpoint there, or one saved with other stages than this plan.
        """
        folder = Path(path)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"no readable checkpoint manifest in {folder} ({err}); pass a "
                              "folder written by PipelineTrainer.save_checkpoint") from err
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{folder}/manifest.json is not a legato pipeline checkpoint")
        saved = [tuple(st["nodes"]) for st in manifest["stages"]]
        if saved != [tuple(n) for n in self.stage_ids]:
            raise ConfigError(f"the checkpoint in {folder} was saved with stages {saved} but "
                              f"this trainer has {[list(n) for n in self.stage_ids]}; build the "
                              "trainer with the plan the checkpoint was saved with")
        for s in self.stages:
            state = _load_tensors(folder / f"stage-{s}.pt", self.device)
            if state.get("stage") != s or tuple(state.get("nodes", ())) != self.stage_ids[s]:
                raise ConfigError(f"{folder}/stage-{s}.pt holds stage {state.get('stage')} "
                                  f"({state.get('nodes')}), not stage {s}; the folder mixes "
                                  "checkpoints")
            self.modules[s].load_state_dict(state["module"])
            if self.optimizers[s] is not None:
                self.optimizers[s].load_state_dict(state["optimizer"])
            self._runtimes[s].version = int(state["version"])
            j = self.schedule.stage_ranks[s].index(self.rank)
            extra = folder / f"stage-{s}.replica-{j}.pt"
            if j > 0 and extra.exists():
                buffers = _load_tensors(extra, self.device)
                with torch.no_grad():
                    for name, b in self.modules[s].named_buffers():
                        b.copy_(buffers["buffers"][name])
        self.steps_done = int(manifest["steps_done"])


def share_plan(plan: Any = None, *, src: int = 0, group: Any = None) -> Any:
    """Give every rank rank `src`'s plan: plan (profile and `plan(...)`) on one rank, share it.

    Profiling and planning on every rank can give different plans under timing noise; a job
    whose ranks disagree cannot run. Call on every rank after `dist.init_process_group`, with
    the `Plan` on `src` (other ranks pass nothing); returns the same `Plan` everywhere. It
    travels as the plan's JSON, not a pickle.

    Raises:
        ConfigError: torch.distributed is not initialised, or `src` passed no `Plan`.
    """
    from legato.core.pipeline import Plan

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("torch.distributed is not initialised; call dist.init_process_group "
                          "on every rank before share_plan")
    rank = dist.get_rank()
    payload = b""
    if rank == src:
        if not isinstance(plan, Plan):
            payload = b"!" + (f"rank {src} passed a {type(plan).__name__}, not a legato "
                              "Plan").encode()
        else:
            payload = json.dumps(plan.to_json()).encode()
    size = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(size, src=src, group=group)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if rank == src:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=src, group=group)
    data = bytes(buf.tolist())
    if data.startswith(b"!"):
        raise ConfigError(data[1:].decode() + "; pass the plan on rank "
                          f"{src} (plan(profile, ...)) and nothing on the others")
    return Plan.from_json(json.loads(data.decode()), where=f"the plan shared by rank {src}")


def _plan_digest(schedule: Schedule, stage_ids: Sequence[Sequence[str]]) -> bytes:
    """SHA-256 of what every rank must agree on: the stages' layers, their ranks, and every
    rank's action list (which fixes the schedule, its options and the microbatches)."""
    text = json.dumps({"stages": [list(n) for n in stage_ids],
                       "ranks": [list(r) for r in schedule.stage_ranks],
                       "schedule": schedule.name,
                       "actions": {str(r): [str(a) for a in acts]
                                   for r, acts in sorted(schedule.actions.items())}},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).digest()


def _check_same_plan(digest: bytes, rank: int, world: int, group: Any,
                     stage_ids: Sequence[Sequence[str]], schedule: Schedule) -> None:
    """Refuse, on every rank and before the first step, a job whose ranks hold different plans
    or schedules (they would die inside the transport with mismatched message sizes)."""
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    differ = [r for r in range(world) if not torch.equal(every[r], every[0])]
    if differ:
        shape = "-".join(str(len(r)) for r in schedule.stage_ranks)
        raise ConfigError(
            f"the ranks do not run the same plan: rank(s) {differ} hold another plan or "
            f"schedule than rank 0 (this is rank {rank}: {len(stage_ids)} stages, replicas "
            f"{shape}, schedule {schedule.name!r}, digest {digest.hex()[:12]}); plan on one "
            "rank and give every rank that plan (legato.adapters.torch.share_plan, or one "
            "saved plan file loaded everywhere), with the same schedule and microbatches")


# -- helpers --------------------------------------------------------------------------------------
def _load_tensors(path: Path, device) -> dict:
    """Read a checkpoint file holding tensors and plain values only (`weights_only=True`): an
    unpickled file could run any code, so one holding other objects is refused, not loaded."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as err:
        raise ConfigError(f"{path} is missing from the checkpoint; pass a folder written by "
                          "PipelineTrainer.save_checkpoint, with every stage's file") from err
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path} holds objects other than tensors and plain values "
                          f"({first}); legato loads checkpoints with weights_only=True so that "
                          "loading one cannot run code. Save the module's and optimizer's "
                          "state_dict only (PipelineTrainer.save_checkpoint does)") from err
    except (RuntimeError, OSError, EOFError) as err:
        raise ConfigError(f"{path} is not a readable torch checkpoint ({err}); it may be "
                          "truncated: save the checkpoint again") from err
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a checkpoint dict; pass "
                          "a folder written by PipelineTrainer.save_checkpoint")
    return state


def _normalize_plan(plan: Any, replicas: Sequence[int] | None
                    ) -> tuple[list, list[int], list[tuple[int, ...]] | None]:
    """(per stage: layer ids or a count, replicas per stage, ranks per stage or None)."""
    if hasattr(plan, "stages") and not isinstance(plan, (list, tuple)):
        stages = [list(st.nodes) for st in plan.stages]
        reps = [int(st.replicas) for st in plan.stages]
        ranks = [tuple(st.ranks) for st in plan.stages]
        if replicas is not None and list(replicas) != reps:
            raise ConfigError(f"replicas={list(replicas)} conflicts with the plan's {reps}; "
                              "leave replicas out when passing a Plan")
        for s, (r, rk) in enumerate(zip(reps, ranks)):
            if len(rk) != r:
                raise ConfigError(f"plan stage {s} has replicas={r} but ranks {list(rk)}; "
                                  "give one rank per replica")
        return stages, reps, ranks
    if not isinstance(plan, (list, tuple)) or not plan:
        raise ConfigError(f"plan={plan!r} is not a plan; pass a legato Plan, a list of layer-id "
                          "lists (one per stage) or a list of layer counts")
    reps = [1] * len(plan) if replicas is None else list(replicas)
    if len(reps) != len(plan) or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                     for r in reps):
        raise ConfigError(f"replicas={replicas!r} is invalid for {len(plan)} stages; pass one "
                          "int >= 1 per stage")
    return list(plan), reps, None


def _build_schedule(schedule: str | Schedule, num_stages: int, reps: list[int],
                    ranks: list[tuple[int, ...]] | None, microbatches: int,
                    options: dict) -> Schedule:
    if isinstance(schedule, Schedule):
        sched = schedule
        if sched.num_stages != num_stages:
            raise ConfigError(f"the schedule has {sched.num_stages} stages but the plan "
                              f"{num_stages}; build the schedule for the plan")
        if [len(r) for r in sched.stage_ranks] != reps:
            raise ConfigError(f"the schedule's replicas {[len(r) for r in sched.stage_ranks]} "
                              f"differ from the plan's {reps}")
    else:
        gen = get_schedule(schedule)
        try:
            if schedule == "interleaved-1f1b":
                v = options.pop("virtual_stages", 2)
                if num_stages % v or any(r != 1 for r in reps):
                    raise ConfigError(f"interleaved-1f1b with virtual_stages={v} needs a plan "
                                      f"of ranks x {v} unreplicated stages (got {num_stages} "
                                      f"stages, replicas {reps}); rank r hosts stages r, r + p..")
                sched = gen(num_stages // v, microbatches, virtual_stages=v, **options)
            else:
                sched = gen(num_stages, microbatches, replicas=reps, **options)
        except TypeError as err:
            raise ConfigError(f"schedule {schedule!r} does not take schedule_options "
                              f"{sorted(options)} ({err})") from err
    if ranks is not None and [tuple(r) for r in sched.stage_ranks] != ranks:
        mapping: dict[int, int] = {}
        for old, new in zip(sched.stage_ranks, ranks):
            for a, b in zip(old, new):
                if mapping.setdefault(a, b) != b:
                    raise ConfigError(f"the plan's ranks {ranks} do not fit the schedule's "
                                      f"layout {sched.stage_ranks}: rank {a} would be both "
                                      f"{mapping[a]} and {b}")
        sched = sched.relabel(mapping)
    return sched


def _check_ties(ties: Sequence[Tie], schedule: Schedule) -> None:
    """Tied parameters need every update after every forward and backward of the step."""
    if not ties:
        return
    compute = (ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT,
               ActionKind.BACKWARD_WEIGHT)
    for rank, acts in sorted(schedule.actions.items()):
        first = next((q for q, a in enumerate(acts) if a.kind is ActionKind.STEP), None)
        later = next((a for a in acts[first:] if a.kind in compute), None) \
            if first is not None else None
        if later is not None:
            t = ties[0]
            more = f" (and {len(ties) - 1} more)" if len(ties) > 1 else ""
            raise ConfigError(
                f"parameter {t.name!r}{more} is used by stages {list(t.stages)} (tied weights), "
                f"whose copies' gradients are summed once per step before the update; schedule "
                f"{schedule.name!r} updates on rank {rank} ({acts[first]}) before {later}, so "
                "the stages would train different versions of it. Use a schedule that updates "
                "after the whole step (gpipe, 1f1b, interleaved-1f1b, zb-h1), or a plan that "
                "keeps every user of the parameter in one stage")


def _device_of(model: nn.Module) -> torch.device:
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise ConfigError(f"the model's tensors are on several devices {sorted(map(str, devices))}"
                          "; move it to one device (this rank's) first")
    return devices.pop() if devices else torch.device("cpu")


def _release(modules: list[nn.Module], keep: Sequence[int]) -> None:
    """Replace the storage of other stages' parameters and buffers by empty tensors."""
    kept = {id(t) for s in keep for t in list(modules[s].parameters())
            + list(modules[s].buffers())}
    with torch.no_grad():
        for s, m in enumerate(modules):
            if s in keep:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) not in kept:
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def _atomic_save(obj: Any, target: Path) -> None:
    atomic_write(target, lambda f: torch.save(obj, f), binary=True)
