"""Workers of benchmarks/mxnet_scheduler.py (run by legato.launch.run_mxnet_ps_job).

Each worker builds the model once per method from one seed, then the methods take turns in
blocks of `steps` steps, `rounds` times; a block ends when its last update is done
(`mx.nd.waitall()` for gluon, `trainer.synchronize()` for legato), and its time divided by
`steps` is one sample. Worker 0 prints `RESULT {json}`: per method the samples, the
compute-only forward+backward time (FB, no communication), the time of one push+pull of every
gradient (C), and how far the methods' parameters ended apart.
"""

from __future__ import annotations

import json
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from legato.adapters.mxnet import ScheduledTrainer

BATCH = {"mlp": 256, "cnn": 32}  # per worker
OPT = ("sgd", {"learning_rate": 0.01, "momentum": 0.9})


def mlp() -> gluon.nn.HybridSequential:
    """Large fully connected layers, 11.5 M parameters (46 MB of gradients): communication-heavy."""
    net = gluon.nn.HybridSequential()
    sizes = [1024, 2048, 2048, 1536, 1024, 10]
    for n_in, n_out in zip(sizes, sizes[1:]):
        net.add(gluon.nn.Dense(n_out, in_units=n_in,
                               activation="relu" if n_out != 10 else None))
    return net


def cnn() -> gluon.nn.HybridSequential:
    """3x3 convolutions on 32x32 images, 0.3 M parameters: compute-heavy."""
    net = gluon.nn.HybridSequential()
    c = 3
    for out, pool in ((32, False), (64, True), (64, False), (128, True), (128, False)):
        net.add(gluon.nn.Conv2D(out, 3, padding=1, in_channels=c, activation="relu"))
        if pool:
            net.add(gluon.nn.MaxPool2D(2))
        c = out
    net.add(gluon.nn.GlobalAvgPool2D(), gluon.nn.Flatten(), gluon.nn.Dense(10, in_units=128))
    return net


MODELS = {"mlp": mlp, "cnn": cnn}


def build(model: str) -> gluon.nn.HybridSequential:
    mx.random.seed(0)
    net = MODELS[model]()
    net.initialize(mx.init.Xavier())
    return net


def batches(model: str, rank: int, batch: int, n: int = 4):
    rs = np.random.RandomState(100 + rank)
    shape = (batch, 1024) if model == "mlp" else (batch, 3, 32, 32)
    return [(mx.nd.array(rs.randn(*shape).astype(np.float32)),
             mx.nd.array(rs.randint(0, 10, batch).astype(np.float32))) for _ in range(n)]


def gluon_trainer(net, kv) -> gluon.Trainer:
    """gluon's own dist_sync Trainer, updating on the workers (update_on_kvstore=False, what
    legato does; with True, the default for dist kvstores, the servers would run the optimizer
    on every key of the kvstore, legato's too, so the two cannot share one job). Its keys are
    initialized before the first step (see [Note: gluon's first step] in
    tests/adapters/mxnet/_kvstore_workers_mx.py; it changes nothing timed)."""
    trainer = gluon.Trainer(net.collect_params(), OPT[0], dict(OPT[1]), kvstore=kv,
                            update_on_kvstore=False)
    trainer._init_kvstore()
    trainer._init_params()
    mx.nd.waitall()
    return trainer


def run(model: str, steps: int, warmup: int, rounds: int, settings: dict,
        batch: int | None = None, timeline: str | None = None) -> None:
    kv = mx.kv.create("dist_sync")
    rank = kv.rank
    batch = batch or BATCH[model]
    data = batches(model, rank, batch)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    nets = {"gluon": build(model), "legato": build(model)}
    trainers = {"gluon": gluon_trainer(nets["gluon"], kv)}
    inner = gluon.Trainer(nets["legato"].collect_params(), OPT[0], dict(OPT[1]), kvstore=kv,
                          update_on_kvstore=False)
    settings = dict(settings)
    trainers["legato"] = ScheduledTrainer(inner, nets["legato"],
                                          policy=settings.pop("policy", "bytescheduler"),
                                          **settings)
    done = {"gluon": 0, "legato": 0}

    cpu: dict[str, list[float]] = {m: [] for m in nets}

    def block(method: str, n: int) -> float:
        net, trainer = nets[method], trainers[method]
        started, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            x, y = data[done[method] % len(data)]
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(x.shape[0])
            done[method] += 1
        if method == "legato":
            trainer.synchronize()
        mx.nd.waitall()
        cpu[method].append((time.process_time() - cpu0) / n)
        return (time.perf_counter() - started) / n

    for method in nets:
        block(method, warmup)
    # With settings["tune"]: legato's tuner runs first (untimed, steps back to back as in
    # training: the tuner times the steps between step() calls), then the timed blocks run
    # the setting it chose.
    tuning_steps = 0
    while trainers["legato"].tuning and tuning_steps < 2000:
        x, y = data[done["legato"] % len(data)]
        with autograd.record():
            loss = loss_fn(nets["legato"](x), y)
        loss.backward()
        trainers["legato"].step(x.shape[0])
        done["legato"] += 1
        tuning_steps += 1
    trainers["legato"].synchronize()
    times: dict[str, list[float]] = {m: [] for m in nets}
    for r in range(rounds):
        # Alternate which method goes first, so that drift hits both alike.
        for method in (("gluon", "legato") if r % 2 == 0 else ("legato", "gluon")):
            times[method].append(block(method, steps))

    trace = None
    if timeline:  # after the timed rounds: legato once more (the setting timed), alone, traced
        trace = f"{timeline}.{model}.legato.json"
        traced_net = build(model)
        chosen = trainers["legato"].config
        traced = ScheduledTrainer(
            gluon.Trainer(traced_net.collect_params(), OPT[0], dict(OPT[1]), kvstore=kv,
                          update_on_kvstore=False), traced_net, timeline=trace,
            **chosen.settings())
        for i in range(warmup + rounds * steps):
            x, y = data[i % len(data)]
            with autograd.record():
                loss = loss_fn(traced_net(x), y)
            loss.backward()
            traced.step(x.shape[0])
        traced.close()

    # Context: forward+backward alone (FB) and one push+pull of every gradient (C).
    net = nets["gluon"]
    x, y = data[0]
    fb = []
    for _ in range(3):
        started = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        mx.nd.waitall()
        fb.append(time.perf_counter() - started)
    grads = [p.grad() for p in net.collect_params().values()]
    keys = [1 << 25 | i for i in range(len(grads))]
    bufs = [g.copy() for g in grads]
    kv.init(keys, bufs)
    comm = []
    for _ in range(3):
        started = time.perf_counter()
        for k, b in zip(keys, bufs):
            kv.push(k, b)
            kv.pull(k, out=b)
        mx.nd.waitall()
        comm.append(time.perf_counter() - started)

    stats = trainers["legato"].stats
    trainers["legato"].close()
    # Same data, same number of steps: gluon's servers and legato's workers ran the same SGD.
    diff = max(float(np.max(np.abs(a.data().asnumpy() - b.data().asnumpy())))
               for a, b in zip(nets["gluon"].collect_params().values(),
                               nets["legato"].collect_params().values()))
    if rank == 0:
        print("RESULT " + json.dumps({
            "times": times, "FB": float(np.median(fb)), "C": float(np.median(comm)),
            "cpu": {m: float(np.median(v[-rounds:])) for m, v in cpu.items()},
            "batch": batch,
            "grad_bytes": sum(g.size * 4 for g in grads), "steps_each": done,
            "max_param_diff": diff, "legato": stats["config"],
            "messages_per_step": stats["messages_per_step"], "trace": trace,
            "tuning_steps": tuning_steps, "tuner": stats["tuner"]}), flush=True)
