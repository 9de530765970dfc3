"""optimize_function / optimize_saved_model: TensorFlow graphs through tf2onnx, legato's
optimizer and onnxruntime give TensorFlow's outputs; what tf2onnx cannot convert runs in
TensorFlow with one warning; bad arguments raise ConfigError."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow

tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed")
keras = pytest.importorskip("keras", reason="keras is not installed")
pytest.importorskip("tf2onnx", reason="tf2onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from legato.adapters.tensorflow import (  # noqa: E402
    last_compiles,
    last_reports,
    optimize_function,
    optimize_saved_model,
)
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.rewrite.cost import CostModel  # noqa: E402


class LaunchBound(CostModel):
    """A launch-bound device, so the search's choice does not hang on timings: each MatMul or
    Gemm costs 1, a Split 0.1, the rest nothing (the final A/B timing still decides)."""

    def node_cost(self, node, constants=None):
        return {"MatMul": 1.0, "Gemm": 1.0, "Split": 0.1}.get(node.op_type, 0.0)


FAST = {"budget": 20, "time_limit_s": 5.0, "rounds": 3, "cost_model": LaunchBound()}
LOGGER = "legato.adapters.tensorflow.compile"
SPEC = [tf.TensorSpec((8, 64), tf.float32, name="x")]


@pytest.fixture(autouse=True)
def _cost_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LEGATO_COST_CACHE", str(tmp_path / "op_costs.json"))


def parallel_model() -> keras.Model:
    """Four Dense layers on one input (tf2onnx: four MatMuls sharing x), two named outputs."""
    keras.utils.set_random_seed(0)
    x = keras.Input((64,), name="x")
    branches = [keras.layers.Dense(64, activation="tanh", use_bias=False)(x) for _ in range(4)]
    return keras.Model(x, {"y": keras.layers.Add()(branches), "z": branches[0]})


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((8, 64)).astype(np.float32)


def _close(got, want) -> None:
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-5)


def test_keras_model_runs_in_onnxruntime_with_tf_outputs():
    model = parallel_model()
    fast = optimize_function(model, SPEC, **FAST)
    assert fast.runs_on == "onnxruntime", fast.reason
    for seed in (1, 2):
        _close(fast(_x(seed)), model(_x(seed)))
    _close(fast(x=tf.constant(_x())), model(_x()))          # tensors and keywords work too
    assert any(r.startswith("merge-parallel-matmul") for r in fast.report.applied)
    assert last_reports()[-1] is fast.report and last_compiles()[-1] is fast.record
    if fast.report.accepted:
        ops = [n.op_type for n in fast.model.graph.node]
        assert ops.count("MatMul") < 4
    else:
        assert "not measured faster" in fast.report.reason


def test_tf_function_with_variables_and_tuple_outputs():
    rng = np.random.default_rng(0)
    w = [tf.Variable(rng.standard_normal((16, 16)).astype(np.float32)) for _ in range(3)]

    @tf.function
    def fn(a, b):
        return tf.nn.relu(a @ w[0]) + tf.sigmoid(a @ w[1]), a @ w[2] - b

    specs = [tf.TensorSpec((4, 16), tf.float32, name="a"), tf.TensorSpec((4, 16), tf.float32)]
    fast = optimize_function(fn, specs, **FAST)
    assert fast.runs_on == "onnxruntime", fast.reason
    a, b = (rng.standard_normal((4, 16)).astype(np.float32) for _ in range(2))
    got, want = fast(a, b), fn(a, b)
    assert isinstance(got, tuple) and len(got) == 2
    for g, e in zip(got, want):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-5)


def test_saved_model_route(tmp_path):
    model = parallel_model()
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda x: model(x), input_signature=SPEC)
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    fast = optimize_saved_model(tmp_path / "sm", optimize=False)
    assert fast.runs_on == "onnxruntime", fast.reason
    assert fast.names == ["x"] and "optimize=False" in fast.reason
    _close(fast(x=_x()), model(_x()))
    with pytest.raises(ConfigError, match=r"no signature 'nope'.*serving_default"):
        optimize_saved_model(tmp_path / "sm", "nope")
    with pytest.raises(ConfigError, match="not a directory"):
        optimize_saved_model(tmp_path / "missing")


def test_unconvertible_op_runs_in_tensorflow_with_one_warning(caplog):
    fn = tf.function(lambda a: tf.linalg.svd(a)[0] + 1.0)    # tf2onnx has no Svd
    a = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        fast = optimize_function(fn, [tf.TensorSpec((4, 4), tf.float32)], **FAST)
    np.testing.assert_allclose(fast(a).numpy(), fn(a).numpy())
    assert fast.runs_on == "tensorflow" and "Svd" in fast.reason and fast.model is None
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("legato")]
    assert len(messages) == 1 and "runs in TensorFlow" in messages[0] and "Svd" in messages[0]


def test_bad_arguments_raise_config_errors():
    model = parallel_model()
    with pytest.raises(ConfigError, match="input_signature.*tf.TensorSpec"):
        optimize_function(model, [(8, 64)])
    with pytest.raises(ConfigError, match="input_signature"):
        optimize_function(model, [])
    with pytest.raises(ConfigError, match="not callable"):
        optimize_function(42, SPEC)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bugdet'\]"):
        optimize_function(model, SPEC, bugdet=3)
    fast = optimize_function(model, SPEC, optimize=False)
    with pytest.raises(ConfigError, match=r"takes 1 input\(s\) \['x'\]; got 2"):
        fast(_x(), _x())
    with pytest.raises(ConfigError, match=r"input 'x' has shape \(3, 64\)"):
        fast(_x()[:3])
    with pytest.raises(ConfigError, match=r"unknown input\(s\) \['y'\]"):
        fast(y=_x())
