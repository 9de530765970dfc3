"""Training parity models in MXNet Gluon (legato/adapters/mxnet/parity.py): a short run
rebuilds missing predictions far better than an untrained parity model, writes ONNX models that
onnxruntime serves with MXNet's outputs, and stops at its limits; a bad encoder name raises
ConfigError before anything is trained or written. Runs in .venv-mxnet (make test).

.venv-mxnet has no scikit-learn, so most tests train on `_blobs()`, synthetic 8x8 images of ten
noisy class prototypes, given to train_parity_pair in place of a packaged dataset; the digits
test runs where scikit-learn is importable."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.mxnet

mx = pytest.importorskip("mxnet", reason="mxnet lives in .venv-mxnet")

from legato.adapters.mxnet.parity import (  # noqa: E402
    base_mlp,
    export_onnx,
    outputs_of,
    train_base,
    train_parity,
    train_parity_pair,
)
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.parity import AdditionEncoder, datasets, evaluate, sample_groups  # noqa: E402


def _blobs(n_train: int = 1400, n_test: int = 360, seed: int = 0) -> datasets.Dataset:
    """Ten classes of 1x8x8 images in [0, 1]: a random binary prototype per class plus
    heavy noise (a short run classifies about 96% of them)."""
    rng = np.random.default_rng(seed)
    protos = (rng.random((10, 1, 8, 8)) < 0.3).astype(np.float32)
    y = rng.integers(0, 10, n_train + n_test)
    x = np.clip(protos[y] + 0.8 * rng.standard_normal((len(y), 1, 8, 8)), 0, 1)
    x = x.astype(np.float32)
    return datasets.Dataset("blobs", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def _session(path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here; "
                              "requirements/mxnet.txt lists it for .venv-mxnet (make setup)")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _untrained_reconstruction(ds, groups, base_outputs) -> float:
    mx.random.seed(0)
    queries = AdditionEncoder(2).encode_batch(ds.x_test[groups])
    return evaluate(base_outputs, ds.y_test, groups,
                    outputs_of(base_mlp(ds.shape, ds.classes), queries))["reconstruction_accuracy"]


def _check_short_run(out, ds, report) -> None:
    """The report's fields and accuracies, reproduced through the ONNX files, and far above an
    untrained parity model's."""
    assert report == json.loads((out / "report.json").read_text())
    assert report["framework"] == "mxnet" and report["model"] == "BaseMLP 200-100-10"
    assert (report["k"], report["encoder"]) == (2, "addition")
    assert report["reconstructions"] == 2 * report["test_groups"] == 2000
    assert report["parity_training"]["steps"] == 1500
    assert report["parity_training"]["stopped"] == "steps"
    assert report["base_accuracy"] > 0.9
    assert report["reconstruction_accuracy"] > 0.8 and report["degraded_accuracy"] > 0.8

    groups = sample_groups(len(ds.x_test), 2, report["test_groups"], np.random.default_rng(1))
    queries = AdditionEncoder(2).encode_batch(ds.x_test[groups])
    outs = _session(out / "base.onnx").run(None, {"x": ds.x_test})[0]
    par = _session(out / "parity.onnx").run(None, {"x": queries})[0]
    again = evaluate(outs, ds.y_test, groups, par)
    assert abs(again["degraded_accuracy"] - report["degraded_accuracy"]) < 0.01
    untrained = _untrained_reconstruction(ds, groups, outs)
    assert report["reconstruction_accuracy"] > untrained + 0.4


@pytest.mark.timeout(180)
def test_short_run_on_synthetic_images_rebuilds_predictions_and_writes_onnx(tmp_path,
                                                                          monkeypatch):
    ds = _blobs()
    monkeypatch.setattr(datasets, "load", lambda name, seed=0: ds)
    out = tmp_path / "parm"
    report = train_parity_pair("blobs", 2, "addition", out, base_epochs=5, parity_steps=1500,
                               test_groups=1000)
    assert report["dataset"] == "blobs" and report["train_images"] == 1400
    _check_short_run(out, ds, report)


@pytest.mark.timeout(180)
def test_short_run_on_digits(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn (digits) is not installed in this "
                        "environment; requirements/mxnet.txt does not list it for .venv-mxnet")
    out = tmp_path / "parm"
    report = train_parity_pair("digits", 2, "addition", out, base_epochs=10, parity_steps=1500,
                               test_groups=1000)
    _check_short_run(out, datasets.load("digits"), report)


@pytest.mark.timeout(120)
def test_exported_onnx_gives_mxnet_outputs_at_any_batch(tmp_path, parity_checks):
    ds = _blobs(n_train=200, n_test=20)
    model = train_base(ds, epochs=1, seed=3)      # trained a little: nonzero biases
    path = export_onnx(model, ds.shape, tmp_path / "m.onnx")
    parity_checks.exported_onnx_matches(path, outputs_of, model, ds.shape)


@pytest.mark.timeout(60)
def test_parity_training_is_seeded_and_stops_at_its_time_limit(parity_checks):
    parity_checks.seeded_and_time_limited(train_parity, outputs_of)


def test_bad_encoder_raises_config_error_before_training(tmp_path):
    with pytest.raises(ConfigError, match="known: addition, concat"):
        train_parity_pair("digits", 2, "xor", tmp_path / "x", base_epochs=1, parity_steps=1)
    assert not (tmp_path / "x").exists()
