"""Ranks of benchmarks/pipeline_training.py: models, calibration, and the timed runs.

Each job prints, on rank 0, one line `RESULT {json}`. Every rank uses one thread (the machine
has 2 cores; 2 ranks get one each).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)


# -- models ------------------------------------------------------------------------------------
def vgg_fc() -> nn.Sequential:
    """VGG-style: small convolutions, then large fully connected layers (38 MB of weights)
    with a small activation between them: what a pipeline serves better than data parallelism."""
    layers, c = [], 3
    for out in (32, 64, 128, 128):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    layers += [nn.Flatten(), nn.Linear(128 * 2 * 2, 2048), nn.ReLU(), nn.Linear(2048, 2048),
               nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)]
    return nn.Sequential(*layers)


def mlp(width: int = 1024, depth: int = 8) -> nn.Sequential:
    """A chain of equal Linear+ReLU layers: equal stages for the simulator comparison."""
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


MODELS = {"vgg-fc": (vgg_fc, lambda b: torch.randn(b, 3, 32, 32)),
          "mlp": (mlp, lambda b: torch.randn(b, 1024))}


def _data(model: str, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    make, inputs = MODELS[model]
    return make(), inputs(batch), torch.randint(0, 10, (batch,))


# -- measurement helpers -----------------------------------------------------------------------
class ActivationMeter:
    """Bytes of tensors autograd saves for backward that are not weights, live at once (peak):
    a stage's activation memory, measured with saved_tensors_hooks."""

    class _Held:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}
        self.bytes = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            del self.live[key]

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if base.grad_fn is None and base.requires_grad:    # a weight or a view of one (W.t())
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        held = self._Held(t)
        weakref.finalize(held, self._release, key)
        return held

    @staticmethod
    def unpack(obj):
        return obj.t if isinstance(obj, ActivationMeter._Held) else obj

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _timed(fn, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


CORES = os.cpu_count() or 1


def _profile_under_load(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """As many ranks as there are cores profile the model at once (the others wait), and
    rank 0's profile is shared.

    Busy ranks share the memory bandwidth of this machine, as they will while the pipeline
    runs (a profile taken with the other core idle came out about 1.5x too fast); more ranks
    than cores are left to the simulator's processor sharing (`cores=`)."""
    from legato.adapters.torch import profile_pipeline
    from legato.core.pipeline import LayerProfile

    dist.barrier()
    prof = None
    if dist.get_rank() < CORES:
        prof = profile_pipeline(model, x, loss_fn=lambda out: F.cross_entropy(out, y),
                                optimizer=_sgd(model.parameters()), repeats=7, warmup=3)
    dist.barrier()
    box = [prof.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return LayerProfile.from_json(box[0])


def _p2p_link(sizes=(1 << 10, 1 << 16, 1 << 20, 1 << 22), repeats: int = 7):
    """alpha and bandwidth of one gloo message rank 0 -> 1, from round trips (half each)."""
    from legato.core.pipeline import Link

    samples = []
    for n in sizes:
        buf = torch.zeros(n // 4)
        rtts = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            if dist.get_rank() == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif dist.get_rank() == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            rtts.append(time.perf_counter() - t0)
        samples.append((n, statistics.median(rtts) / 2))
    box = [samples]
    dist.broadcast_object_list(box, src=0)
    # bandwidth: slope over the two largest sizes; alpha: what remains of the smallest
    (n1, t1), (n2, t2) = box[0][-2], box[0][-1]
    bandwidth = (n2 - n1) / max(t2 - t1, 1e-9)
    alpha = max(0.0, box[0][0][1] - box[0][0][0] / bandwidth)
    return Link(alpha, bandwidth)


def _allreduce_s(nbytes: int, repeats: int = 3) -> float:
    buf = torch.zeros(nbytes // 4)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    box = [statistics.median(times[1:])]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _trainer(model, plan, x, y, schedule: str, m: int, meter: ActivationMeter | None = None,
             options: dict | None = None):
    from legato.adapters.torch import PipelineTrainer

    trainer = PipelineTrainer(model, plan, example_inputs=x,
                              loss_fn=F.cross_entropy, optimizer=_sgd, schedule=schedule,
                              microbatches=m, timeout_s=600, schedule_options=options)
    first, last = trainer.is_first, trainer.is_last

    def step():
        if meter is None:
            trainer.step(x if first else None, y if last else None)
        else:
            with meter.hooks():
                trainer.step(x if first else None, y if last else None)
    return trainer, step


def _emit(result: dict) -> None:
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


# -- (b) pipeline against data parallelism on a shaped link ------------------------------------
def vs_dp(model_name: str, batch: int, m: int, steps: int, warmup: int) -> None:
    """Plan with calibrated costs, then measure DDP and the planned pipeline side by side."""
    from legato.core.pipeline import plan as make_plan

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    model, x, y = _data(model_name, batch)
    profile = _profile_under_load(copy.deepcopy(model), x, y)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    ar = _allreduce_s(params)
    # ring all-reduce moves 2(M-1)/M of the bytes per rank: the bandwidth the planner assumes
    bandwidth = 2 * (world - 1) / world * params / ar
    link = _p2p_link()
    result_plan = make_plan(profile, world, bandwidth=bandwidth, mode="paper")

    ddp_model = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    opt = _sgd(ddp_model.parameters())
    share = batch // world
    xs, ys = x[dist.get_rank() * share:(dist.get_rank() + 1) * share], \
        y[dist.get_rank() * share:(dist.get_rank() + 1) * share]

    def ddp_step():
        opt.zero_grad()
        F.cross_entropy(ddp_model(xs), ys).backward()
        opt.step()

    ddp_times = _timed(ddp_step, steps, warmup)

    big_x, big_y = x.repeat(m, *([1] * (x.dim() - 1))), y.repeat(m)   # m PipeDream minibatches
    pipelined = len(result_plan.stages) > 1
    pipe_times = []
    if pipelined:
        trainer, step = _trainer(copy.deepcopy(model), result_plan, big_x, big_y, "pipedream", m)
        pipe_times = [t / m for t in _timed(step, steps, min(warmup, 1))]
    ddp_s = statistics.median(ddp_times)
    pipe_s = statistics.median(pipe_times) if pipe_times else ddp_s
    _emit({"model": model_name, "batch": batch, "workers": world, "minibatches_per_call": m,
           "allreduce_s": ar, "bandwidth_Bps": bandwidth, "link": {"alpha_s": link.alpha_s,
                                                                   "bandwidth_Bps": link.bandwidth_Bps},
           "plan": {"shape": result_plan.shape(), "stages": [list(s.nodes) for s in
                                                             result_plan.stages],
                    "time_per_minibatch_s": result_plan.time_per_minibatch_s,
                    "dp_time_s": result_plan.dp_time_s, "speedup": result_plan.speedup},
           "measured": {"ddp_s": ddp_s, "pipeline_s": pipe_s, "speedup": ddp_s / pipe_s,
                        "ddp_times": ddp_times, "pipeline_times": pipe_times,
                        "pipelined": pipelined},
           "steps": steps})
    dist.destroy_process_group()


# -- (a) simulator against the runtime; (c) 1F1B against GPipe ---------------------------------
def vs_sim(model_name: str, batch: int, m: int, schedules: list[str], steps: int, warmup: int,
           gantt_prefix: str | None) -> None:
    """Straight pipeline over every rank: predicted makespan and peak activation memory against
    the measured step time and the activation bytes autograd really held."""
    from legato.core.pipeline import Link, plan as make_plan, simulate
    from legato.core.pipeline.predict import predict

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    model, x, y = _data(model_name, batch)
    mb = batch // m
    # profiled at the microbatch size: a 1/m share of a full-batch profile underestimates
    # small matrix products
    profile = _profile_under_load(copy.deepcopy(model), x[:mb], y[:mb])
    link = _p2p_link()
    result_plan = make_plan(profile, world, bandwidth=link.bandwidth_Bps, mode="paper",
                            straight=True)
    # interleaved 1F1B: twice the stages, two per rank (rank r hosts stages r and r + ranks)
    plan_v2 = make_plan(profile, 2 * world, bandwidth=link.bandwidth_Bps, mode="paper",
                        straight=True)
    out = {"model": model_name, "batch": batch, "ranks": world, "microbatches": m,
           "link": {"alpha_s": link.alpha_s, "bandwidth_Bps": link.bandwidth_Bps},
           "plan": [list(s.nodes) for s in result_plan.stages], "steps": steps, "runs": {}}
    measured_costs = {}
    for name in schedules:
        inter = name == "interleaved-1f1b"
        this_plan = plan_v2 if inter else result_plan
        options = {"virtual_stages": 2} if inter else {}
        pred = predict(profile, this_plan, name, microbatches=m,
                       link=Link(link.alpha_s, link.bandwidth_Bps), fraction=1.0, cores=CORES,
                       **options)
        meter = ActivationMeter()
        trainer, step = _trainer(copy.deepcopy(model),
                                 [list(st.nodes) for st in this_plan.stages] if inter
                                 else this_plan, x, y, name, m, meter, options)
        # [calibration by a warm-up] the warm-up steps' own timeline gives each stage's action
        # times with everything the running pipeline shares in them; the steps measured after
        # it are then predicted by the simulator from those costs
        _timed(step, max(1, warmup), 0)
        from legato.core.pipeline.predict import (
            costs_from_timeline,
            link_from_timeline,
            schedule_for,
            stage_costs,
        )

        warm_spans = trainer.timeline(gather=True)
        base_costs = stage_costs(profile, this_plan, fraction=1.0)
        # more ranks than cores: the warm-up's spans ran k at a time on CORES processors;
        # turn them into work at full speed and let the simulator share the cores again in
        # the schedule's own pattern (fewer ranks compute in its fill and drain)
        shared = CORES if world > CORES else None
        warm_costs = costs_from_timeline(warm_spans, base_costs, cores=shared)
        warm_link = link_from_timeline(warm_spans, base_costs,
                                       Link(link.alpha_s, link.bandwidth_Bps))
        warm_sim = simulate(schedule_for(this_plan, name, microbatches=m, **options),
                            warm_costs, warm_link, cores=shared)
        times = _timed(step, steps, 0)
        spans = trainer.timeline(gather=True)
        peaks = [None] * world
        dist.all_gather_object(peaks, meter.peak)
        if dist.get_rank() == 0 and gantt_prefix:
            from legato.core.pipeline import SimResult

            measured = SimResult(f"{name} (measured)", max(s.end_s for s in spans), {}, 0.0, {},
                                 tuple(spans), pred.result.report)
            measured.gantt(f"{gantt_prefix}-{name}-measured.png",
                           title=f"{name} on {world} ranks (measured, last step)")
            pred.result.gantt(f"{gantt_prefix}-{name}-simulated.png",
                              title=f"{name} on {world} ranks (simulated from the profile)")
        # the simulator's activation bound: activation bytes x peak microbatches in flight
        from legato.core.pipeline.predict import stage_costs

        costs = stage_costs(profile, this_plan, fraction=1.0)
        act_bound = {r: 0 for r in range(world)}
        for (rank, stage), n in pred.result.report.peak_in_flight.items():
            act_bound[rank] += costs[stage].activation_bytes * n
        if not inter:
            measured_costs[name] = costs_from_timeline(spans, stage_costs(profile, result_plan,
                                                                          fraction=1.0),
                                                       cores=shared)
        gaps: dict[int, float] = {}
        for r in range(world):
            mine = sorted((sp for sp in spans if sp.rank == r), key=lambda sp: sp.start_s)
            gaps[r] = sum(max(0.0, b.start_s - a.end_s) for a, b in zip(mine, mine[1:]))
        out["runs"][name] = {
            "measured_s": statistics.median(times), "times": times,
            "timeline_makespan_s": max(sp.end_s for sp in spans) - min(sp.start_s for sp in spans),
            "gaps_between_actions_s": gaps,
            "simulated_s": pred.result.makespan_s,
            "error": pred.result.makespan_s / statistics.median(times) - 1,
            "warmup_calibrated_s": warm_sim.makespan_s,
            "warmup_link": {"alpha_s": warm_link.alpha_s, "bandwidth_Bps": warm_link.bandwidth_Bps},
            "warmup_error": warm_sim.makespan_s / statistics.median(times) - 1,
            "bubble_simulated": pred.result.bubble_fraction,
            "peak_activation_bytes_measured": peaks,
            "peak_activation_bytes_simulated": [act_bound[r] for r in sorted(act_bound)],
        }
        del trainer
    # calibrated: stage costs read off another schedule's run predict this one
    from legato.core.pipeline import simulate
    from legato.core.pipeline.predict import schedule_for

    for name in measured_costs:
        source = next((o for o in measured_costs if o != name), name)
        sim = simulate(schedule_for(result_plan, name, microbatches=m), measured_costs[source],
                       Link(link.alpha_s, link.bandwidth_Bps),
                       cores=CORES if world > CORES else None)
        run = out["runs"][name]
        run.update(calibrated_from=source, calibrated_s=sim.makespan_s,
                   calibrated_error=sim.makespan_s / run["measured_s"] - 1,
                   action_costs={k: v for k, v in measured_costs[source][0].__dict__.items()})
    _emit(out)
    dist.destroy_process_group()
