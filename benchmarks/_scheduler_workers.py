"""Ranks of benchmarks/scheduler_step_time.py: models, methods, and the timed loop.

Each rank prints one line `RESULT {json}` with, per method, the step times it measured, plus
the compute-only forward/backward times (F, B) and the time of one plain all-reduce of all
gradients (C), measured in the same job.
"""

from __future__ import annotations

import json
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


def example(name: str, rank: int):
    g = torch.Generator().manual_seed(rank)
    if name == "transformer":
        tokens = torch.randint(0, 2000, (8, 32), generator=g)
        return tokens, torch.randint(0, 2000, (8 * 32,), generator=g)
    x = torch.randn(32, 3, 32, 32, generator=g)
    return x, torch.randint(0, 10, (32,), generator=g)


def loss_of(name: str, out, y):
    if name == "transformer":
        out = out.reshape(-1, out.shape[-1])
    return nn.functional.cross_entropy(out, y)


# -- measurements ------------------------------------------------------------------------------
def compute_times(name: str, model: nn.Module, x, y, steps: int) -> tuple[float, float]:
    """Median forward and backward time without any communication."""
    fwd, bwd = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loss_of(name, model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


def allreduce_time(model: nn.Module, steps: int) -> float:
    """Median time of one all-reduce of a buffer as large as all gradients (DDP-style)."""
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_method(method: str, model: nn.Module, settings: dict):
    """Returns (module to call, step function, close function)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

        def step():
            ddp_opt.step()
            ddp_opt.zero_grad(set_to_none=True)
        return ddp, step, lambda: None
    if method == "allreduce":
        world = dist.get_world_size()

        def step():
            works = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
            for w in works:
                w.wait()
            for p in model.parameters():
                p.grad.div_(world)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, step, lambda: None
    from legato.adapters.torch import ScheduledOptimizer

    sopt = ScheduledOptimizer(opt, model, policy=method, timeout_s=600, **settings)

    def close():
        sopt.close()
    return model, sopt.step, close


def run(model_name: str, methods: list[str], steps: int, warmup: int, rounds: int,
        settings: dict) -> None:
    """torch.distributed ranks: every method in turn, `rounds` times, same job."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, y = example(model_name, rank)
    torch.manual_seed(0)
    base = MODELS[model_name]()
    f, b = compute_times(model_name, base, x, y, steps)
    c = allreduce_time(base, max(3, steps // 2))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method in methods:
            torch.manual_seed(0)
            model = MODELS[model_name]()
            module, step, close = make_method(method, model, settings.get(method, {}))
            for i in range(warmup + steps):
                dist.barrier()
                t0 = time.perf_counter()
                loss_of(model_name, module(x), y).backward()
                step()
                if i >= warmup:
                    times[method].append(time.perf_counter() - t0)
            close()
            dist.barrier()
    nbytes = sum(p.numel() * p.element_size() for p in base.parameters())
    print("RESULT " + json.dumps({"rank": rank, "model": model_name, "F": f, "B": b, "C": c,
                                  "grad_bytes": nbytes, "times": times}), flush=True)
    dist.destroy_process_group()


def run_horovod(model_name: str, steps: int, warmup: int, rounds: int) -> None:
    """horovodrun ranks: hvd.DistributedOptimizer."""
    import horovod.torch as hvd

    hvd.init()
    x, y = example(model_name, hvd.rank())
    times = []
    for _ in range(rounds):
        torch.manual_seed(0)
        model = MODELS[model_name]()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01,
                                                       momentum=0.9),
                                       named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        for i in range(warmup + steps):
            hvd.allreduce(torch.zeros(1), name="barrier")
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_of(model_name, model(x), y).backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"rank": hvd.rank(), "model": model_name,
                                  "times": {"horovod": times}}), flush=True)
    hvd.shutdown()
