"""Functions that tests run as ranks of a launched job (legato.launch loads this file in each
process). Kept free of pytest so that ranks start fast."""

from __future__ import annotations

import os
import sys
import time


def torch_allreduce(expect_world: int) -> None:
    """Each rank contributes rank + 1 in every element; the sum must be n(n+1)/2 everywhere."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == expect_world, f"world size {world}, expected {expect_world}"
    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    assert torch.all(t == expected), f"rank {rank}: got {t[:4]}, expected {expected}"
    print(f"rank {rank}: all-reduce ok ({expected})")
    dist.destroy_process_group()


def fail_on_rank(bad_rank: int) -> None:
    """Rank `bad_rank` raises; the others block in a collective that can never finish."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == bad_rank:
        raise RuntimeError(f"planted failure on rank {bad_rank}")
    dist.all_reduce(torch.ones(4))  # blocks: the failed rank never joins
    time.sleep(600)


def sleep_forever() -> None:
    print("sleeping", flush=True)
    time.sleep(600)


def print_env(*names: str) -> None:
    for name in names:
        print(f"{name}={os.environ.get(name)}")
    print(f"args={sys.argv[1:]}")


def horovod_torch_allreduce() -> None:
    import horovod.torch as hvd
    import torch

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    t = torch.full((1000,), float(rank + 1))
    out = hvd.allreduce(t, op=hvd.Sum, name="legato.test")
    expected = size * (size + 1) / 2
    assert torch.all(out == expected), f"rank {rank}: got {out[:4]}, expected {expected}"
    avg = hvd.allreduce(t, name="legato.test.avg")  # default op: average
    assert torch.allclose(avg, torch.full_like(avg, expected / size))
    print(f"rank {rank}/{size}: horovod torch all-reduce ok")
    hvd.shutdown()


def horovod_tensorflow_allreduce() -> None:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    t = tf.fill([1000], float(rank + 1))
    out = hvd.allreduce(t, op=hvd.Sum)
    expected = size * (size + 1) / 2
    assert bool(tf.reduce_all(out == expected)), f"rank {rank}: got {out[:4]}"
    print(f"rank {rank}/{size}: horovod tensorflow all-reduce ok")
    hvd.shutdown()


def mxnet_kvstore_push_pull(kv_type: str, steps: int) -> None:
    """Workers push rank-dependent gradients through a real parameter server and pull sums."""
    import mxnet as mx

    kv = mx.kv.create(kv_type)
    rank, workers = kv.rank, kv.num_workers
    shape = (64, 32)
    kv.init(3, mx.nd.zeros(shape))
    for step in range(steps):
        kv.push(3, mx.nd.ones(shape) * (rank + 1) * (step + 1))
        out = mx.nd.zeros(shape)
        kv.pull(3, out=out)
        # dist_sync with no optimizer: the server stores the sum of this step's pushes.
        expected = workers * (workers + 1) / 2 * (step + 1)
        got = out.asnumpy()
        assert (got == expected).all(), f"worker {rank} step {step}: {got[0, :3]} != {expected}"
    print(f"worker {rank}/{workers}: kvstore {kv_type} push/pull ok over {steps} steps")


def horovod_fail_on_rank(bad_rank: int) -> None:
    import horovod.torch as hvd
    import torch

    hvd.init()
    if hvd.rank() == bad_rank:
        raise RuntimeError(f"planted failure on horovod rank {bad_rank}")
    hvd.allreduce(torch.ones(4), name="never.completes")
    time.sleep(600)
