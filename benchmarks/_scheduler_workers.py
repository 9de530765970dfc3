"""Ranks of benchmarks/scheduler_step_time.py: models, methods, and the timed loop.

Each rank prints one line `RESULT {json}` with, per method, the step times it measured, plus
the compute-only forward/backward times (F, B) and the time of one plain all-reduce of all
gradients (C), measured in the same job.

On `device="cuda"` each rank puts its model, inputs and gradients on
`cuda:{LOCAL_RANK % device_count}` (two ranks share one GPU when there is one) and waits for
the device (`sync`) before every clock reading. Barriers and the small CPU collectives go over
gloo: the default group with `backend="gloo"`, a gloo group of their own with "nccl".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

torch.set_num_threads(1)


# -- models --------------------------------------------------------------------------------------
def vgg() -> nn.Module:
    """VGG-style: small convolutions, then large fully connected layers (communication-heavy)."""
    layers, c = [], 3
    for out in (32, 64, 128, 128):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    layers += [nn.Flatten(), nn.Linear(128 * 2 * 2, 1024), nn.ReLU(), nn.Linear(1024, 1024),
               nn.ReLU(), nn.Linear(1024, 10)]
    return nn.Sequential(*layers)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def resnet() -> nn.Module:
    """ResNet-style: residual 3x3 convolution blocks, few parameters (compute-heavy)."""
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48),
                         nn.ReLU(), *[Block(48) for _ in range(4)], nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(48, 10))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(2000, 256)
        layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(256, 2000)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


MODELS = {"vgg": vgg, "resnet": resnet, "transformer": Encoder}


def example(name: str, rank: int, device: torch.device = torch.device("cpu")):
    g = torch.Generator().manual_seed(rank)
    if name == "transformer":
        tokens = torch.randint(0, 2000, (8, 32), generator=g)
        x, y = tokens, torch.randint(0, 2000, (8 * 32,), generator=g)
    else:
        x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    return x.to(device), y.to(device)


def build(name: str, device: torch.device) -> nn.Module:
    """Model `name` with seed 0's weights, on `device`."""
    torch.manual_seed(0)
    return MODELS[name]().to(device)


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device, so that a clock read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(device: str, backend: str):
    """Join the process group; returns (this rank's device, the gloo group for barriers and
    CPU tensors: None, the default group, unless the backend is NCCL)."""
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))
                           % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if backend == "nccl":
        dist.init_process_group("nccl", device_id=dev)
        return dev, dist.new_group(backend="gloo")
    dist.init_process_group("gloo")
    return dev, None


def loss_of(name: str, out, y):
    if name == "transformer":
        out = out.reshape(-1, out.shape[-1])
    return nn.functional.cross_entropy(out, y)


# -- measurements ------------------------------------------------------------------------------
def compute_times(name: str, model: nn.Module, x, y, steps: int) -> tuple[float, float]:
    """Median forward and backward time without any communication."""
    fwd, bwd = [], []
    for _ in range(steps):
        sync(x.device)
        t0 = time.perf_counter()
        loss = loss_of(name, model(x), y)
        sync(x.device)
        t1 = time.perf_counter()
        loss.backward()
        sync(x.device)
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


def allreduce_time(model: nn.Module, steps: int, ctrl=None) -> float:
    """Median time of one all-reduce of a buffer as large as all gradients (DDP-style), on the
    parameters' device."""
    device = next(model.parameters()).device
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
    times = []
    for _ in range(steps):
        sync(device)
        dist.barrier(group=ctrl)
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(model_name: str, model: nn.Module, x, y, grad_bytes: int, ctrl=None) -> dict:
    """Layer costs (this rank, no communication) and a link model fitted to all-reduce times
    measured on the real group: what the simulator needs."""
    from legato.adapters.torch.profile import announce_s, comm_tasks, layer_costs, link_samples
    from legato.core.scheduler.simulate import fit_link

    device = x.device
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    costs = layer_costs(model, lambda: loss_of(model_name, model(x), y), opt, steps=8)
    # up to 4 MiB whatever the model's size: below that, loopback noise can hide the slope
    # (the ResNet-style CNN's 0.7 MB on an unshaped link gave no fit)
    sizes = [s for s in (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 23)
             if s <= max(2 * grad_bytes, 1 << 22)]
    fit = fit_link(link_samples(sizes=sizes, repeats=5, device=device),
                   world=dist.get_world_size())
    tasks, _ = comm_tasks(model)
    # legato's leader announces each message on a gloo broadcast before starting it: a
    # per-message cost on top of the collective's own alpha.
    calib = {"costs": costs, "fit": fit, "tasks": tasks,
             "announce_s": announce_s(ctrl, repeats=15)}
    # One measured baseline (DDP, the job as it runs today) calibrates how much slower compute
    # is beside communication on these shared cores: the compute scale.
    module, step, close = make_method("ddp", build(model_name, device), {})
    ddp_times = []
    for i in range(10):
        sync(device)
        dist.barrier(group=ctrl)
        t0 = time.perf_counter()
        loss_of(model_name, module(x), y).backward()
        step()
        sync(device)
        if i >= 2:
            ddp_times.append(time.perf_counter() - t0)
    close()
    from legato.core.scheduler.policy import plan_for, resolve_config
    from legato.core.scheduler.simulate import fit_compute_scale, scale_costs

    plain = resolve_config("plain")
    scale = torch.tensor([fit_compute_scale(plan_for(plain, tasks), costs, plain, fit.link,
                                            statistics.median(ddp_times))])
    dist.broadcast(scale, 0, group=ctrl)  # rank 0's calibration, for one prediction
    calib["scale"] = float(scale)
    calib["costs"] = scale_costs(costs, calib["scale"])
    return calib


def predict(calib: dict, method: str, config=None) -> float | None:
    """The simulator's step time for `method` (None: a method it does not model)."""
    from legato.core.scheduler.policy import plan_for, resolve_config
    from legato.core.scheduler.simulate import simulate

    if method in ("ddp", "horovod"):
        config = resolve_config("plain")  # DDP's buckets, arrival order, one optimizer step
    elif method in ("priority", "fifo", "plain"):
        config = config or resolve_config(method)
    elif method != "bytescheduler" or config is None:
        return None
    plan = plan_for(config, calib["tasks"])
    link = calib["fit"].link
    if method not in ("ddp", "horovod"):
        link = dataclasses.replace(link, alpha_s=link.alpha_s + calib["announce_s"])
    return simulate(plan, calib["costs"], config, link, steps=8,
                    overlap=config.policy != "plain").step_s


def make_method(method: str, model: nn.Module, settings: dict, loop: str = "plain"):
    """Returns (module to call, step function, close function). `loop`: "plain", "amp"
    (bf16 autocast and a GradScaler of the method's own: scaler.step(opt), scaler.update())
    or "accumulate" (two backward passes per step: DDP's no_sync, legato's
    backward_passes_per_step=2, two local passes before the plain all-reduce)."""
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0) if loop == "amp" else None

    def finish(optimizer) -> None:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    if method == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

        def step():
            finish(ddp_opt)
            ddp_opt.zero_grad(set_to_none=True)
        step.scaler = scaler
        return ddp, step, lambda: None
    if method == "ddp-hook":  # legato's DDP communication hook, small buckets
        from legato.adapters.torch import register_scheduled_hook

        settings = {k: v for k, v in settings.items() if k != "tune"}
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, bucket_cap_mb=settings.pop("bucket_cap_mb", 1))
        hook = register_scheduled_hook(ddp, policy="bytescheduler", timeout_s=600, **settings)
        ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

        def step():
            finish(ddp_opt)
            ddp_opt.zero_grad(set_to_none=True)
        step.scaler = scaler
        return ddp, step, hook.close
    if method == "allreduce":
        world = dist.get_world_size()

        def step():
            works = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
            for w in works:
                w.wait()
            for p in model.parameters():
                p.grad.div_(world)
            finish(opt)
            opt.zero_grad(set_to_none=True)
        step.scaler = scaler
        return model, step, lambda: None
    from legato.adapters.torch import ScheduledOptimizer

    if loop == "accumulate":
        settings = dict(settings, backward_passes_per_step=2)
    policy = method
    if method == "bytescheduler" and not settings.get("tune"):  # the fixed sizes, as named
        settings = {"defaults": "fixed", **settings}
    if method == "bytescheduler-sim":  # the defaults chosen by the simulator at start-up
        policy, settings = "bytescheduler", {**settings, "defaults": "simulated"}
    if method == "bytescheduler-or-plain":  # the fixed defaults, or plain, by the simulator
        policy, settings = "bytescheduler", {**settings, "defaults": "fixed-or-plain"}
    sopt = ScheduledOptimizer(opt, model, policy=policy, timeout_s=600, **settings)

    def close():
        sopt.close()
    def step():
        finish(sopt)
    step.optimizer = sopt  # for the caller: tuning state and the settings it ended with
    step.scaler = scaler
    return model, step, close


def train_step(model_name: str, loop: str, module, step, x, y) -> None:
    """One training step of `loop` (see make_method) through `module` and `step`."""
    if loop == "accumulate":
        # DDP (and the DDP hook) has no_sync; legato's module is the plain model
        local = module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()
        with local:  # DDP's no_sync holds the first pass's forward and backward
            loss_of(model_name, module(x), y).backward()
        loss_of(model_name, module(x), y).backward()
    elif loop == "amp":
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = loss_of(model_name, module(x), y)
        step.scaler.scale(loss).backward()
    else:
        loss_of(model_name, module(x), y).backward()
    step()


def tuned_by_simulation(calib: dict, settings: dict):
    """The setting the online tuner would pick, with the simulator as its measure."""
    from legato.core.scheduler.policy import resolve_config
    from legato.core.scheduler.tune import OnlineTuner, TuneSettings

    tune = TuneSettings.from_arg(settings.get("tune", True))
    tuner = OnlineTuner(tune, resolve_config("bytescheduler"),
                        max(t.nbytes for t in calib["tasks"]))
    decision, step = tuner.first, 0
    while decision.phase != "tuned":
        t = predict(calib, "plain" if decision.config.policy == "plain" else "bytescheduler",
                    decision.config)
        n = decision.next_boundary - step
        step = decision.next_boundary
        decision = tuner.boundary(step, [t] * n)
    return decision.config


def run(model_name: str, methods: list[str], steps: int, warmup: int, rounds: int,
        settings: dict, simulate_only: bool = False, loop: str = "plain", device: str = "cpu",
        backend: str = "gloo") -> None:
    """torch.distributed ranks: every method in blocks of `steps` steps, in turn, `rounds`
    times, same job; and the simulator's prediction of each (calibrated in the same job).
    `device`: "cpu" or "cuda" (see the module docstring); `backend`: "gloo" or "nccl"."""
    dev, ctrl = setup(device, backend)
    rank = dist.get_rank()
    x, y = example(model_name, rank, dev)
    base = build(model_name, dev)
    nbytes = sum(p.numel() * p.element_size() for p in base.parameters())
    f, b = compute_times(model_name, base, x, y, steps)
    c = allreduce_time(base, max(3, steps // 2), ctrl)
    calib = calibrate(model_name, base, x, y, nbytes, ctrl)
    bs = settings.get("bytescheduler", {})
    if bs.get("tune"):
        predicted_config = tuned_by_simulation(calib, bs)
    else:
        from legato.core.scheduler.policy import resolve_config

        predicted_config = resolve_config("bytescheduler", **{
            k: v for k, v in bs.items() if k in ("partition_bytes", "credit_bytes")})
    predicted = {m: predict(calib, m, predicted_config if m == "bytescheduler" else None)
                 for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    configs: dict[str, str] = {}
    actual: dict[str, float | None] = {}
    if not simulate_only:
        # Every method is built (and tuned) once, then runs in blocks of `steps` timed steps,
        # taking turns `rounds` times, so that this machine's drift hits all methods alike.
        objs = {}
        for method in methods:
            module, step, close = make_method(method, build(model_name, dev),
                                              settings.get(method, {}), loop)
            sopt = getattr(step, "optimizer", None)
            while sopt is not None and (sopt.tuning or sopt.startup_pending):  # every rank
                train_step(model_name, loop, module, step, x, y)
            for _ in range(warmup):
                train_step(model_name, loop, module, step, x, y)
            if sopt is not None:
                sopt.synchronize()
                configs[method] = sopt.config.describe()
                # the prediction of what is measured: the setting tuning ended with
                actual[method] = predict(calib, "plain" if sopt.config.policy == "plain"
                                         else method, sopt.config)
            objs[method] = (module, step, sopt, close)
            sync(dev)
            dist.barrier(group=ctrl)
        for _ in range(rounds):
            for method in methods:
                module, step, sopt, _ = objs[method]
                for i in range(1 + steps):  # the first step of a block is not timed
                    sync(dev)
                    dist.barrier(group=ctrl)
                    t0 = time.perf_counter()
                    train_step(model_name, loop, module, step, x, y)
                    sync(dev)
                    if i:
                        times[method].append(time.perf_counter() - t0)
                if sopt is not None:
                    sopt.synchronize()
                sync(dev)
                dist.barrier(group=ctrl)
        for method in methods:
            objs[method][3]()
    print("RESULT " + json.dumps({
        "rank": rank, "model": model_name, "loop": loop, "F": f, "B": b, "C": c, "grad_bytes": nbytes,
        "device": str(dev), "backend": backend, "torch": torch.__version__,
        "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "times": times, "predicted": predicted, "configs": configs,
        "predicted_actual": {m: v for m, v in actual.items() if v is not None},
        "predicted_config": predicted_config.describe(),
        "link": f"{calib['fit'].describe()}; compute x{calib['scale']:.2f} (from DDP)",
        "layers": [dataclasses.asdict(lc) for lc in calib["costs"]]}), flush=True)
    dist.destroy_process_group()


def run_horovod(model_name: str, steps: int, warmup: int, rounds: int,
                loop: str = "plain") -> None:
    """horovodrun ranks: hvd.DistributedOptimizer, in `loop` as Horovod documents it:
    "accumulate" with backward_passes_per_step=2; "amp" under bf16 autocast with a
    GradScaler (backward, opt.synchronize(), scaler.step(opt) inside
    opt.skip_synchronize(), scaler.update())."""
    import horovod.torch as hvd

    hvd.init()
    x, y = example(model_name, hvd.rank())
    times = []
    for _ in range(rounds):
        model = build(model_name, torch.device("cpu"))
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01,
                                                       momentum=0.9),
                                       named_parameters=model.named_parameters(),
                                       backward_passes_per_step=2 if loop == "accumulate"
                                       else 1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0) if loop == "amp" else None
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        for i in range(warmup + steps):
            hvd.allreduce(torch.zeros(1), name="barrier")
            t0 = time.perf_counter()
            opt.zero_grad()
            if loop == "amp":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_of(model_name, model(x), y)
                scaler.scale(loss).backward()
                opt.synchronize()
                with opt.skip_synchronize():
                    scaler.step(opt)
                scaler.update()
            else:
                for _ in range(2 if loop == "accumulate" else 1):
                    loss_of(model_name, model(x), y).backward()
                opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"rank": hvd.rank(), "model": model_name,
                                  "times": {"horovod": times}}), flush=True)
    hvd.shutdown()


def run_horovod_pair(model_name: str, steps: int, warmup: int, rounds: int) -> None:
    """horovodrun ranks, side by side in one job: hvd.DistributedOptimizer against legato's
    ScheduledOptimizer(backend="horovod") at its default settings (no tuning), both built once
    from one seed, in alternating blocks of `steps` steps, `rounds` times; a block starts
    after a barrier and ends when its last update is done (legato: synchronize()). The times
    are block means, per method."""
    import horovod.torch as hvd

    from legato.adapters.torch import ScheduledOptimizer

    hvd.init()
    x, y = example(model_name, hvd.rank())
    models, opts = {}, {}
    for method in ("horovod", "legato-horovod"):
        models[method] = build(model_name, torch.device("cpu"))
        inner = torch.optim.SGD(models[method].parameters(), lr=0.01, momentum=0.9)
        if method == "horovod":
            opts[method] = hvd.DistributedOptimizer(
                inner, named_parameters=models[method].named_parameters())
            hvd.broadcast_parameters(models[method].state_dict(), root_rank=0)
        else:
            opts[method] = ScheduledOptimizer(inner, models[method], backend="horovod")

    def block(method: str, n: int) -> float:
        model, opt = models[method], opts[method]
        hvd.allreduce(torch.zeros(1), name="legato.bench.barrier")
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad()
            loss_of(model_name, model(x), y).backward()
            opt.step()
        if method == "legato-horovod":
            opt.synchronize()
        return (time.perf_counter() - t0) / n

    for method in models:
        block(method, warmup)
    # the default's check (every rank; over Horovod it measures the fixed sizes against plain)
    while opts["legato-horovod"].startup_pending or opts["legato-horovod"].tuning:
        block("legato-horovod", 1)
    times: dict[str, list[float]] = {m: [] for m in models}
    for r in range(rounds):  # alternate which goes first, so that drift hits both alike
        for method in (("horovod", "legato-horovod") if r % 2 == 0
                       else ("legato-horovod", "horovod")):
            times[method].append(block(method, steps))
    stats = opts["legato-horovod"].stats
    opts["legato-horovod"].close()
    print("RESULT " + json.dumps({"rank": hvd.rank(), "model": model_name, "times": times,
                                  "legato": stats["config"],
                                  "startup": opts["legato-horovod"].startup and {
                                      k: opts["legato-horovod"].startup[k]
                                      for k in ("chosen", "best_s", "plain_s", "link")},
                                  "check": stats.get("tuner") and {
                                      k: stats["tuner"][k] for k in ("chosen", "confirmation")},
                                  "messages_per_step": stats["messages_per_step"]}), flush=True)
    hvd.shutdown()
