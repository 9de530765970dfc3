"""Training parity models in MXNet Gluon (legato/adapters/mxnet/parity.py): a short run
rebuilds missing predictions far better than an untrained parity model, writes ONNX models that
onnxruntime serves with MXNet's outputs, and stops at its limits; a bad encoder name raises
ConfigError before anything is trained or written. Runs in .venv-mxnet (make test).

.venv-mxnet has no scikit-learn, so most tests train on `_blobs()`, synthetic 8x8 images of ten
noisy class prototypes, given to train_parity_pair in place of a packaged dataset; the digits
test runs where scikit-learn is importable."""

from __future__ import annotations


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
from legato.core.parity import datasets  # noqa: E402


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


def _check_short_run(out, ds, report, parity_checks) -> None:
    def untrained(queries):
        mx.random.seed(0)
        return outputs_of(base_mlp(ds.shape, ds.classes), queries)

    parity_checks.short_run_ok(out, ds, report, "mxnet", untrained)


@pytest.mark.timeout(180)
def test_short_run_on_synthetic_images_rebuilds_predictions_and_writes_onnx(tmp_path,
                                                                          monkeypatch,
                                                                          parity_checks):
    ds = _blobs()
    monkeypatch.setattr(datasets, "load", lambda name, seed=0: ds)
    out = tmp_path / "parm"
    report = train_parity_pair("blobs", 2, "addition", out, base_epochs=5, parity_steps=1500,
                               test_groups=1000)
    assert report["dataset"] == "blobs" and report["train_images"] == 1400
    _check_short_run(out, ds, report, parity_checks)


@pytest.mark.timeout(180)
def test_short_run_on_digits(tmp_path, parity_checks):
    pytest.importorskip("sklearn", reason="scikit-learn (digits) is not installed in this "
                        "environment; requirements/mxnet.txt does not list it for .venv-mxnet")
    out = tmp_path / "parm"
    report = train_parity_pair("digits", 2, "addition", out, base_epochs=10, parity_steps=1500,
                               test_groups=1000)
    _check_short_run(out, datasets.load("digits"), report, parity_checks)


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
