"""Checks that the parity trainers' tests share across frameworks (Keras, gluon): an exported
model's interface and outputs, and a seeded, time-limited parity training run."""

from __future__ import annotations

import types

import numpy as np
import pytest


def _exported_onnx_matches(path, outputs_of, model, shape) -> None:
    """The file has one input `x` with a dynamic `batch` dim and one output `y`, and gives the
    framework's outputs at batch 1 and 33 in onnxruntime."""
    onnx = pytest.importorskip("onnx", reason="onnx is not installed here (make setup)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here")
    proto = onnx.load(str(path))
    assert [v.name for v in proto.graph.input] == ["x"]
    assert [v.name for v in proto.graph.output] == ["y"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 33):
        x = rng.random((batch, *shape), dtype=np.float32)
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], outputs_of(model, x),
                                   rtol=1e-4, atol=1e-5)


def _parity_training_is_seeded_and_time_limited(train_parity, outputs_of) -> None:
    from legato.core.parity import AdditionEncoder

    rng = np.random.default_rng(0)
    x = rng.random((50, 1, 4, 4), dtype=np.float32)
    outs = rng.standard_normal((50, 3)).astype(np.float32)
    enc = AdditionEncoder(2)
    first, info = train_parity(outs, x, enc, 3, steps=20, batch=8, seed=5)
    again, _ = train_parity(outs, x, enc, 3, steps=20, batch=8, seed=5)
    assert info["steps"] == 20 and info["stopped"] == "steps" and info["batch_groups"] == 8
    assert np.isfinite(info["final_loss"])
    np.testing.assert_allclose(outputs_of(first, x), outputs_of(again, x), rtol=1e-5, atol=1e-6)
    _, info = train_parity(outs, x, enc, 3, steps=1000, batch=8, time_limit_s=0.0)
    assert (info["steps"], info["stopped"]) == (1, "time-limit")


@pytest.fixture
def parity_checks():
    return types.SimpleNamespace(exported_onnx_matches=_exported_onnx_matches,
                                 seeded_and_time_limited=_parity_training_is_seeded_and_time_limited)
