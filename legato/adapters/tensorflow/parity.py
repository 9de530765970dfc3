"""Training parity models in TensorFlow / Keras 3 (Parity Models, SOSP'19) and exporting them to
ONNX with tf2onnx: the same trainer as `legato.adapters.torch.parity`, over the same
framework-free core (`legato.core.parity`).

    from legato.adapters.tensorflow.parity import train_parity_pair
    report = train_parity_pair("digits", k=2, encoder="addition", out_dir="parm-digits")

The base model F (the paper's BaseMLP, 200-100 hidden units) is trained with cross-entropy on
logits (Adam); its outputs on the training images are cached; the parity model P (the same
architecture) is trained with MSE(P(encode(X_1..X_k)), F(X_1) + ... + F(X_k)) on coding groups
drawn afresh every step, in a `tf.function` GradientTape step with Adam and weight decay as
torch.optim.Adam applies it: `weight_decay * w` added to every gradient (coupled L2, biases
included), not Keras' decoupled AdamW.

Export needs tf2onnx (its `from_keras` fails on Keras 3, so the model goes in as a function);
without it `export_onnx` and `train_parity_pair(out_dir=...)` raise BackendUnavailable, and
training and judging still work.
"""

from __future__ import annotations

import collections
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from legato.core._files import atomic_write
from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.parity import datasets
from legato.core.parity.codes import Encoder
from legato.core.parity.training import Trainer, check_onnx, pair_trainer, sample_groups

__all__ = ["base_mlp", "export_onnx", "outputs_of", "train_base", "train_parity",
           "train_parity_pair"]


def base_mlp(shape: Sequence[int], classes: int, hidden: Sequence[int] = (200, 100)
             ) -> keras.Sequential:
    """The paper's BaseMLP: flatten, then Dense+ReLU layers, then a Dense to the classes."""
    layers: list[Any] = [keras.Input(shape=tuple(int(s) for s in shape)),
                         keras.layers.Flatten()]
    layers += [keras.layers.Dense(int(h), activation="relu") for h in hidden]
    layers.append(keras.layers.Dense(int(classes)))
    return keras.Sequential(layers)


def outputs_of(model: keras.Model, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The model's outputs on numpy inputs, as float32 numpy."""
    return np.concatenate([np.asarray(model(np.ascontiguousarray(x[i:i + batch], np.float32),
                                            training=False))
                           for i in range(0, len(x), batch)])


def train_base(ds: datasets.Dataset, *, epochs: int = 30, batch: int = 64, lr: float = 1e-3,
               seed: int = 0, hidden: Sequence[int] = (200, 100)) -> keras.Sequential:
    """Train the base model with cross-entropy on logits (Adam)."""
    keras.utils.set_random_seed(seed)
    model = base_mlp(ds.shape, ds.classes, hidden)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds.x_train, ds.y_train, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
    return model


def train_parity(base_outputs: np.ndarray, x_train: np.ndarray, encoder: Encoder,
                 classes: int, *, steps: int = 20000, batch: int | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-5, seed: int = 0,
                 time_limit_s: float | None = None) -> tuple[keras.Sequential, dict[str, Any]]:
    """Train a parity model toward the sum of the cached base outputs of each coding group.

    Args:
        base_outputs: the base model's outputs on `x_train` [n, classes].
        x_train: training queries [n, *shape].
        encoder: how k queries become one parity query.
        steps: optimizer steps, each on `batch` fresh random groups (paper: 64 for k=2, else 32).
        weight_decay: coupled L2 as in torch.optim.Adam (added to the gradients).
        time_limit_s: stop early after this many seconds (the report says so).
    Returns:
        (the parity model, {"steps": done, "seconds": ..., "final_loss": ..., "stopped": why}).
    """
    batch = batch or (64 if encoder.k == 2 else 32)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = base_mlp(x_train.shape[1:], classes)
    opt = keras.optimizers.Adam(learning_rate=lr)
    weights = model.trainable_variables
    decay = tf.constant(weight_decay, tf.float32)

    @tf.function(jit_compile=False, reduce_retracing=True)
    def step(query: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(query, training=True) - target))
        grads = tape.gradient(loss, weights)
        opt.apply_gradients([(g + decay * w, w) for g, w in zip(grads, weights)])
        return loss

    start, stopped = time.perf_counter(), "steps"
    losses: collections.deque = collections.deque(maxlen=100)   # read back once, at the end
    done = 0
    for done in range(1, steps + 1):
        groups = sample_groups(len(x_train), encoder.k, batch, rng)
        query = encoder.encode_batch(x_train[groups]).astype(np.float32)
        target = base_outputs[groups].sum(axis=1).astype(np.float32)
        losses.append(step(query, target))
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            stopped = "time-limit"
            break
    tail = [float(v) for v in losses]
    info = {"steps": done, "batch_groups": batch, "seconds": time.perf_counter() - start,
            "final_loss": float(np.mean(tail)) if tail else float("nan"), "stopped": stopped}
    return model, info


def _tf2onnx():
    try:
        import onnx  # noqa: F401
        import tf2onnx
    except ImportError as err:
        raise BackendUnavailable(
            f"exporting a Keras parity model to ONNX needs tf2onnx and onnx ({err}); install "
            "them with `pip install 'legato[tensorflow,onnx]'` (or 'legato[tensorflow-cpu,onnx]'"
            "; the TensorFlow extras bring tf2onnx), or call train_parity_pair with "
            "out_dir=None to train and judge without exporting") from err
    return tf2onnx


def _name_io(proto: Any, inp: str = "x", out: str = "y") -> None:
    """Name the graph's one input `inp` and one output `out`, with a "batch" first dimension."""
    graph = proto.graph
    renames = {graph.input[0].name: inp, graph.output[0].name: out}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (graph.input[0], graph.output[0]):
        value.name = renames[value.name]
        value.type.tensor_type.shape.dim[0].dim_param = "batch"


def export_onnx(model: keras.Model, shape: Sequence[int], path: str | Path) -> Path:
    """Export with a dynamic batch dimension (input "x", output "y"), written atomically, and
    check onnxruntime's outputs against Keras'."""
    tf2onnx = _tf2onnx()
    import onnx

    spec = tf.TensorSpec((None, *shape), tf.float32, name="x")
    fn = tf.function(lambda x: model(x, training=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, external = tf2onnx.convert.from_function(fn, input_signature=[spec], opset=17)
    if external:
        raise ConfigError("tf2onnx stored the weights outside the model (over 2 GB); "
                          "export_onnx writes one self-contained file")
    _name_io(proto)
    onnx.checker.check_model(proto)
    check_onnx(proto, lambda x: outputs_of(model, x), shape, "Keras")
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()), binary=True)


train_parity_pair = pair_trainer(Trainer(
    "tensorflow", train_base, outputs_of, train_parity, export_onnx, check_export=_tf2onnx,
    widths=lambda model: [layer.units for layer in model.layers
                          if isinstance(layer, keras.layers.Dense)]))
