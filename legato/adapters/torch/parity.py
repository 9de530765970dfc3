"""Training parity models in PyTorch (Parity Models, SOSP'19) and exporting them to ONNX.

    from legato.adapters.torch.parity import train_parity_pair
    report = train_parity_pair("digits", k=2, encoder="addition", out_dir="parm-digits")

As in the paper's trainer: the base model F (here the paper's BaseMLP, 200-100 hidden units)
is trained first; its outputs on the training images are cached; the parity model P (the same
architecture) is trained with MSE(P(encode(X_1..X_k)), F(X_1) + ... + F(X_k)) on coding groups
drawn afresh every step (Adam, lr 1e-3, weight decay 1e-5). Both are judged on groups of test
images (`legato.core.parity.training.evaluate`) and exported to ONNX, checked against PyTorch
in onnxruntime.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from legato.core._files import atomic_write
from legato.core.parity import datasets
from legato.core.parity.codes import Encoder
from legato.core.parity.training import Trainer, check_onnx, pair_trainer, sample_groups

__all__ = ["base_mlp", "export_onnx", "outputs_of", "train_backup", "train_base",
           "train_parity", "train_parity_pair"]


def base_mlp(shape: Sequence[int], classes: int, hidden: Sequence[int] = (200, 100)
             ) -> nn.Sequential:
    """The paper's BaseMLP: flatten, then Linear+ReLU layers, then a Linear to the classes."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(np.prod(shape))
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@torch.no_grad()
def outputs_of(model: nn.Module, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The model's outputs on numpy inputs, as float32 numpy."""
    model.eval()
    return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy()
                           for i in range(0, len(x), batch)])


def train_base(ds: datasets.Dataset, *, epochs: int = 30, batch: int = 64, lr: float = 1e-3,
               seed: int = 0, hidden: Sequence[int] = (200, 100)) -> nn.Sequential:
    """Train the base model with cross-entropy (Adam)."""
    torch.manual_seed(seed)
    model = base_mlp(ds.shape, ds.classes, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def train_backup(ds: datasets.Dataset, *, epochs: int = 30, seed: int = 0) -> nn.Sequential:
    """The cheap backup model a baseline serves beside the base model: a linear softmax
    classifier (no hidden layer: 1/22 of BaseMLP's multiply-adds on mnist_5k)."""
    return train_base(ds, epochs=epochs, seed=seed, hidden=())


def train_parity(base_outputs: np.ndarray, x_train: np.ndarray, encoder: Encoder,
                 classes: int, *, steps: int = 20000, batch: int | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-5, seed: int = 0,
                 time_limit_s: float | None = None) -> tuple[nn.Sequential, dict[str, Any]]:
    """Train a parity model toward the sum of the cached base outputs of each coding group.

    Args:
        base_outputs: the base model's outputs on `x_train` [n, classes].
        x_train: training queries [n, *shape].
        encoder: how k queries become one parity query.
        steps: optimizer steps, each on `batch` fresh random groups (paper: 64 for k=2, else 32).
        time_limit_s: stop early after this many seconds (the report says so).
    Returns:
        (the parity model, {"steps": done, "seconds": ..., "final_loss": ..., "stopped": why}).
    """
    batch = batch or (64 if encoder.k == 2 else 32)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = base_mlp(x_train.shape[1:], classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    start, losses, stopped = time.perf_counter(), [], "steps"
    model.train()
    done = 0
    for done in range(1, steps + 1):
        groups = sample_groups(len(x_train), encoder.k, batch, rng)
        query = torch.from_numpy(encoder.encode_batch(x_train[groups]).astype(np.float32))
        target = torch.from_numpy(base_outputs[groups].sum(axis=1))
        opt.zero_grad()
        loss = F.mse_loss(model(query), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            stopped = "time-limit"
            break
    info = {"steps": done, "batch_groups": batch, "seconds": time.perf_counter() - start,
            "final_loss": float(np.mean(losses[-100:])), "stopped": stopped}
    return model.eval(), info


def export_onnx(model: nn.Module, shape: Sequence[int], path: str | Path) -> Path:
    """Export with a dynamic batch dimension (input "x", output "y"), written atomically, and
    check onnxruntime's outputs against PyTorch's."""
    import io

    import onnx

    buf = io.BytesIO()
    example = torch.zeros(2, *shape)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the TorchScript exporter's deprecation notice
        torch.onnx.export(model.eval(), (example,), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                          opset_version=17)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    check_onnx(proto, lambda x: outputs_of(model, x), shape, "PyTorch")
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()), binary=True)


def _check_export() -> None:
    import onnx  # noqa: F401 (both come with legato's requirements)
    import onnxruntime  # noqa: F401


train_parity_pair = pair_trainer(Trainer(
    "torch", train_base, outputs_of, train_parity, export_onnx, check_export=_check_export,
    widths=lambda model: [m.out_features for m in model if isinstance(m, nn.Linear)]))
