"""Ranks of the TensorFlow ScheduledOptimizer tests (run by legato.launch; no pytest here).

Every rank trains the same model from the same seed on its own batches; parameters after K
steps are written to OUT/params-{backend}-{rank}.npz for the test to compare.
"""

from __future__ import annotations

import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from legato.adapters.tensorflow import ScheduledOptimizer  # noqa: E402
from legato.core.errors import ConfigError, LegatoError  # noqa: E402


def net() -> keras.Model:
    """Conv layers then a wide MLP: tensors from 32 B to 800 KiB, 12 variables."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
        keras.layers.Flatten(),
        keras.layers.Dense(200, activation="relu", name="fc1"),
        keras.layers.Dense(64, activation="relu", name="fc2"),
        keras.layers.Dense(10, activation="relu", name="fc3"),
        keras.layers.Dense(10, name="head"),
    ])


def shared_bn() -> keras.Model:
    """A Dense layer called twice (its variables read twice per step) and BatchNormalization
    (moving statistics assigned during the forward)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inp)
    x = keras.layers.Dense(32, name="fc1")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    shared = keras.layers.Dense(32, activation="relu", name="shared")
    x = shared(shared(x))
    return keras.Model(inp, keras.layers.Dense(10, name="head")(x))


MODELS = {"net": net, "shared_bn": shared_bn}


def make_optimizer(name: str):
    if name == "sgd":
        return keras.optimizers.SGD(0.05, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(1e-3, 2, 0.5))
    raise ValueError(name)


def batch(rank: int, step: int):
    rng = np.random.default_rng(1000 * rank + step)
    x = rng.standard_normal((16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 10, 16)
    return x, y


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def rank_and_size(backend: str):
    if backend == "horovod":
        import horovod.tensorflow as hvd

        hvd.init()
        return hvd.rank(), hvd.size()
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def train_legato(backend: str, opt_name: str, policy: str, settings: dict, steps: int,
                 out: str, compiled_grads: bool = False, model_name: str = "net") -> None:
    rank, _ = rank_and_size(backend)
    model = MODELS[model_name]()
    opt = ScheduledOptimizer(make_optimizer(opt_name), model, policy=policy, backend=backend,
                             timeout_s=120, **settings)

    def grads_of(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    if compiled_grads:
        grads_of = tf.function(grads_of)
    for step in range(steps):
        x, y = batch(rank, step)
        opt.apply_gradients(zip(grads_of(x, y), model.trainable_variables))
    opt.synchronize()
    stats = opt.stats
    opt.close()
    np.savez(os.path.join(out, f"params-{backend}-{policy}-{rank}.npz"),
             *[v.numpy() for v in model.variables],
             iterations=int(opt.iterations.numpy()))
    print("STATS", stats, flush=True)


def plain_both(steps: int, out: str) -> None:
    for opt_name in ("sgd", "adam"):
        train_horovod_plain(opt_name, steps, out)
    train_horovod_plain("sgd", steps, out, "shared_bn")


def train_horovod_plain(opt_name: str, steps: int, out: str, model_name: str = "net") -> None:
    """Plain Horovod-TensorFlow: DistributedGradientTape, the user's own apply_gradients."""
    import horovod.tensorflow as hvd

    rank, _ = rank_and_size("horovod")
    model = MODELS[model_name]()
    opt = make_optimizer(opt_name)
    hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)  # Keras 3
    for step in range(steps):
        x, y = batch(rank, step)
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        tape = hvd.DistributedGradientTape(tape)
        # Horovod 0.28 keys sources by tf.Variable.ref(): give it Keras 3's inner tf.Variables
        grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
        opt.apply_gradients(zip(grads, model.trainable_variables))
    suffix = "" if model_name == "net" else f"-{model_name}"
    np.savez(os.path.join(out, f"params-hvdplain-{opt_name}{suffix}-{rank}.npz"),
             *[v.numpy() for v in model.variables],
             iterations=int(opt.iterations.numpy()))


def fit(backend: str, steps: int, out: str) -> None:
    """Keras model.fit (run_eagerly) with the ScheduledOptimizer as the model's optimizer."""
    rank, _ = rank_and_size(backend)
    model = net()
    model.compile(optimizer=make_optimizer("sgd"), loss=LOSS, run_eagerly=True)
    opt = ScheduledOptimizer(model.optimizer, model, backend=backend, timeout_s=120,
                             partition_bytes=64 * 1024)
    model.optimizer = opt
    xs, ys = zip(*(batch(rank, s) for s in range(steps)))
    model.fit(np.concatenate(xs), np.concatenate(ys), batch_size=16, epochs=1, shuffle=False,
              verbose=0)
    opt.close()
    np.savez(os.path.join(out, f"params-{backend}-fit-{rank}.npz"),
             *[v.numpy() for v in model.variables],
             iterations=int(opt.iterations.numpy()))


def gates(out: str, compiled: bool = False) -> None:
    """The next forward's first layer runs before the last layer's update is done (its
    messages are held back 1 s; see below). conv1's
    forward is recorded when its call has run (after legato's gate: the recording call is
    set before legato wraps the layer); with `compiled`, forward and backward are a
    tf.function and the recording is an op in it."""
    rank, _ = rank_and_size("gloo")
    model = net()
    events = []
    first = model.get_layer("conv1")
    own_call = first.call

    def record():
        events.append(("forward conv1", time.perf_counter()))
        return np.int32(0)

    def recorded_first(*a, **k):
        out = own_call(*a, **k)
        if tf.executing_eagerly():
            record()
            return out
        done = tf.py_function(record, [], tf.int32)
        with tf.control_dependencies([done]):
            return tf.identity(out)

    object.__setattr__(first, "call", recorded_first)
    opt = ScheduledOptimizer(keras.optimizers.SGD(0.05), model, timeout_s=120,
                             partition_bytes=16 * 1024, credit_bytes=1 << 20, merge_bytes=0)
    # The head's messages report done 1 s late (the collective itself runs on time, so every
    # rank still issues the same collectives in the same order): its update comes 1 s late.
    backend = opt._scheduler._backend
    real_start = backend.start
    head = {c.id for c in opt.plan.chunks
            if any(opt.plan.task(k).name.split("/")[-2] == "head" for k in c.keys)}

    def late_start(chunk, on_done):
        if chunk.id in head:
            real_start(chunk, lambda err: threading.Timer(1.0, on_done, (err,)).start())
        else:
            real_start(chunk, on_done)

    backend.start = late_start
    # legato's per-layer update (the Keras apply inside is a tf.function traced once per
    # layer, [Note: compiled updates], so the optimizer's own apply runs only at tracing)
    real_apply = opt._apply

    def recorded_apply(info, grads, keys, what, step):
        if what == "head":
            events.append(("update head", time.perf_counter()))
        return real_apply(info, grads, keys, what, step)

    opt._apply = recorded_apply

    def grads_of(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    if compiled:
        grads_of = tf.function(grads_of)
    for step in range(3):
        x, y = batch(rank, step)
        opt.apply_gradients(zip(grads_of(x, y), model.trainable_variables))
        events.append(("applied", time.perf_counter()))
    stats = opt.stats
    opt.close()
    print("STATS", stats, flush=True)
    with open(os.path.join(out, f"events-{rank}.txt"), "w") as f:
        for name, t in events:
            f.write(f"{name}\t{t}\n")


def embedding() -> None:
    """An Embedding's gradient is IndexedSlices: sent densified during backward, and the tape's
    IndexedSlices passed to apply_gradients are accepted as the same gradient."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(20, 8),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    opt = ScheduledOptimizer(keras.optimizers.SGD(0.1), model, timeout_s=60)
    before = model.trainable_variables[0].numpy().copy()
    for step in range(3):
        x = np.random.default_rng(step).integers(0, 20, (5, 4))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x, training=True) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    opt.close()
    assert not np.array_equal(before, model.trainable_variables[0].numpy())
    print("EMBEDDING_OK", opt.stats["sent_during_backward"], flush=True)


def _one_step(model, opt, step: int) -> None:
    x, y = batch(0, step)
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables))


def compiled_updates() -> None:
    """[Note: compiled updates]: each layer's update as a tf.function gives the eager updates'
    weights bit for bit (SGD with momentum, Adam); a learning rate given as a Python callable
    is updated eagerly, so a change of its value between steps is seen."""
    for make in (lambda: keras.optimizers.SGD(0.05, momentum=0.9),
                 lambda: keras.optimizers.Adam(1e-3)):
        weights = {}
        for compiled in (True, False):
            keras.utils.set_random_seed(0)
            model = net()
            opt = ScheduledOptimizer(make(), model, timeout_s=60, compiled_updates=compiled)
            for step in range(3):
                _one_step(model, opt, step)
            opt.close()
            assert opt.stats["compiled_updates"] is compiled
            weights[compiled] = [v.numpy() for v in model.trainable_variables]
        assert all(np.array_equal(a, b) for a, b in zip(weights[True], weights[False]))
    value = {"lr": 0.1}
    keras.utils.set_random_seed(0)
    model = net()
    opt = ScheduledOptimizer(keras.optimizers.SGD(learning_rate=lambda: value["lr"]), model,
                             timeout_s=60)
    assert opt.stats["compiled_updates"] is False
    moved = []
    for step, lr in enumerate((0.1, 0.0)):
        value["lr"] = lr
        before = [v.numpy() for v in model.trainable_variables]
        _one_step(model, opt, step)
        opt.synchronize()
        moved.append(any(not np.array_equal(a, v.numpy())
                         for a, v in zip(before, model.trainable_variables)))
    opt.close()
    assert moved == [True, False], moved
    print("COMPILED_UPDATES_OK", flush=True)


def bad_arguments() -> None:
    """Errors that need no peer: each must be a ConfigError/LegatoError naming the fix."""
    model = net()
    checks = [
        (lambda: ScheduledOptimizer(object(), model), "keras.optimizers.Optimizer"),
        (lambda: ScheduledOptimizer(keras.optimizers.SGD(global_clipnorm=1.0), model),
         "global_clipnorm"),
        (lambda: ScheduledOptimizer(keras.optimizers.SGD(), model, backend="mpi"),
         "backend='mpi' is unknown"),
        (lambda: ScheduledOptimizer(keras.optimizers.SGD(), model, policy="lifo"),
         "policy='lifo' is unknown"),
        (lambda: ScheduledOptimizer(keras.optimizers.SGD(), object()), "keras.Model"),
        (lambda: ScheduledOptimizer(keras.optimizers.SGD(), model, compression="int8"),
         "compression='int8' is unknown"),
        (lambda: ScheduledOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=2), model,
                                    backward_passes_per_step=3),
         "gradient_accumulation_steps=2; give one of them"),
        (lambda: ScheduledOptimizer(keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(gradient_accumulation_steps=2)), model),
         "gradient accumulation under a LossScaleOptimizer"),
        (lambda: ScheduledOptimizer(keras.optimizers.SGD(), model, backward_passes_per_step=0),
         "backward_passes_per_step"),
    ]
    for fn, words in checks:
        try:
            fn()
        except (ConfigError, LegatoError) as err:
            assert words in str(err), (words, str(err))
        else:
            raise AssertionError(f"no error for {words}")
    opt = ScheduledOptimizer(keras.optimizers.SGD(0.1), model, timeout_s=60)
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    for call, words in [
        (lambda: opt.apply_gradients(zip(grads[:-1], model.trainable_variables[:-1])),
         "got no gradient"),
        (lambda: tf.function(lambda: opt.apply_gradients(
            zip(grads, model.trainable_variables)))(), "runs eagerly"),
        (lambda: opt.apply_gradients(zip(grads, [tf.Variable(1.0)] * len(grads))),
         "is not a trainable variable of the wrapped model"),
    ]:
        try:
            call()
        except (ConfigError, LegatoError) as err:
            assert words in str(err), (words, str(err))
        else:
            raise AssertionError(f"no error for {words}")
    opt.apply_gradients(zip(grads, model.trainable_variables))  # still usable
    opt.close()
    print("BAD_ARGUMENTS_OK", flush=True)


# -- mixed precision, accumulation, compression: legato against plain Horovod ------------------
# Overflows forced on one rank: (step, rank) pairs whose loss is multiplied by inf; loss
# scaling runs 2 steps more than the others (6 with the tests' 4), so that the scale grows
# once (steps 0 and 1 good: doubled), halves twice and the growth counter restarts.
OVERFLOWS = ((2, 1), (4, 0))


def mixed_net() -> keras.Model:
    """`net` under Keras' mixed_float16 policy (float16 compute, float32 variables)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return net()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def lso() -> keras.optimizers.LossScaleOptimizer:
    # a short growth interval, so the scale also grows within the test's steps
    return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9),
                                               initial_scale=2.0 ** 10, dynamic_growth_steps=2)


def _scaled_loss(opt, model, x, y, step: int, rank: int):
    loss = LOSS(y, model(x, training=True))
    if (step, rank) in OVERFLOWS:
        loss = loss * float("inf")
    return opt.scale_loss(loss)


def _save(out: str, name: str, rank: int, model, opt) -> None:
    extra = {}
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):
        extra = {"scale": float(opt.dynamic_scale.numpy()),
                 "counter": int(opt.step_counter.numpy())}
    np.savez(os.path.join(out, f"params-{name}-{rank}.npz"),
             *[v.numpy() for v in model.variables],
             iterations=int(opt.iterations.numpy()), **extra)


def idioms_legato(backend: str, idiom: str, steps: int, out: str) -> None:
    """legato with a LossScaleOptimizer ("amp"), accumulation over 2 passes ("accumulate",
    Adam with a schedule, so the iteration each update runs at matters) or fp16 compression
    ("fp16")."""
    rank, _ = rank_and_size(backend)
    passes = 2 if idiom == "accumulate" else 1
    steps += 2 if idiom == "amp" else 0
    model = mixed_net() if idiom == "amp" else net()
    inner = lso() if idiom == "amp" else make_optimizer(
        "adam" if idiom == "accumulate" else "sgd")
    opt = ScheduledOptimizer(inner, model, backend=backend, timeout_s=120,
                             partition_bytes=64 * 1024, credit_bytes=128 * 1024,
                             backward_passes_per_step=passes,
                             compression="fp16" if idiom == "fp16" else None)
    for step in range(steps * passes):
        x, y = batch(rank, step)
        with tf.GradientTape() as tape:
            loss = _scaled_loss(opt, model, x, y, step, rank) if idiom == "amp" else \
                LOSS(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
    opt.synchronize()
    stats = opt.stats
    assert stats["steps_skipped"] == (len(OVERFLOWS) if idiom == "amp" else 0), stats
    opt.close()
    _save(out, f"{backend}-{idiom}", rank, model, opt.optimizer)
    print("STATS", stats, flush=True)


def idioms_plain(steps: int, out: str) -> None:
    """The same three with plain Horovod-TensorFlow (DistributedGradientTape): the
    LossScaleOptimizer sees the reduced gradients; Keras accumulates the reduced gradients of
    each pass; Horovod's Compression.fp16."""
    import horovod.tensorflow as hvd

    rank, _ = rank_and_size("horovod")
    for idiom in ("amp", "accumulate", "fp16"):
        model = mixed_net() if idiom == "amp" else net()
        passes = 2 if idiom == "accumulate" else 1
        steps_here = steps + 2 if idiom == "amp" else steps
        if idiom == "amp":
            opt = lso()
        elif idiom == "accumulate":
            opt = keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(1e-3, 2, 0.5),
                                        gradient_accumulation_steps=2)
        else:
            opt = make_optimizer("sgd")
        compression = hvd.Compression.fp16 if idiom == "fp16" else hvd.Compression.none
        hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
        for step in range(steps_here * passes):
            x, y = batch(rank, step)
            with tf.GradientTape() as tape:
                loss = _scaled_loss(opt, model, x, y, step, rank) if idiom == "amp" else \
                    LOSS(y, model(x, training=True))
            tape = hvd.DistributedGradientTape(tape, compression=compression)
            grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
            opt.apply_gradients(zip(grads, model.trainable_variables))
        _save(out, f"hvdplain-{idiom}", rank, model, opt)


def two_optimizers(backend: str, steps: int, out: str) -> None:
    """Two models, each with its own ScheduledOptimizer (SGD and Adam), stepped in turn in one
    loop, as a GAN's generator and discriminator are; each must train as alone."""
    rank, _ = rank_and_size(backend)
    models = {name: net() for name in ("sgd", "adam")}
    opts = {name: ScheduledOptimizer(make_optimizer(name), model, backend=backend,
                                     timeout_s=120, partition_bytes=64 * 1024,
                                     credit_bytes=128 * 1024)
            for name, model in models.items()}
    for step in range(steps):
        x, y = batch(rank, step)
        for name, model in models.items():
            with tf.GradientTape() as tape:
                loss = LOSS(y, model(x, training=True))
            opts[name].apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                           model.trainable_variables))
    for name, model in models.items():
        opts[name].close()
        np.savez(os.path.join(out, f"params-{backend}-two-{name}-{rank}.npz"),
                 *[v.numpy() for v in model.variables],
                 iterations=int(opts[name].iterations.numpy()))


def timeline(backend: str, out: str) -> None:
    """Two steps with LEGATO_TIMELINE set by the test (an unchanged script), recorded by
    TensorFlow's profiler too (into out/profile-RANK)."""
    rank, _ = rank_and_size(backend)
    model = net()
    opt = ScheduledOptimizer(make_optimizer("sgd"), model, backend=backend, timeout_s=120,
                             partition_bytes=64 * 1024, credit_bytes=128 * 1024)
    tf.profiler.experimental.start(os.path.join(out, f"profile-{rank}"))
    for step in range(2):
        x, y = batch(rank, step)
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
    opt.synchronize()
    tf.profiler.experimental.stop()
    opt.close()


if __name__ == "__main__":
    sys.exit("run through legato.launch")


def clipped_gradients(steps: int, backend: str = "gloo") -> None:
    """tf.clip_by_global_norm on the tape's gradients before apply_gradients: refused (legato
    sent the unclipped ones during backward), and the job then ends at once, not after the
    close's drain timeout (under Horovod it waited 60 s for messages that never complete)."""
    rank, _ = rank_and_size(backend)
    model = net()
    model(batch(0, 0)[0])
    opt = ScheduledOptimizer(make_optimizer("sgd"), model, backend=backend, timeout_s=60)
    refused = None
    for step in range(steps):
        x, y = batch(rank, step)
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 0.5)
        try:
            opt.apply_gradients(zip(grads, model.trainable_variables))
        except ConfigError as err:
            refused = err
            break
    assert refused is not None and "is not the one backward produced" in str(refused), refused
    started = time.perf_counter()
    opt.close()
    print(f"CLIPPED_REFUSED closed in {time.perf_counter() - started:.1f} s", flush=True)
