"""`legato parity train` writes its models as one set (issue 20): stamped with one pair id and
moved into place together, so a failed write leaves the earlier set whole, and `legato serve`
refuses a base and a parity model from different runs."""

from __future__ import annotations

import json

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from legato.core.errors import ConfigError  # noqa: E402
from legato.core.parity import training  # noqa: E402
from legato.core.parity.frontend import ServeConfig  # noqa: E402


def _tiny(path, pair=None):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(g)
    if pair is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = training.PAIR_KEY, pair
    onnx.save(model, str(path))
    return str(path)


class _Trainer:
    """Writes a tiny model per export, and fails on `fail_on` (a full disk)."""

    def __init__(self, fail_on=None):
        self.fail_on = fail_on

    def export_onnx(self, model, shape, path):
        if model == self.fail_on:
            raise OSError(28, "No space left on device")
        _tiny(path)


def test_a_failed_write_leaves_the_earlier_set_whole(tmp_path):
    models = {"base": "b", "parity": "p", "backup": "k"}
    training._write_pair(_Trainer(), tmp_path, (4,), {"run": 1}, models)
    first = {n: (tmp_path / n).read_bytes() for n in
             ("base.onnx", "parity.onnx", "backup.onnx", "report.json")}
    pair = json.loads(first["report.json"])["pair_id"]
    assert all(training.pair_id(tmp_path / f"{r}.onnx") == pair for r in models)
    with pytest.raises(OSError):
        training._write_pair(_Trainer(fail_on="p"), tmp_path, (4,), {"run": 2}, models)
    assert {n: (tmp_path / n).read_bytes() for n in first} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(first)   # no staging left
    training._write_pair(_Trainer(), tmp_path, (4,), {"run": 3}, models)
    assert training.pair_id(tmp_path / "base.onnx") != pair


def test_serve_refuses_models_of_different_runs(tmp_path):
    base = _tiny(tmp_path / "base.onnx", "run-a")
    config = ServeConfig(model=base, parity_model=_tiny(tmp_path / "parity.onnx", "run-b"))
    with pytest.raises(ConfigError, match="not trained together"):
        config.check()
    ServeConfig(model=base, parity_model=_tiny(tmp_path / "p2.onnx", "run-a")).check()
    # a model from elsewhere carries no pair id: nothing to compare
    ServeConfig(model=base, parity_model=_tiny(tmp_path / "p3.onnx")).check()
    assert training.pair_id(tmp_path / "nonexistent.onnx") is None
