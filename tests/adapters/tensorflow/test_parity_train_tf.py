"""Training parity models in Keras (legato/adapters/tensorflow/parity.py): a short run on
scikit-learn's digits rebuilds missing predictions far better than an untrained parity model,
writes ONNX models that onnxruntime serves with Keras' outputs, and stops at its limits; a bad
encoder name raises ConfigError before anything is trained or written."""

from __future__ import annotations


import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow

tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed")
keras = pytest.importorskip("keras", reason="keras is not installed")
pytest.importorskip("sklearn", reason="scikit-learn (digits) is not installed; make setup")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from legato.adapters.tensorflow.parity import (  # noqa: E402
    base_mlp,
    export_onnx,
    outputs_of,
    train_parity,
    train_parity_pair,
)
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.parity import datasets  # noqa: E402


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.timeout(240)
def test_short_run_rebuilds_predictions_and_writes_onnx(tmp_path, parity_checks):
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed")
    out = tmp_path / "parm"
    report = train_parity_pair("digits", 2, "addition", out, base_epochs=10, parity_steps=1500,
                               test_groups=1000)
    assert report["dataset"] == "digits"
    ds = datasets.load("digits")

    def untrained(queries):
        keras.utils.set_random_seed(0)
        return outputs_of(base_mlp(ds.shape, 10), queries)

    parity_checks.short_run_ok(out, ds, report, "tensorflow", untrained)


@pytest.mark.timeout(120)
def test_exported_onnx_gives_keras_outputs_at_any_batch(tmp_path, parity_checks):
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed")
    keras.utils.set_random_seed(3)
    model = base_mlp((1, 8, 8), 10, hidden=(16,))
    for layer in model.layers:                    # nonzero biases, so they are exported too
        if isinstance(layer, keras.layers.Dense):
            layer.bias.assign(np.linspace(-1, 1, layer.units).astype(np.float32))
    path = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    parity_checks.exported_onnx_matches(path, outputs_of, model, (1, 8, 8))


@pytest.mark.timeout(60)
def test_parity_training_is_seeded_and_stops_at_its_time_limit(parity_checks):
    parity_checks.seeded_and_time_limited(train_parity, outputs_of)


def test_bad_encoder_raises_config_error_before_training(tmp_path):
    with pytest.raises(ConfigError, match="known: addition, concat"):
        train_parity_pair("digits", 2, "xor", tmp_path / "x", base_epochs=1, parity_steps=1)
    assert not (tmp_path / "x").exists()
