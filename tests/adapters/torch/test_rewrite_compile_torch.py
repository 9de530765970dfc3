"""torch.compile(backend="legato"): graphs run in onnxruntime with torch's outputs, the rewrite
report is kept, and whatever cannot run there (autograd, training mode, an operator the
exporter lacks) runs eagerly with one warning."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from legato.adapters.torch import compile as lc  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.rewrite.cost import CostModel  # noqa: E402


class LaunchBound(CostModel):
    """A launch-bound device, so the search's choice does not hang on timings: each MatMul or
    Gemm costs 1, a Split 0.1, the rest nothing (the final A/B timing still decides)."""

    def node_cost(self, node, constants=None):
        return {"MatMul": 1.0, "Gemm": 1.0, "Split": 0.1}.get(node.op_type, 0.0)


FAST = {"budget": 20, "time_limit_s": 5.0, "rounds": 3, "cost_model": LaunchBound()}
LOGGER = "legato.adapters.torch.compile"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("LEGATO_COST_CACHE", str(tmp_path / "op_costs.json"))
    torch._dynamo.reset()
    yield
    lc.configure()
    torch._dynamo.reset()


class Parallel(nn.Module):
    """Four Linear layers on one input (merge-parallel-gemm applies), two outputs."""

    def __init__(self, width: int = 64, branches: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(branches))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = sum(torch.tanh(layer(x)) for layer in self.branches)
        return self.drop(y), x.sum(-1)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


def test_runs_in_onnxruntime_with_torch_outputs(caplog):
    model = Parallel().eval()
    x = torch.randn(4, 64)
    before = len(lc.last_compiles())
    fast = torch.compile(model, backend="legato", options=FAST)
    with torch.no_grad():
        got, want = fast(x), model(x)
        again = fast(x + 1)                       # same graph, new values
        want_again = model(x + 1)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip((*got, *again), (*want, *want_again)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    (record,) = lc.last_compiles()[before:]   # one graph, compiled once
    assert record.runs_on == "onnxruntime" and record.model is not None
    report = lc.last_reports()[-1]
    assert report is record.report
    assert any(r.startswith("merge-parallel-gemm") for r in report.applied)
    if report.accepted:                           # measured faster: the rewritten graph runs
        ops = [n.op_type for n in record.model.graph.node]
        assert ops.count("Gemm") < len(model.branches)
    else:
        assert "not measured faster" in report.reason
    assert _warnings(caplog) == []


def test_configure_sets_defaults_and_optimize_false_runs_the_export():
    lc.configure(optimize=False)
    model = Parallel(branches=2).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        got, want = torch.compile(model, backend="legato")(x), model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    record = lc.last_compiles()[-1]
    assert record.runs_on == "onnxruntime" and record.report is None
    assert "optimize=False" in record.reason


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown option.*bugdet.*known"):
        lc.configure(bugdet=3)
    with pytest.raises(ConfigError, match="budget=0 is invalid"):
        lc.configure(budget=0)
    fast = torch.compile(Parallel().eval(), backend="legato", options={"bugdet": 3})
    with torch.no_grad(), pytest.raises(Exception) as info:   # dynamo wraps backend errors
        fast(torch.randn(2, 64))
    assert "ConfigError" in str(info.value) and "unknown option(s) ['bugdet']" in str(info.value)
    assert isinstance(getattr(info.value, "inner_exception", None) or info.value.__context__,
                      ConfigError)


def test_training_with_grads_runs_eagerly_with_one_warning(caplog):
    model = Parallel(branches=2).train()
    x = torch.randn(4, 64)
    fast = torch.compile(model, backend="legato", options=FAST)
    torch.manual_seed(1)
    got = fast(x)
    torch.manual_seed(1)
    want = model(x)
    torch.testing.assert_close(got[0], want[0])
    got[0].sum().backward()                        # autograd still works through the graph
    assert all(p.grad is not None for p in model.branches.parameters())
    messages = _warnings(caplog)
    assert len(messages) == 1 and "inference-only" in messages[0]
    assert "torch.no_grad()" in messages[0]
    assert lc.last_compiles()[-1].runs_on == "torch"


def test_training_mode_without_grads_runs_eagerly():
    model = Parallel(branches=2).train()
    with torch.no_grad():
        torch.compile(model, backend="legato", options=FAST)(torch.randn(4, 64))
    record = lc.last_compiles()[-1]
    assert record.runs_on == "torch" and "training mode" in record.reason
    assert "model.eval()" in record.reason


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.cummax(self.fc(x), 0)[0]     # the TorchScript exporter has no cummax


def test_unsupported_op_runs_eagerly_with_one_warning(caplog):
    model = Unexportable().eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        got, want = torch.compile(model, backend="legato", options=FAST)(x), model(x)
    torch.testing.assert_close(got, want)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "exporter failed" in messages[0]
    assert "cummax" in messages[0]
    assert lc.last_compiles()[-1].runs_on == "torch"


def test_weights_changed_in_place_are_exported_again():
    model = Parallel(branches=2).eval()
    x = torch.randn(4, 64)
    fast = torch.compile(model, backend="legato", options={**FAST, "optimize": False})
    with torch.no_grad():
        fast(x)
        model.branches[0].weight.mul_(2.0)
        got, want = fast(x), model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert lc.last_compiles()[-1].runs_on == "onnxruntime"
