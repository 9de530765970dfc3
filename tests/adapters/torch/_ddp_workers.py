"""Ranks of the DDP comm hook tests (run by legato.launch; no pytest here)."""

from __future__ import annotations

import gc
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from _workers import batch, make_optimizer  # the launcher puts this directory on sys.path
from legato.adapters.torch import register_scheduled_hook
from legato.core.errors import ConfigError, LegatoError

DDP = nn.parallel.DistributedDataParallel
BUCKET_CAP_MB = 0.1  # three buckets: [head, fc3, fc2], [fc1] (800 KiB), [conv2, conv1]


class Net(nn.Module):
    """Conv layers then a wide MLP: tensors from 40 B to 800 KiB, no buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 200)
        self.fc2 = nn.Linear(200, 160)
        self.fc3 = nn.Linear(160, 10)
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(torch.relu(self.fc3(x)))


def add_random_delays(model: nn.Module, seed: int) -> None:
    """Sleep up to 3 ms after each gradient in backward, differently on each rank."""
    rng = random.Random(seed)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: time.sleep(rng.uniform(0, 0.003)))


def _same_on_all_ranks(obj, what: str) -> None:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    for r, other in enumerate(gathered):
        assert other == gathered[0], f"{what} differs between rank 0 and rank {r}"


def compare_with_ddp(configs: list, steps: int, delays: bool) -> None:
    """For each (optimizer, policy, settings, exact[, accumulate]): train plain DDP and DDP with
    legato's hook side by side from the same seed; parameters must agree, and every rank must
    have issued the same collectives in the same order. `accumulate` adds a backward under
    DDP's no_sync() before each step. After close(), one more step (DDP's own averaging) must
    still agree."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loss_fn = nn.CrossEntropyLoss()
    for opt_name, policy, settings, exact, *more in configs:
        accumulate = bool(more and more[0])
        torch.manual_seed(0)
        ours, ref = Net(), Net()
        ref.load_state_dict(ours.state_dict())
        ref_ddp = DDP(ref, bucket_cap_mb=BUCKET_CAP_MB)
        our_ddp = DDP(ours, bucket_cap_mb=BUCKET_CAP_MB)
        hook = register_scheduled_hook(our_ddp, policy=policy, timeout_s=60, **settings)
        if delays:
            add_random_delays(ours, seed=rank)
        ref_opt = make_optimizer(opt_name, ref_ddp.parameters())
        our_opt = make_optimizer(opt_name, our_ddp.parameters())

        def train(first: int, last: int) -> None:
            for step in range(first, last):
                x, y = batch(rank, step)
                for ddp, opt in ((ref_ddp, ref_opt), (our_ddp, our_opt)):
                    if accumulate:
                        with ddp.no_sync():
                            loss_fn(ddp(x * 0.5), y).backward()
                    loss_fn(ddp(x), y).backward()
                    opt.step()
                    opt.zero_grad()

        def compare() -> float:
            worst = 0.0
            for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
                diff = (p - q).abs().max().item()
                worst = max(worst, diff / max(q.abs().max().item(), 1e-12))
                if exact:
                    assert torch.equal(p, q), f"rank {rank}: {name} differs from DDP by {diff}"
                else:
                    assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), f"{name}: max diff {diff}"
            return worst

        train(0, steps)
        worst = compare()
        stats = hook.stats
        assert stats["buckets"] >= 3, f"only {stats['buckets']} DDP buckets: {stats}"
        assert stats["plain_iterations"] == 2, stats  # one bucket, then the rebuilt layout
        assert stats["scheduled_iterations"] == steps - 2, stats
        if policy == "bytescheduler":
            assert stats["messages_per_step"] > stats["buckets"], stats
        issued = hook.issued()
        per_step = stats["messages_per_step"]
        scheduled = [c for c in issued if c.startswith("c")]
        assert len(scheduled) == per_step * (steps - 2), (len(scheduled), stats)
        for s in range(steps - 2):  # every piece exactly once per step
            window = scheduled[s * per_step:(s + 1) * per_step]
            assert sorted(window) == sorted(f"c{i}" for i in range(per_step)), window
        _same_on_all_ranks(issued, "the order of issued collectives")
        flat = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
        _same_on_all_ranks(flat.tolist(), "the parameters")
        hook.close()
        train(steps, steps + 1)  # after close(): DDP's own averaging over DDP's group
        compare()
        print(f"rank {rank}: {opt_name}/{policy}{' with no_sync' if accumulate else ''} on "
              f"{world} ranks matches DDP after {steps} steps "
              f"({'bit-exact' if exact else f'max relative diff {worst:.2e}'}); "
              f"{stats['buckets']} buckets, {per_step} messages per step, "
              f"order identical on all ranks: {' '.join(scheduled[:per_step])}")
        sys.stdout.flush()
        # Release the DDP models (their reducers hold the default group) before it is
        # destroyed: a reducer left to interpreter exit after destroy_process_group() once
        # aborted rank 1 in its gloo threads ("terminate called without an active exception").
        ref_ddp = our_ddp = hook = ref_opt = our_opt = None
        gc.collect()
    dist.destroy_process_group()


def bad_arguments() -> None:
    """Argument errors, in a one-rank job."""
    dist.init_process_group("gloo")
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    hooked = DDP(Net())
    hooked.register_comm_hook(None, allreduce_hook)
    checks = [
        (lambda: register_scheduled_hook(Net()), "ddp_model must be a torch.nn.parallel."
         "DistributedDataParallel, got Net"),
        (lambda: register_scheduled_hook(DDP(Net()), partition_bytes=1 << 20,
                                         credit_bytes=1 << 10),
         "credit_bytes=1024 is below partition_bytes=1048576"),
        (lambda: register_scheduled_hook(DDP(Net()), policy="lifo"), "policy='lifo' is unknown"),
        (lambda: register_scheduled_hook(DDP(Net()), policy="plain"),
         "policy='plain' is DDP's own behaviour"),
        (lambda: register_scheduled_hook(DDP(Net()), policy="priority", partition_bytes=4096),
         "policy='priority' sends whole tensors"),
        (lambda: register_scheduled_hook(hooked), "already has a comm hook (allreduce_hook)"),
        (lambda: register_scheduled_hook(DDP(Net()), timeout_s=0), "timeout_s=0 is invalid"),
    ]
    for make, expected in checks:
        try:
            make()
        except ConfigError as err:
            assert expected in str(err), f"expected {expected!r} in {err}"
        else:
            raise AssertionError(f"no error for {expected!r}")
    print("bad arguments: all rejected with clear errors")
    dist.destroy_process_group()


def different_plans() -> None:
    """Rank 1 asks for other partitions: both ranks must fail, naming the plan mismatch."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ddp = DDP(Net(), bucket_cap_mb=BUCKET_CAP_MB)
    register_scheduled_hook(ddp, partition_bytes=32768 * (1 + rank), timeout_s=30)
    loss_fn = nn.CrossEntropyLoss()
    try:
        for step in range(3):
            x, y = batch(rank, step)
            loss_fn(ddp(x), y).backward()
    except ConfigError as err:
        assert "ranks built different communication plans" in str(err), err
        print(f"rank {rank}: plan mismatch detected at step {step}: {err}")
        sys.stdout.flush()
        os._exit(0)
    print(f"rank {rank}: no error although the plans differ")
    sys.stdout.flush()
    os._exit(1)


def dead_rank(victim: int) -> None:
    """The victim dies once the hook schedules; the survivor must fail clearly, not hang."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ddp = DDP(Net(), bucket_cap_mb=BUCKET_CAP_MB)
    hook = register_scheduled_hook(ddp, partition_bytes=32768, credit_bytes=65536, timeout_s=15)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(3):  # two plain iterations, then one scheduled
        x, y = batch(rank, step)
        loss_fn(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert hook.stats["scheduled_iterations"] == 1, hook.stats
    dist.barrier()
    if rank == victim:
        os._exit(17)
    start = time.monotonic()
    try:
        for step in range(3, 8):
            x, y = batch(rank, step)
            loss_fn(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
    except (RuntimeError, LegatoError) as err:
        message = str(err).splitlines()[0] if str(err) else repr(err)
        print(f"rank {rank}: clear error after {time.monotonic() - start:.1f} s: "
              f"{type(err).__name__}: {message}")
        print(f"hook error: {type(hook.error).__name__}: {hook.error}")
        sys.stdout.flush()
        os._exit(0)
    print(f"rank {rank}: no error although rank {victim} died")
    sys.stdout.flush()
    os._exit(1)
