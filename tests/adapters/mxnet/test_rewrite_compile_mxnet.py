"""optimize_block: a hybridized Gluon block exported with mx.onnx, optimized and run in
onnxruntime gives MXNet's outputs; what mx.onnx cannot export runs in MXNet with one warning;
bad arguments raise ConfigError. Runs in .venv-mxnet (make test)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytestmark = pytest.mark.mxnet

mx = pytest.importorskip("mxnet", reason="mxnet lives in .venv-mxnet")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed in this environment; "
                    "requirements/mxnet.txt lists it for .venv-mxnet (make setup)")
pytest.importorskip("onnx_ir", reason="onnx-ir is not installed in this environment; "
                    "requirements/mxnet.txt lists it for .venv-mxnet (make setup)")

from mxnet import gluon, nd  # noqa: E402

from legato.adapters.mxnet import last_compiles, last_reports, optimize_block  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.rewrite.cost import CostModel  # noqa: E402


class LaunchBound(CostModel):
    """A launch-bound device, so the search's choice does not hang on timings: each MatMul or
    Gemm costs 1, a Split 0.1, the rest nothing (the final A/B timing still decides)."""

    def node_cost(self, node, constants=None):
        return {"MatMul": 1.0, "Gemm": 1.0, "Split": 0.1}.get(node.op_type, 0.0)


FAST = {"budget": 20, "time_limit_s": 5.0, "rounds": 3, "cost_model": LaunchBound()}


@pytest.fixture(autouse=True)
def _cost_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LEGATO_COST_CACHE", str(tmp_path / "op_costs.json"))


class Parallel(gluon.HybridBlock):
    """Three Dense layers on one input (mx.onnx: Gemms sharing x), two outputs."""

    def __init__(self, width: int = 64):
        super().__init__()
        with self.name_scope():
            self.a = gluon.nn.Dense(width, in_units=width)
            self.b = gluon.nn.Dense(width, in_units=width)
            self.c = gluon.nn.Dense(width, in_units=width)

    def hybrid_forward(self, F, x):
        return F.tanh(self.a(x)) * F.sigmoid(self.b(x)) + self.c(x), F.relu(self.a(x))


class Det(gluon.HybridBlock):
    def hybrid_forward(self, F, x):
        return F.linalg.det(x) + 1.0            # mx.onnx has no conversion for _linalg_det


def parallel() -> Parallel:
    mx.random.seed(0)
    net = Parallel()
    net.initialize(mx.init.Xavier())
    return net


def test_block_runs_in_onnxruntime_with_mxnet_outputs():
    net = parallel()
    fast = optimize_block(net, nd.random.normal(shape=(4, 64)), **FAST)
    assert fast.runs_on == "onnxruntime", fast.reason
    for seed in (1, 2):
        mx.random.seed(seed)
        x = nd.random.normal(shape=(4, 64))
        got, want = fast(x), net(x)
        assert isinstance(got, list) and len(got) == 2
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.asnumpy(), w.asnumpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast(x.asnumpy())[0].asnumpy(), want[0].asnumpy(), rtol=1e-4,
                               atol=1e-5)                       # numpy inputs work too
    assert any(r.startswith("merge-parallel-gemm") for r in fast.report.applied)
    assert last_reports()[-1] is fast.report and last_compiles()[-1] is fast.record
    ops = [n.op_type for n in fast.model.graph.node]
    assert "Flatten" in ops and ops.count("Flatten") == 1       # one per shared input
    if fast.report.accepted:
        assert ops.count("Gemm") < 3
    else:
        assert "not measured faster" in fast.report.reason


def test_optimize_false_runs_the_export_as_it_is():
    net = parallel()
    x = nd.random.normal(shape=(2, 64))
    fast = optimize_block(net, [x], optimize=False)
    assert fast.runs_on == "onnxruntime" and fast.report is None
    np.testing.assert_allclose(fast(x)[1].asnumpy(), net(x)[1].asnumpy(), rtol=1e-4, atol=1e-5)


def test_unexportable_op_runs_in_mxnet_with_one_warning(caplog):
    block = Det()
    block.initialize()
    x = nd.random.normal(shape=(3, 3))
    with caplog.at_level(logging.WARNING):
        fast = optimize_block(block, x, **FAST)
    np.testing.assert_allclose(fast(x).asnumpy(), block(x).asnumpy())
    assert fast.runs_on == "mxnet" and "_linalg_det" in fast.reason and fast.model is None
    messages = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("legato")]
    assert len(messages) == 1 and "runs in MXNet" in messages[0]


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="needs a gluon.HybridBlock"):
        optimize_block(gluon.nn.Sequential(), nd.zeros((1, 4)))
    net = parallel()
    with pytest.raises(ConfigError, match="example_inputs is empty"):
        optimize_block(net, [])
    with pytest.raises(ConfigError, match=r"example_inputs\[0\] is a str"):
        optimize_block(net, ["x"])
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bugdet'\]"):
        optimize_block(net, nd.zeros((2, 64)), bugdet=3)
    fast = optimize_block(net, nd.zeros((2, 64)), optimize=False)
    with pytest.raises(ConfigError, match=r"input 0 has shape \(3, 64\)"):
        fast(nd.zeros((3, 64)))
    with pytest.raises(ConfigError, match=r"optimized for 1 input\(s\); got 2"):
        fast(nd.zeros((2, 64)), nd.zeros((2, 64)))
