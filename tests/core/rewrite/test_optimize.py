"""optimize(): a rewritten model comes back only when measured faster with equal outputs;
numeric verification rejects a planted wrong rule; the rewrite and rules commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest

from legato.core.rewrite.optimize import RewriteError, optimize
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.rules import all_rules, shipped_rules
from legato.core.rewrite.verify import verify_numeric

pytest.importorskip("onnxruntime")
sys.path.insert(0, os.path.dirname(__file__))
from test_search import MERGE, PerOp, _parallel  # noqa: E402

# concatenating on the wrong axis: shapes still work out when K == N, values do not
WRONG = Rule.from_json({**MERGE.to_json(), "name": "merge-parallel-matmul-wrong-axis",
                        "target": {**MERGE.target.to_json(), "nodes": [
                            {"id": "w", "op": "Concat", "inputs": ["w2", "w1"],
                             "attrs": {"axis": 1}},
                            *MERGE.target.to_json()["nodes"][1:]]},
                        "examples": [{"x": [2, 3], "w1": [3, 3], "w2": [3, 3]}]})


def test_shipped_rules_pass_numeric_verification_again():
    rules = all_rules()
    assert {r.name for r in rules} >= {"merge-parallel-matmul", "merge-parallel-gemm"}
    for rule in rules:
        assert verify_numeric(rule)["numeric"] == "passed", rule.name
    assert [r.name for r in shipped_rules()] == [r.name for r in rules]


def test_a_planted_wrong_rule_fails_verification():
    record = verify_numeric(WRONG)
    assert record["numeric"] == "failed" and "max abs error" in record["detail"]


def test_a_wrong_rule_never_reaches_the_output():
    proto = _parallel(2, k=16)
    out, report = optimize(proto, rules=[WRONG], cost_model=PerOp(), rounds=2)
    assert report.applied == ["merge-parallel-matmul-wrong-axis"]
    assert not report.accepted and "outputs differ" in report.reason
    assert out is proto and report.max_abs_error > 1e-3


def test_a_correct_rewrite_is_returned_only_with_its_record():
    proto = _parallel(3, k=16)
    out, report = optimize(proto, rules=[MERGE], cost_model=PerOp(), rounds=3)
    assert report.applied and report.max_abs_error <= 1e-5
    if report.accepted:                      # measured faster: the record travels with it
        meta = {p.key: p.value for p in out.metadata_props}
        assert json.loads(meta["legato.rewrite.applied"]) == report.applied
        onnx.checker.check_model(out)
        assert [n.op_type for n in out.graph.node].count("MatMul") == 1
        assert not any(n.op_type == "Concat" for n in out.graph.node)   # folded into weights
    else:
        assert out is proto and "not measured faster" in report.reason
    assert "rules applied: merge-parallel-matmul" in report.explain()


def test_nothing_to_do_returns_the_original():
    proto = _parallel(1)
    out, report = optimize(proto, rules=[MERGE], cost_model=PerOp())
    assert out is proto and report.reason == "no rule matches the model"


def test_invalid_models_are_refused():
    bad = onnx.ModelProto()
    bad.graph.node.add(op_type="NoSuchOp")
    with pytest.raises(RewriteError, match="not valid ONNX"):
        optimize(bad, rules=[MERGE], cost_model=PerOp())


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "legato.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_rewrite_command_writes_a_model_and_protects_the_input(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(_parallel(2, k=16), src)
    before = src.read_bytes()
    proc = _cli("rewrite", str(src), "-o", str(tmp_path / "out.onnx"), "--budget", "5",
                "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "search:" in proc.stdout and src.read_bytes() == before
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))
    proc = _cli("rewrite", str(src), "-o", str(src))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    proc = _cli("rewrite", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "x.onnx"))
    assert proc.returncode == 2 and "is not an ONNX model" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.onnx").exists()


def test_rules_verify_command_reports_and_fails_on_a_wrong_rule(tmp_path):
    from legato.core.rewrite.pattern import save_rules

    path = save_rules(tmp_path / "rules.json", [MERGE.__class__.from_json(
        {**MERGE.to_json(), "examples": [{"x": [2, 3], "w1": [3, 4], "w2": [3, 5]}]}), WRONG])
    proc = _cli("rules", "verify", str(path), "--write")
    assert proc.returncode == 1
    assert "merge-parallel-matmul: numeric passed" in proc.stdout
    assert "merge-parallel-matmul-wrong-axis: numeric failed" in proc.stdout
    stored = {r["name"]: r["verification"]["numeric"]
              for r in json.loads(path.read_text())["rules"]}
    assert stored == {"merge-parallel-matmul": "passed",
                      "merge-parallel-matmul-wrong-axis": "failed"}


def test_fold_constants_folds_the_rules_constants_and_leaves_the_users():
    """The merged weights (a Concat the rule made) become one initializer equal to the
    concatenation; a ConstantOfShape of the user's graph stays a node."""
    import numpy as np
    import onnx_ir as ir

    from legato.core.rewrite import modelio
    from legato.core.rewrite._matcher import apply, find_matches
    from legato.core.rewrite.optimize import fold_constants

    proto = _parallel(2, k=16)
    shape = onnx.numpy_helper.from_array(np.array([16, 16], np.int64), "fill_shape")
    proto.graph.initializer.append(shape)
    proto.graph.node.insert(0, onnx.helper.make_node(
        "ConstantOfShape", ["fill_shape"], ["fill"],
        value=onnx.numpy_helper.from_array(np.array([0.5], np.float32))))
    proto.graph.node.append(onnx.helper.make_node("MatMul", ["x", "fill"], ["z"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("z", 1, [1, 16]))
    prepared = modelio.prepare(proto)
    model = prepared.model
    weights = {n: ir.serde.deserialize_tensor(t).numpy() for n, t in
               ((t.name, t) for t in proto.graph.initializer)}
    apply(model.graph, find_matches(model.graph, MERGE)[0])
    assert fold_constants(model) >= 1
    ops = [n.op_type for n in model.graph]
    assert "Concat" not in ops and "ConstantOfShape" in ops
    merged = next(v for v in model.graph.initializers.values()
                  if v.const_value is not None and tuple(v.shape) == (16, 32))
    np.testing.assert_array_equal(merged.const_value.numpy(),
                                  np.concatenate([weights["w0"], weights["w1"]], axis=1))


def _plant(cache, keys, factor) -> dict:
    """Every entry of `keys` `factor` times its value, and the cold-cache penalties too (a
    price is an entry plus its weights' penalty: left alone, a penalty measured high under load
    kept the 1000x plant's original from looking free, and the guard saw no contradiction).
    Returns the planted segment entries' true values."""
    data = json.loads(cache.read_text())
    planted = {}
    for section in data["machines"].values():
        for key, entry in section["entries"].items():
            if key in keys:
                planted[key] = entry["s"]
                entry["s"] *= factor
            elif key.startswith("cold-penalty:"):
                entry["s"] *= factor
    cache.write_text(json.dumps(data))
    return planted


def _original_keys(model, cache, threads):
    from legato.core.rewrite import modelio
    from legato.core.rewrite.cost import OrtCostModel, graph_price
    from legato.core.rewrite.search import _infer_shapes

    probe = OrtCostModel(threads=threads, cache_path=cache)
    working = modelio.prepare(model).model.clone()
    _infer_shapes(working)                   # as the search prices it
    probe.bind(working)
    return set(graph_price(working.graph, probe)[2])


@pytest.mark.parametrize("factor", [1 / 3, 1 / 1000])
def test_a_cache_planted_wrong_does_not_hide_the_rewrite(tmp_path, monkeypatch, factor):
    """The demo's failure on a fresh machine: cost entries measured under load read 3x too
    low (7.0 us where the machine gives 22.7 us), so the original looks cheap and no rewrite
    lowers the predicted cost. Planted here on the demo's NasRNN cell: every entry of the
    original graph 3x too low, and 1000x (the original then looks free, whatever the cost
    model's own error). A rewrite (the merges; with a quiet machine also one Add per step)
    must still reach the guard's measurement; with the 1000x plant the guard must also see the
    contradiction, have every planted entry measured again and search again. Asserted on that,
    not on the final timing verdict, which is this machine's to make. (Whether the Add splits
    come too depends on the new entries measured under load: under make test's load the 3x
    plant left the merges alone in 1 run of 3.)"""
    from legato.demo import _nasrnn_cell

    cache = tmp_path / "costs.json"
    monkeypatch.setenv("LEGATO_COST_CACHE", str(cache))
    model = _nasrnn_cell(hidden=256, steps=3)
    _, first = optimize(model, threads=2, budget=60, time_limit_s=30)
    # with a fresh cache a rewrite reaches the guard; which one is kept is the machine's
    # verdict (a noisy A/B that contradicts the prediction searches again)
    assert any("merge-parallel-matmul-8" in c["rules_applied"] for c in first.candidates
               if c.get("measured_ms") is not None), first.explain()
    original_keys = _original_keys(model, cache, threads=2)
    planted = _plant(cache, original_keys, factor)
    assert planted and set(planted) == original_keys
    out, report = optimize(model, threads=2, budget=60, time_limit_s=30)
    measured = [c for c in report.candidates if c.get("measured_ms") is not None]
    assert any("merge-parallel-matmul-8" in c["rules_applied"] for c in measured), \
        report.explain()
    if factor < 0.01:
        assert report.remeasured > 0, report.explain()
        after = json.loads(cache.read_text())
        still = [k for s in after["machines"].values() for k, e in s["entries"].items()
                 if k in planted and e["s"] <= planted[k] * factor * 10]
        assert not still, f"{len(still)} planted entries were never measured again"
    onnx.checker.check_model(out)
