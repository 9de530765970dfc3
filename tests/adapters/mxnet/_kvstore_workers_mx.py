"""Workers of the ScheduledTrainer tests (run by legato.launch.run_mxnet_ps_job; no pytest here).

Each function runs in one worker process of a job with a real scheduler and server; it prints
lines the test checks and raises (exit 1, traceback in stderr) when a check fails."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from legato.adapters.mxnet import ScheduledTrainer
from legato.core.errors import ConfigError, LegatoError


def make_net(hybrid: bool = False, seed: int = 0) -> gluon.nn.HybridSequential:
    """Conv layers then an MLP: tensors from 32 B to 1 MiB, 10 parameters in 5 layers."""
    mx.random.seed(seed)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(8, 3, padding=1, in_channels=3, activation="relu"),
            gluon.nn.Conv2D(16, 3, padding=1, in_channels=8, activation="relu"),
            gluon.nn.Dense(256, in_units=16 * 8 * 8, activation="relu"),
            gluon.nn.Dense(64, in_units=256, activation="relu"),
            gluon.nn.Dense(10, in_units=64))
    net.initialize(mx.init.Xavier())
    if hybrid:
        net.hybridize()
    return net


OPTIMIZERS = {
    "sgd": ("sgd", {"learning_rate": 0.05, "momentum": 0.9, "wd": 1e-4}),
    "adam": ("adam", {"learning_rate": 1e-3}),
}


def batch(rank: int, step: int, n: int = 16):
    rs = np.random.RandomState(1000 * step + rank)
    return (mx.nd.array(rs.randn(n, 3, 8, 8).astype(np.float32)),
            mx.nd.array(rs.randint(0, 10, n).astype(np.float32)))


def train(net, trainer, rank: int, steps: int, passes: int = 1) -> None:
    """`passes` > 1: gluon's gradient accumulation (grad_req='add' set by the caller): that
    many backward passes per step, step(passes * batch), then zero_grad()."""
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(steps):
        for p in range(passes):
            x, y = batch(rank, step * passes + p)
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
        trainer.step(x.shape[0] * passes)
        if passes > 1:
            net.collect_params().zero_grad()


def gluon_trainer(net, kv, opt: str, opt_params: dict) -> gluon.Trainer:
    """The baseline: gluon.Trainer over the dist_sync kvstore, update_on_kvstore=False.

    [Note: gluon's first step] gluon initializes its kvstore keys lazily inside the first
    step(): worker 0 pushes its parameters and every worker pulls them back asynchronously, then
    the same step pushes the gradients on the same keys. Nothing orders a worker's pull of the
    initial value before the other worker's gradient push reaches the server, so in about 1 run
    in 10 on this machine a worker starts from the step-0 gradient sum instead of the initial
    weights (measured: 5 of 40 three-step runs diverged; 0 of 40 with the keys initialized
    first). The baseline therefore initializes its keys before the first step."""
    trainer = gluon.Trainer(net.collect_params(), opt, dict(opt_params), kvstore=kv,
                            update_on_kvstore=False)
    trainer._init_kvstore()
    trainer._init_params()
    mx.nd.waitall()
    return trainer


def params_of(net) -> list[np.ndarray]:
    return [p.data().asnumpy() for p in net.collect_params().values()]


def plan_summary(st: ScheduledTrainer) -> dict:
    chunks = st.plan.chunks
    return {"messages": len(chunks),
            "partitioned_keys": sorted({c.parts[0].key for c in chunks
                                        if not c.merged and c.parts[0].offset > 0}),
            "merged": sum(1 for c in chunks if c.merged),
            "partition_bytes": st.config.partition_bytes, "policy": st.config.policy}


def _accumulating(net, passes: int):
    if passes > 1:
        for p in net.collect_params().values():
            p.grad_req = "add"
    return net


def compare_with_gluon(opt_name: str, hybrid: bool, cases: list, steps: int,
                       passes: int = 1) -> None:
    """Train with gluon.Trainer(kvstore=dist_sync, update_on_kvstore=False) once, then with
    ScheduledTrainer for each case [policy, settings] from the same init and data; parameters
    must agree. (One gluon Trainer per job: a second one would initialize keys 0..n-1 again.)
    `passes` > 1: both accumulate gradients that many backward passes per step."""
    kv = mx.kv.create("dist_sync")
    rank = kv.rank
    opt, opt_params = OPTIMIZERS[opt_name]
    initial = params_of(make_net(hybrid))
    ref = _accumulating(make_net(hybrid), passes)
    train(ref, gluon_trainer(ref, kv, opt, opt_params), rank, steps, passes)
    want = params_of(ref)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(want, initial))
    for policy, settings in cases:
        ours = _accumulating(make_net(hybrid), passes)
        inner = gluon.Trainer(ours.collect_params(), opt, dict(opt_params), kvstore=kv,
                              update_on_kvstore=False)
        st = ScheduledTrainer(inner, ours, policy=policy, timeout_s=60, **settings)
        summary = plan_summary(st)
        started = time.perf_counter()
        train(ours, st, rank, steps, passes)
        st.synchronize()
        took = time.perf_counter() - started
        stats = st.stats
        st.close()
        got = params_of(ours)
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
        exact = all(np.array_equal(a, b) for a, b in zip(got, want))
        if not all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want)):
            raise AssertionError(f"{policy}/{opt_name}: parameters differ from gluon's after "
                                 f"{steps} steps (max abs diff {worst:g})")
        print("CASE " + json.dumps({"policy": policy, "opt": opt_name, "hybrid": hybrid,
                                    "exact": exact, "worst": worst, "moved": moved,
                                    "plan": summary, "stats": stats, "seconds": took}),
              flush=True)


def issue_order(policy: str, settings: dict, steps: int) -> None:
    """All gradients ready before step(): print the layers of the chunks in the order this
    worker started them, per step."""
    kv = mx.kv.create("dist_sync")
    rank = kv.rank
    net = make_net(seed=rank)  # different on each worker: the trainer broadcasts worker 0's
    inner = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01}, kvstore=kv,
                          update_on_kvstore=False)
    st = ScheduledTrainer(inner, net, policy=policy, timeout_s=60, **settings)
    start = [float(np.abs(p).sum()) for p in params_of(net)]
    # The first message of each step reports done 0.5 s late, so that every gradient's
    # readiness has reached the scheduler before the window frees: on a busy machine the
    # first message could otherwise come back before the engine had posted the others.
    begin, started = st.kvstore.start, [0]

    def first_late(chunk, on_done) -> None:
        first = started[0] % len(st.plan.chunks) == 0
        started[0] += 1
        begin(chunk, (lambda err: threading.Timer(0.5, on_done, (err,)).start())
              if first else on_done)
    st.kvstore.start = first_late
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(steps):
        x, y = batch(rank, step)
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        mx.nd.waitall()  # every gradient is ready when step() hands them to the scheduler
        st.step(x.shape[0])
        st.synchronize()
    order = list(st.scheduler.issued)
    layers = [st.plan.chunks[c].layer for c in order]
    st.close()
    print("ORDER " + json.dumps({"rank": rank, "chunks": order, "layers": layers,
                                 "per_step": len(st.plan.chunks), "start": start}), flush=True)


def front_layers_go_first(delay_s: float, steps: int) -> None:
    """The last layer's gradients are handed to the scheduler `delay_s` late each step (as if
    its backward were slow): the next forward of the first block must pass its gate before the
    last layer's update is even issued, the last block's only after; parameters still match
    gluon's."""
    kv = mx.kv.create("dist_sync")
    rank = kv.rank
    net = make_net()
    inner = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05,
                                                         "momentum": 0.9}, kvstore=kv,
                          update_on_kvstore=False)
    st = ScheduledTrainer(inner, net, policy="bytescheduler", timeout_s=60,
                          partition_bytes=64 * 1024, merge_bytes=4096)
    last = len(st.layer_names) - 1
    last_keys = {key for key, p in enumerate(st._params) if st.layer_of(p) == last}
    events: list[tuple[str, int, float]] = []  # (what, layer, time)

    ready = st.scheduler.tensor_ready

    def late_last(key: int) -> None:  # tensor_ready is thread-safe: post it from a timer
        if key in last_keys:
            threading.Timer(delay_s, ready, (key,)).start()
        else:
            ready(key)
    st.scheduler.tensor_ready = late_last

    issue = st._update_layer

    def record_update(layer: int) -> None:
        issue(layer)
        events.append(("update", layer, time.perf_counter()))
    st._update_layer = record_update

    blocks = list(net._children.values())
    # Registered after legato's gates, so they run once the gate let the forward through.
    blocks[0].register_forward_pre_hook(
        lambda b, a: events.append(("forward", 0, time.perf_counter())))
    blocks[-1].register_forward_pre_hook(
        lambda b, a: events.append(("forward", last, time.perf_counter())))

    train(net, st, rank, steps)
    st.synchronize()
    st.close()
    got = params_of(net)

    # Per step s >= 1: the forward of block 0 vs the update of the last layer of step s-1.
    fw0 = [t for what, layer, t in events if what == "forward" and layer == 0]
    fwl = [t for what, layer, t in events if what == "forward" and layer == last]
    upl = [t for what, layer, t in events if what == "update" and layer == last]
    ahead = [upl[s - 1] - fw0[s] for s in range(1, steps)]
    after = [fwl[s] - upl[s - 1] for s in range(1, steps)]
    if not all(a > 0 for a in ahead):
        raise AssertionError(f"the first block's forward waited for the last layer's update: "
                             f"margins {ahead}")
    if not all(a > 0 for a in after):
        raise AssertionError(f"the last block's forward ran before its update: {after}")

    ref = make_net()
    train(ref, gluon_trainer(ref, kv, "sgd", {"learning_rate": 0.05, "momentum": 0.9}), rank,
          steps)
    for i, (a, b) in enumerate(zip(got, params_of(ref))):
        if not np.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"parameter {i} differs from gluon's: max diff "
                                 f"{np.max(np.abs(a - b))}")
    print("PROXY " + json.dumps({"rank": rank, "ahead_s": ahead, "after_s": after}),
          flush=True)


def errors_in_step() -> None:
    """One worker: mistakes found at step() or construction with a live kvstore."""
    kv = mx.kv.create("dist_sync")

    def expect(exc, fragment, fn) -> None:
        try:
            fn()
        except exc as err:
            if fragment not in str(err):
                raise AssertionError(f"message {str(err)!r} lacks {fragment!r}") from err
            print(f"RAISED {type(err).__name__}: {err}", flush=True)
            return
        raise AssertionError(f"no {exc.__name__} with {fragment!r}")

    # A parameter the loss does not use: no gradient at the first step.
    net = make_net()
    unused = gluon.nn.Dense(4, in_units=3)
    unused.initialize()
    net.register_child(unused, "unused")
    inner = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv,
                          update_on_kvstore=False)
    st = ScheduledTrainer(inner, net, timeout_s=20)
    x, y = batch(0, 0)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    with autograd.record():
        loss = loss_fn(net[4](net[3](net[2](net[1](net[0](x))))), y)
    loss.backward()
    expect(LegatoError, "got no gradient", lambda: st.step(16))
    expect(LegatoError, unused.weight.name, lambda: st.step(16))
    st.close()

    # step() twice after one backward.
    net = make_net()
    inner = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv,
                          update_on_kvstore=False)
    st = ScheduledTrainer(inner, net, timeout_s=20)
    train(net, st, 0, 1)
    expect(LegatoError, "call loss.backward() once before each trainer.step()",
           lambda: st.step(16))
    expect(ConfigError, "ignore_stale_grad", lambda: st.step(16, ignore_stale_grad=True))
    train(net, st, 0, 1)  # still usable
    st.close()
    expect(LegatoError, "closed", lambda: st.step(16))

    # A gluon Trainer with update_on_kvstore=True has put an optimizer on the servers.
    net = make_net()
    train(net, gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv,
                             update_on_kvstore=True), 0, 1)
    net = make_net()
    expect(ConfigError, "an optimizer runs on them", lambda: ScheduledTrainer(
        gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv,
                      update_on_kvstore=False), net, timeout_s=20))
    print("ERRORS OK", flush=True)


# -- mixed precision ------------------------------------------------------------------------
# (step, worker) pairs whose scaled loss is multiplied by inf: a forced overflow on one worker.
OVERFLOWS = ((2, 1), (4, 0))


def _train_amp(net, trainer, scaler_of, rank: int, steps: int) -> list[float]:
    """MXNet's AMP loop (bfloat16 on CPU, dynamic loss scaling); the loss scale each step's
    loss was scaled by (read after the forward, when amp.scale_loss reads it)."""
    from mxnet.contrib import amp

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    scales = []
    for step in range(steps):
        x, y = batch(rank, step)
        with autograd.record():
            loss = loss_fn(net(x), y)
            if (step, rank) in OVERFLOWS:
                loss = loss * float("inf")
            with amp.scale_loss(loss, trainer) as scaled:
                scales.append(scaler_of().loss_scale)
                autograd.backward(scaled)
        trainer.step(x.shape[0])
    return scales


def compare_amp_with_gluon(cases: list, steps: int) -> None:
    """bfloat16 AMP with dynamic loss scaling (growth every 2 good steps, so the scale also
    grows) and overflows forced on one worker at a time: gluon's Trainer, then ScheduledTrainer
    per case; parameters and the loss scale must agree."""
    from mxnet.contrib import amp

    amp.init(target_dtype="bfloat16")
    kv = mx.kv.create("dist_sync")
    rank = kv.rank
    opt, opt_params = OPTIMIZERS["sgd"]
    ref = make_net()
    trainer = gluon_trainer(ref, kv, opt, opt_params)
    amp.init_trainer(trainer)
    trainer._amp_loss_scaler._scale_seq_len = 2
    want_scales = _train_amp(ref, trainer, lambda: trainer._amp_loss_scaler, rank, steps)
    want_scales.append(trainer._amp_loss_scaler._next_loss_scale)  # what the next step uses
    want = params_of(ref)
    for policy, settings in cases:
        ours = make_net()
        inner = gluon.Trainer(ours.collect_params(), opt, dict(opt_params), kvstore=kv,
                              update_on_kvstore=False)
        amp.init_trainer(inner)
        inner._amp_loss_scaler._scale_seq_len = 2
        st = ScheduledTrainer(inner, ours, policy=policy, timeout_s=60, **settings)
        scales = _train_amp(ours, st, lambda: inner._amp_loss_scaler, rank, steps)
        st.synchronize()
        stats = st.stats
        st.close()
        scales.append(inner._amp_loss_scaler._next_loss_scale)
        got = params_of(ours)
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
        print("AMP " + json.dumps({"policy": policy, "scales": scales,
                                   "want_scales": want_scales, "worst": worst,
                                   "exact": all(np.array_equal(a, b)
                                                for a, b in zip(got, want)),
                                   "steps_done": stats["steps_done"],
                                   "steps_skipped": stats["steps_skipped"]}), flush=True)


def timeline(path: str, steps: int) -> None:
    """`steps` steps with timeline=path on every worker (a window: the order channel and the
    trace gathering share the control key's address exchange)."""
    kv = mx.kv.create("dist_sync")
    net = make_net()
    inner = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01}, kvstore=kv,
                          update_on_kvstore=False)
    st = ScheduledTrainer(inner, net, policy="bytescheduler", timeout_s=60,
                          partition_bytes=64 * 1024, merge_bytes=4096, timeline=path)
    # MXNet's own profiler records legato's spans too (path.profile-RANK.json)
    mx.profiler.set_config(profile_all=True, aggregate_stats=False,
                           filename=f"{path}.profile-{kv.rank}.json")
    mx.profiler.set_state("run")
    train(net, st, kv.rank, steps)
    st.synchronize()
    mx.profiler.set_state("stop")
    mx.profiler.dump()
    st.close()
    print("TIMELINE_DONE", flush=True)


def timeline_on_one_worker(path: str) -> None:
    """Only worker 0 asks for a timeline: both are refused at construction (the gathering at
    close would otherwise wait for a worker that never sends)."""
    kv = mx.kv.create("dist_sync")
    net = make_net()
    inner = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01}, kvstore=kv,
                          update_on_kvstore=False)
    try:
        ScheduledTrainer(inner, net, timeout_s=60, timeline=path if kv.rank == 0 else None)
    except ConfigError as err:
        assert "timeline on" in str(err) or "timeline off" in str(err), err
        print("TIMELINE_REFUSED", flush=True)


def compressed(steps: int) -> None:
    """fp16 on the wire against gluon's float32 Trainer from the same start: close (float16
    rounding of the gradients), not equal (the messages really were float16)."""
    kv = mx.kv.create("dist_sync")
    rank = kv.rank
    opt, opt_params = OPTIMIZERS["sgd"]
    ref = make_net()
    train(ref, gluon_trainer(ref, kv, opt, opt_params), rank, steps)
    want = params_of(ref)
    for policy, settings in [["bytescheduler", {"partition_bytes": 64 * 1024,
                                                "merge_bytes": 4096}], ["plain", {}]]:
        ours = make_net()
        inner = gluon.Trainer(ours.collect_params(), opt, dict(opt_params), kvstore=kv,
                              update_on_kvstore=False)
        st = ScheduledTrainer(inner, ours, policy=policy, timeout_s=60, compression="fp16",
                              **settings)
        wire = {np.dtype(b.dtype).name for b in st.kvstore._buffers}
        train(ours, st, rank, steps)
        st.close()
        got = params_of(ours)
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
        scale = max(float(np.max(np.abs(a))) for a in want)
        digest = hashlib.sha256(b"".join(a.tobytes() for a in got)).hexdigest()
        print("COMPRESSED " + json.dumps({"policy": policy, "wire": sorted(wire),
                                          "worst": worst, "scale": scale,
                                          "digest": digest}), flush=True)

