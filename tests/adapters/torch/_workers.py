"""Ranks of the ScheduledOptimizer tests (run by legato.launch; no pytest here)."""

from __future__ import annotations

import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from legato.adapters.torch import ScheduledOptimizer
from legato.core.errors import ConfigError, LegatoError


class Net(nn.Module):
    """Conv layers then a wide MLP: tensors from 40 B to 800 KiB, 12 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 200)
        self.fc2 = nn.Linear(200, 64)
        self.fc3 = nn.Linear(64, 10)
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(torch.relu(self.fc3(x)))


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    raise ValueError(name)


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def compare_with_ddp(opt_name: str, policy: str, settings: dict, steps: int, exact: bool) -> None:
    """Train a legato model and a DDP model side by side; their parameters must agree."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ours = Net()
    ref = Net()
    ref.load_state_dict(ours.state_dict())
    initial = [p.detach().clone() for p in ours.parameters()]
    ddp = nn.parallel.DistributedDataParallel(ref)
    ref_opt = make_optimizer(opt_name, ddp.parameters())
    inner = make_optimizer(opt_name, ours.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    opt = ScheduledOptimizer(inner, ours, policy=policy, timeout_s=60, **settings)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        x, y = batch(rank, step)
        loss_fn(ddp(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
        loss_fn(ours(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    opt.synchronize()
    worst = 0.0
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        diff = (p - q).abs().max().item()
        worst = max(worst, diff / max(q.abs().max().item(), 1e-12))
        if exact:
            assert torch.equal(p, q), f"rank {rank}: {name} differs from DDP by {diff}"
        else:
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), f"{name}: max diff {diff}"
    moved = sum(not torch.equal(p, q) for p, q in zip(ours.parameters(), initial))
    assert moved == len(initial), f"only {moved} of {len(initial)} parameters were trained"
    assert inner.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    state = opt.state_dict()  # synchronizes; state is the wrapped optimizer's
    assert len(state["state"]) == len(list(ours.parameters()))
    stats = opt.stats
    opt.close()
    if stats["tuner"] is not None:
        import json

        print("TUNER " + json.dumps(stats["tuner"]), flush=True)
    if opt.startup is not None:
        import json

        print("STARTUP " + json.dumps({**opt.startup, "now": opt.config.describe()}),
              flush=True)
    print(f"rank {rank}: {opt_name}/{policy} matches DDP after {steps} steps "
          f"({'bit-exact' if exact else f'max relative diff {worst:.2e}'}); "
          f"{len(opt.plan.chunks)} messages per step")
    dist.destroy_process_group()


def gpu_matches_ddp(opt_name: str, steps: int) -> None:
    """One rank on CUDA over NCCL: ScheduledOptimizer (bytescheduler, partitions and merges)
    against DDP on the same GPU. With LEGATO_NATIVE_NCCL=1 the gradients go through legato's
    own NCCL communicator; one rank's average is the identity, so the parameters must be
    bit-identical to DDP's either way. Deterministic kernels: without them cuDNN's convolution
    backward differed between the two models by 1.5e-8 on an H100, communication aside."""
    native = os.environ.get("LEGATO_NATIVE_NCCL", "0") == "1"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    torch.manual_seed(0)
    ours, ref = Net().cuda(), Net().cuda()
    ref.load_state_dict(ours.state_dict())
    ddp = nn.parallel.DistributedDataParallel(ref, device_ids=[0])
    ref_opt = make_optimizer(opt_name, ddp.parameters())
    inner = make_optimizer(opt_name, ours.parameters())
    opt = ScheduledOptimizer(inner, ours, policy="bytescheduler", timeout_s=60,
                             partition_bytes=64 * 1024, merge_bytes=4096)
    _beside_ddp(ddp, ref_opt, ours, opt, steps, lambda step: batch(0, step), "cuda")
    used = type(opt._transport._nccl).__name__ if opt._transport._nccl else "torch"
    assert used == ("NativeNcclCommBackend" if native else "torch"), used
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"{name} differs from DDP by {(p - q).abs().max().item()}"
    messages = len(opt.plan.chunks)
    opt.close()
    print(f"rank 0: {opt_name} on CUDA through {used} matches DDP after {steps} steps "
          f"(bit-exact); {messages} messages per step", flush=True)
    dist.destroy_process_group()


def _beside_ddp(ddp, ref_opt, ours, opt, steps: int, batch_of, device) -> None:
    """`steps` steps of DDP (`ddp`, `ref_opt`) and of legato (`ours`, `opt`) on the same
    batches (`batch_of(step)`, moved to `device`), then wait for legato's updates."""
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        x, y = (t.to(device) for t in batch_of(step))
        loss_fn(ddp(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        loss_fn(ours(x), y).backward()
        opt.step()
        opt.zero_grad()
    opt.synchronize()


def gpu_gloo_matches_ddp(opt_name: str, steps: int) -> None:
    """Two ranks sharing one GPU (cuda:{LOCAL_RANK % GPUs}) over gloo, which moves CUDA tensors
    through host memory: ScheduledOptimizer (bytescheduler, partitions and merges) against DDP,
    bit-identical (two terms, pre-divided, as on CPU). The scheduler benchmark's --device cuda
    runs legato this way."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ours, ref = Net().to(device), Net().to(device)
    ref.load_state_dict(ours.state_dict())
    ddp = nn.parallel.DistributedDataParallel(ref, device_ids=[device.index])
    ref_opt = make_optimizer(opt_name, ddp.parameters())
    inner = make_optimizer(opt_name, ours.parameters())
    opt = ScheduledOptimizer(inner, ours, policy="bytescheduler", timeout_s=60,
                             partition_bytes=32 * 1024, credit_bytes=96 * 1024, merge_bytes=2048)
    _beside_ddp(ddp, ref_opt, ours, opt, steps, lambda step: batch(rank, step), device)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.is_cuda and torch.equal(p, q), \
            f"rank {rank}: {name} differs from DDP by {(p - q).abs().max().item()}"
    messages = len(opt.plan.chunks)
    opt.close()
    print(f"rank {rank}: {opt_name} on {device} over gloo matches DDP after {steps} steps "
          f"(bit-exact); {messages} messages per step", flush=True)
    dist.destroy_process_group()


def same_order_stress(runs: int, steps_per_run: int) -> None:
    """Random per-layer delays in backward; every run must end with identical parameters."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net()
    opt = ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model,
                             policy="bytescheduler", partition_bytes=64 * 1024,
                             credit_bytes=128 * 1024, merge_bytes=4096, timeout_s=60)
    rng = random.Random(rank)
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_full_backward_hook(
                lambda m, gi, go: time.sleep(rng.uniform(0, 0.003)))
    loss_fn = nn.CrossEntropyLoss()
    for run in range(runs):
        for step in range(steps_per_run):
            x, y = batch(rank, run * steps_per_run + step)
            loss_fn(model(x), y).backward()
            opt.step()
        opt.synchronize()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        for r, other in enumerate(gathered):
            assert torch.equal(other, flat), f"run {run}: rank {r} differs from rank {rank}"
    opt.close()
    print(f"rank {rank}: {runs} runs with random delays, identical parameters every run")
    dist.destroy_process_group()


def dead_rank(victim: int) -> None:
    """The victim dies after one step; the survivor must fail with a clear error, not hang."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net()
    opt = ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model,
                             policy="priority", timeout_s=15)
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch(rank, 0)
    loss_fn(model(x), y).backward()
    opt.step()
    opt.synchronize()
    if rank == victim:
        os._exit(17)
    start = time.monotonic()
    try:
        for step in range(1, 5):
            x, y = batch(rank, step)
            loss_fn(model(x), y).backward()
            opt.step()
            opt.synchronize()
    except LegatoError as err:
        print(f"rank {rank}: clear error after {time.monotonic() - start:.1f} s: "
              f"{type(err).__name__}: {err}")
        sys.stdout.flush()
        os._exit(0)
    print(f"rank {rank}: no error although rank {victim} died")
    os._exit(1)


def bad_arguments() -> None:
    """Argument errors, in a one-rank job."""
    dist.init_process_group("gloo")
    model = Net()
    checks = [
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    partition_bytes=1 << 20, credit_bytes=1 << 10),
         "credit_bytes=1024 is below partition_bytes=1048576"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.fc1.parameters(), lr=0.1), model),
         "does not hold 10 of the model's trainable parameters (conv1.weight"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), model),
         "does not hold 12 of the model's trainable parameters"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    policy="lifo"),
         "policy='lifo' is unknown"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    backend="mpi"),
         "backend='mpi' is unknown"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    policy="priority", tune=True),
         "use policy='bytescheduler'"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    tune={"steps": 3}),
         "tune={...} has unknown keys ['steps']"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    policy="plain", partition_bytes=1 << 20),
         "policy='plain' sends DDP's buckets"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    timeline="/nonexistent-folder/trace.json"),
         "does not exist or is not writable"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    compression="int8"),
         "compression='int8' is unknown"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    backward_passes_per_step=0),
         "backward_passes_per_step=0 is invalid"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    defaults="simulated", partition_bytes=1 << 20),
         "defaults='simulated' lets the simulator choose bytescheduler's settings at start-up, "
         "but partition_bytes is given"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    defaults="simulated", tune=True),
         "but tune is on"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    defaults="simulated", policy="priority"),
         "but policy is not 'bytescheduler'"),
        (lambda: ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                    defaults="guessed"),
         "defaults='guessed' is unknown"),
    ]
    for make, expected in checks:
        try:
            make()
        except ConfigError as err:
            assert expected in str(err), f"expected {expected!r} in {err}"
        else:
            raise AssertionError(f"no error for {expected!r}")
    # Horovod must be initialized first (when it is installed at all)
    try:
        import horovod.torch  # noqa: F401
        has_horovod = True
    except ImportError:
        has_horovod = False
    from legato.core.errors import BackendUnavailable
    try:
        ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, backend="horovod")
    except BackendUnavailable as err:
        expected = "call hvd.init()" if has_horovod else "backend='horovod' needs horovod.torch"
        assert expected in str(err), err
    else:
        raise AssertionError("backend='horovod' without hvd.init() did not fail")
    # a parameter without a gradient is named at step()
    opt = ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, timeout_s=20)
    model.head(torch.randn(2, 10)).sum().backward()
    try:
        opt.step()
    except LegatoError as err:
        assert "got no gradient in this step (conv1.weight" in str(err), err
    else:
        raise AssertionError("step() without all gradients did not fail")
    print("bad arguments: all rejected with clear errors")


def timeline(path: str) -> None:
    """Two steps with a timeline; rank 0 writes one trace holding both ranks."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net()
    opt = ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model,
                             policy="bytescheduler", partition_bytes=64 * 1024,
                             credit_bytes=128 * 1024, timeline=path, timeout_s=60)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(2):
        x, y = batch(rank, step)
        loss_fn(model(x), y).backward()
        opt.step()
    opt.close()
    print(f"rank {rank}: closed")
    dist.destroy_process_group()


def compare_with_horovod(opt_name: str, steps: int, tune=None,
                         policy: str = "bytescheduler") -> None:
    """ScheduledOptimizer(backend='horovod') against hvd.DistributedOptimizer, in horovodrun.
    policy="default": bytescheduler at its defaults, so the defaults' check (over Horovod:
    the fixed sizes measured against plain) runs and every rank takes its choice."""
    import horovod.torch as hvd

    hvd.init()
    rank = hvd.rank()
    torch.manual_seed(0)
    ours, ref = Net(), Net()
    ref.load_state_dict(ours.state_dict())
    ref_opt = hvd.DistributedOptimizer(make_optimizer(opt_name, ref.parameters()),
                                       named_parameters=ref.named_parameters())
    sizes = ({"partition_bytes": 32 * 1024, "credit_bytes": 96 * 1024}
             if policy == "bytescheduler" else {})
    opt = ScheduledOptimizer(make_optimizer(opt_name, ours.parameters()), ours,
                             backend="horovod", timeout_s=60, tune=tune, **sizes,
                             policy="bytescheduler" if policy == "default" else policy)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        x, y = batch(rank, step)
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        ref_opt.step()
        loss_fn(ours(x), y).backward()
        opt.step()
    opt.synchronize()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"rank {rank}: {name} differs by {(p - q).abs().max()}"
    if tune:
        print(f"rank {rank}: tuned to {opt.config.describe()} ({opt.stats['tuner']})")
    if policy == "default":
        print("STARTUP " + json.dumps({"mode": opt.defaults_mode, "pending":
                                       opt.startup_pending, "now": opt.config.describe(),
                                       "tuning": opt.tuning, "startup": opt.startup,
                                       "tuner": opt.stats["tuner"]}), flush=True)
    opt.close()
    print(f"rank {rank}: horovod {opt_name} matches hvd.DistributedOptimizer after {steps} "
          "steps (bit-exact)")
    hvd.shutdown()


class TinyEncoder(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 50)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def transformer_matches_ddp(steps: int) -> None:
    """Parameters used outside their module's forward are gated too (else: in-place error)."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ours, ref = TinyEncoder(), TinyEncoder()
    ref.load_state_dict(ours.state_dict())
    ddp = nn.parallel.DistributedDataParallel(ref)
    ref_opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    opt = ScheduledOptimizer(torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9), ours,
                             policy="bytescheduler", partition_bytes=4096, credit_bytes=8192,
                             merge_bytes=1024, timeout_s=60)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        tokens = torch.randint(0, 50, (4, 12), generator=g)
        target = torch.randint(0, 50, (48,), generator=g)
        nn.functional.cross_entropy(ddp(tokens).reshape(-1, 50), target).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ours(tokens).reshape(-1, 50), target).backward()
        opt.step()
    opt.synchronize()
    waits = opt._gates.waits()
    assert any(name.endswith("self_attn") for name in waits), waits
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"rank {rank}: {name} differs by {(p - q).abs().max()}"
    with torch.no_grad():  # an eval forward waits for every pending update
        ours.eval()
        ours(torch.randint(0, 50, (2, 12)))
    opt.close()
    print(f"rank {rank}: transformer matches DDP after {steps} steps (bit-exact)")
    dist.destroy_process_group()



def link_fit() -> None:
    """link_samples on a real gloo group, then fit_link."""
    from legato.adapters.torch.profile import link_samples
    from legato.core.scheduler.simulate import fit_link

    dist.init_process_group("gloo")
    # up to 8 MiB, medians of 5: with 4 MiB and 3 repeats, a loaded CI machine once timed 1 MiB
    # slower than 4 MiB and the fit (rightly) refused a link whose time does not grow
    sizes = [1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 23]
    samples = link_samples(sizes=sizes, repeats=5)
    assert [n for n, _ in samples] == sizes
    assert samples[-1][1] > samples[0][1], samples
    fit = fit_link(samples, world=2)
    assert fit.link.bytes_per_s > 0
    if dist.get_rank() == 0:
        print(f"link fit: {fit.describe()}")
    dist.destroy_process_group()
