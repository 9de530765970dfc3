"""The rewrite benchmark's model zoo (benchmarks/_rewrite_zoo.py) and its onnxruntime harness
(benchmarks/_ort_harness.py): every model exports, checks, runs and matches torch; the harness
times, compares and runs the baseline tools."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"legato_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _load("_rewrite_zoo")
harness = _load("_ort_harness")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, batch) -> path, each exported once per test module."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[tuple[str, int], Path] = {}

    def get(name: str, batch: int) -> Path:
        if (name, batch) not in cache:
            cache[name, batch] = zoo.export(name, batch, root / f"{name}_b{batch}.onnx")
        return cache[name, batch]
    return get


def test_zoo_has_the_taso_benchmarks():
    assert len(zoo.ZOO) >= 8
    for name in ("resnet18", "resnet50", "squeezenet", "inception", "resnext", "bert",
                 "nasnet", "nasrnn"):
        assert name in zoo.ZOO
    with pytest.raises(KeyError, match="known: resnet18"):
        zoo.build("vgg")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_export_checks_runs_and_matches_torch(name, batch, exported):
    path = exported(name, batch)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert zoo.tiny_initializers(model) == {}
    inputs = zoo.inputs_for(path, batch, seed=1)
    assert all(a.dtype == np.float32 and a.shape[0] == batch for a in inputs.values())
    (got,) = harness.run(path, inputs, level="all", threads=2)
    with torch.no_grad():
        want = zoo.build(name)(*(torch.from_numpy(a) for a in inputs.values())).numpy()
    assert got.shape == want.shape and got.shape[0] == batch
    assert np.isfinite(got).all()
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * scale)


def test_export_is_deterministic_and_atomic(tmp_path):
    a = zoo.export("squeezenet", 1, tmp_path / "a.onnx")
    b = zoo.export("squeezenet", 1, tmp_path / "sub" / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.onnx", "b.onnx", "sub"]


def test_dynamic_batch(tmp_path):
    path = zoo.export("nasrnn", 2, tmp_path / "nasrnn.onnx", dynamic_batch=True)
    sess = harness.session(path, threads=1)
    for batch in (1, 3):
        (y,) = sess.run(None, zoo.inputs_for(path, batch))
        assert y.shape == (batch, 512)


def test_denormal_weights_are_flushed_and_detected():
    model = zoo.build("resnet18")
    with torch.no_grad():
        model.fc.weight[0, :3] = torch.tensor([1e-40, -1e-35, 1e-31])
    zoo._flush_tiny(model)
    assert (model.fc.weight[0, :3] == 0).all()
    tensor = onnx.numpy_helper.from_array(np.array([1.0, 1e-39, 0.0, -1e-32], np.float32), "w")
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [tensor]))
    assert zoo.tiny_initializers(proto) == {"w": 2}


def test_ab_time_two_copies(exported):
    path = exported("squeezenet", 1)
    inputs = zoo.inputs_for(path, 1)
    res = harness.ab_time({"a": path, "b": path.read_bytes()}, inputs, level="all", threads=1,
                          rounds=5, runs_per_round=5, warmup=2)
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert len(r["times"]) == 5 and all(t > 0 for t in r["times"])
        assert 0 < r["min_s"] <= r["median_s"]
    ratio = res["a"]["median_s"] / res["b"]["median_s"]
    assert 0.2 < ratio < 5  # the same model: only a sanity bound, not a timing target


def test_compare_outputs_detects_a_perturbed_model(exported):
    path = exported("bert", 1)
    ref = onnx.load(path)
    inputs = zoo.inputs_for(path, 1)
    same = harness.compare_outputs(ref, path, inputs, "all", 1)
    assert same["equal_within"] and same["max_abs"] == 0.0 and same["reason"] == ""
    bad = onnx.ModelProto()
    bad.CopyFrom(ref)
    init = max(bad.graph.initializer, key=lambda t: np.prod(t.dims))  # a MatMul weight
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.01,
                                               init.name))
    diff = harness.compare_outputs(ref, bad, inputs, "all", 1)
    assert not diff["equal_within"] and diff["max_abs"] > 1e-3 and diff["max_rel"] > 1e-4
    assert "outside rtol" in diff["reason"]


def test_session_levels_and_errors(exported, tmp_path):
    path = exported("nasrnn", 1)
    inputs = zoo.inputs_for(path, 1)
    outs = [harness.run(path, inputs, level=level) for level in harness.LEVELS]
    for out in outs[1:]:
        np.testing.assert_allclose(out[0], outs[0][0], rtol=1e-4, atol=1e-5)
    harness.session(path, level="extended", optimized_model_path=tmp_path / "opt.onnx")
    assert (tmp_path / "opt.onnx").stat().st_size > 0
    with pytest.raises(ValueError, match="known: disabled"):
        harness.session(path, level="max")
    with pytest.raises(KeyError, match="h0"):
        harness.run(path, {"x0": inputs["x0"]})


def test_baselines_record_results_and_failures(exported):
    path = exported("squeezenet", 1)
    model = onnx.load(path)
    out = harness.baselines(model)
    assert set(out) | set(out.failures) == set(harness.BASELINE_TOOLS)
    inputs = zoo.inputs_for(path, 1)
    for optimized in out.values():
        assert harness.compare_outputs(model, optimized, inputs, "disabled", 1)["equal_within"]
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "no_such_tensor"
    out = harness.baselines(broken)
    assert "onnxsim" in out.failures and out.failures["onnxsim"]
