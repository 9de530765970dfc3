"""horovodrun ranks of benchmarks/tensorflow_scheduler.py (no pytest, no argparse here).

Each rank builds the model twice from one seed: once trained by plain Horovod-TensorFlow
(hvd.DistributedGradientTape, the user's own apply_gradients; eager, and compiled in a
tf.function as most users run it), once by legato's ScheduledOptimizer over Horovod's ops
(forward and backward eager, and in a tf.function that returns the gradients).
The methods take turns in blocks of `steps` steps, `rounds` times, so drift on this noisy
machine hits them alike; a block's time ends when its last update is done.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

WIDTH = {"mlp": 1536, "cnn": 0}


def build(name: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    if name == "mlp":  # communication-heavy: 6 dense layers of 9 MiB, little compute per byte
        w = WIDTH["mlp"]
        layers = [keras.Input((w,))]
        layers += [keras.layers.Dense(w, activation="relu", name=f"fc{i}") for i in range(6)]
        layers += [keras.layers.Dense(10, name="head")]
        return keras.Sequential(layers)
    if name == "cnn":  # compute-heavy: convolutions on 32x32 images, 0.4 MiB of weights
        return keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv4"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(64, activation="relu", name="fc"),
            keras.layers.Dense(10, name="head"),
        ])
    raise ValueError(name)


BATCH = {"mlp": 256, "cnn": 32}


def data(name: str, rank: int, batch: int | None = None):
    rng = np.random.default_rng(rank)
    n = batch or BATCH[name]
    if name == "mlp":
        x = rng.standard_normal((n, WIDTH["mlp"])).astype("float32")
    else:
        x = rng.standard_normal((n, 32, 32, 3)).astype("float32")
    return tf.constant(x), tf.constant(rng.integers(0, 10, x.shape[0]))


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def run(model_name: str, steps: int, warmup: int, rounds: int, settings: dict,
        batch: int | None = None, timeline: str | None = None) -> None:
    import horovod.tensorflow as hvd

    from legato.adapters.tensorflow import ScheduledOptimizer

    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    x, y = data(model_name, hvd.rank(), batch)

    plain_model = build(model_name)
    plain_opt = keras.optimizers.SGD(0.01, momentum=0.9)
    hvd.broadcast_variables([v.value for v in plain_model.variables], root_rank=0)
    plain_vars = [v.value for v in plain_model.trainable_variables]

    def plain_step():
        with tf.GradientTape() as tape:
            loss = LOSS(y, plain_model(x, training=True))
        grads = hvd.DistributedGradientTape(tape).gradient(loss, plain_vars)
        plain_opt.apply_gradients(zip(grads, plain_model.trainable_variables))

    compiled_step = tf.function(plain_step)

    legato_model = build(model_name)
    legato_opt = ScheduledOptimizer(keras.optimizers.SGD(0.01, momentum=0.9), legato_model,
                                    backend="horovod", **settings)

    def legato_grads():
        with tf.GradientTape() as tape:
            loss = LOSS(y, legato_model(x, training=True))
        return tape.gradient(loss, legato_model.trainable_variables)

    compiled_grads = tf.function(legato_grads)

    def legato_step():
        legato_opt.apply_gradients(zip(legato_grads(), legato_model.trainable_variables))

    def legato_compiled_step():
        legato_opt.apply_gradients(zip(compiled_grads(), legato_model.trainable_variables))

    methods = {"horovod": (plain_step, lambda: None),
               "horovod-compiled": (compiled_step, lambda: None),
               "legato": (legato_step, legato_opt.synchronize),
               "legato-compiled": (legato_compiled_step, legato_opt.synchronize)}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for m, (step, sync) in methods.items():  # warm up (and trace) each once
        for _ in range(warmup):
            step()
        sync()
    # legato's default check (fixed sizes against plain, or a tuner given): untimed, with the
    # compiled step; the timed blocks run what it chose
    check_steps = 0
    while legato_opt.tuning:
        legato_compiled_step()
        check_steps += 1
    legato_opt.synchronize()
    chosen = legato_opt.config
    for _ in range(rounds):
        for m, (step, sync) in methods.items():
            hvd.allreduce(tf.zeros(1), name="legato.bench.barrier")
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[m].append((time.perf_counter() - t0) / steps)
    legato_opt.close()
    traces = {}
    if timeline:  # after the timed rounds: each legato way once more, alone, traced
        for way, compiled in (("legato", False), ("legato-compiled", True)):
            traces[way] = f"{timeline}.{model_name}.{way}.json"
            traced_model = build(model_name)
            traced_opt = ScheduledOptimizer(
                keras.optimizers.SGD(0.01, momentum=0.9), traced_model, backend="horovod",
                timeline=traces[way], **chosen.settings())   # the setting timed above

            def traced_grads(model=traced_model):
                with tf.GradientTape() as tape:
                    loss = LOSS(y, model(x, training=True))
                return tape.gradient(loss, model.trainable_variables)

            grads_fn = tf.function(traced_grads) if compiled else traced_grads
            for _ in range(warmup + rounds * steps):
                traced_opt.apply_gradients(zip(grads_fn(), traced_model.trainable_variables))
            traced_opt.close()
    # F, B and C on this rank: forward, backward without communication, one all-reduce of all
    # gradients (the bounds of the ratio)
    fb = []
    for _ in range(3):
        t0 = time.perf_counter()
        with tf.GradientTape() as tape:
            loss = LOSS(y, plain_model(x, training=True))
        t1 = time.perf_counter()
        grads = tape.gradient(loss, plain_vars)
        t2 = time.perf_counter()
        fb.append((t1 - t0, t2 - t1))
    cs = []
    for i in range(3):
        hvd.allreduce(tf.zeros(1), name="legato.bench.barrier")
        t0 = time.perf_counter()
        hvd.grouped_allreduce(grads, name=f"legato.bench.c{i}")
        cs.append(time.perf_counter() - t0)
    f, b = (float(np.median([v[i] for v in fb])) for i in (0, 1))
    print("RESULT " + json.dumps({
        "rank": hvd.rank(), "model": model_name, "times": times, "F": f, "B": b,
        "C": float(np.median(cs)), "stats": legato_opt.stats, "traces": traces,
        "check_steps": check_steps,
        "grad_bytes": int(sum(int(np.prod(v.shape)) * 4 for v in plain_vars))}), flush=True)
    hvd.shutdown()
