"""Cost models and TASO's backtracking search on small ONNX graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from legato.core.rewrite.cost import AnalyticCostModel, OrtCostModel, foldable, graph_cost
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.rules.families import merge_matmul
from legato.core.rewrite.search import search, structural_hash
from legato.core.stop import StopReason

ort = pytest.importorskip("onnxruntime")

# the shipped two-branch merge, as its builder makes it (unverified here)
MERGE = Rule.from_json(merge_matmul(2))


def _parallel(n: int = 3, k: int = 16, batch: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n)]
    inits = [numpy_helper.from_array(rng.normal(size=(k, k)).astype(np.float32), f"w{i}")
             for i in range(n)]
    nodes = ([helper.make_node("MatMul", ["x", f"w{i}"], [f"a{i}"]) for i in range(n)]
             + [helper.make_node("Tanh", [f"a{i}"], [f"y{i}"]) for i in range(n)])
    g = helper.make_graph(nodes, "g", [x], outs, inits)
    return onnx.shape_inference.infer_shapes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _run(proto, feed):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


class PerOp(AnalyticCostModel):
    """A launch-bound device: every MatMul costs 1, a Split 0.1, the rest nothing."""

    def node_cost(self, node, constants=None):
        return {"MatMul": 1.0, "Split": 0.1}.get(node.op_type, 0.0)


def test_search_merges_parallel_matmuls_when_it_pays():
    proto = _parallel()
    result = search(ir.serde.deserialize_model(proto), [MERGE], PerOp())
    assert result.cost < result.original_cost
    assert result.applied == ["merge-parallel-matmul", "merge-parallel-matmul"]
    assert result.stop_reason is StopReason.EXHAUSTED and result.explored >= 2
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node].count("MatMul") == 1
    feed = {"x": np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)}
    for a, b in zip(_run(proto, feed), _run(out, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_search_keeps_the_original_when_nothing_is_cheaper():
    class Flat(AnalyticCostModel):       # every node costs the same: merging adds a Split
        def node_cost(self, node, constants=None):
            return 1.0 if node.op_type != "Split" else 5.0

    result = search(ir.serde.deserialize_model(_parallel(2)), [MERGE], Flat())
    assert result.applied == [] and result.cost == result.original_cost


def test_budget_and_time_limit_stop_the_search():
    model = ir.serde.deserialize_model(_parallel(4))
    assert search(model, [MERGE], PerOp(), budget=1).stop_reason is StopReason.BUDGET
    assert search(model, [MERGE], PerOp(), time_limit_s=0.0).stop_reason is \
        StopReason.TIME_LIMIT
    assert search(model, [MERGE], PerOp()).stop_reason is StopReason.EXHAUSTED


def test_structural_hash_ignores_names_not_structure():
    a = ir.serde.deserialize_model(_parallel(2))
    b = ir.serde.deserialize_model(_parallel(2))
    for v in b.graph.inputs:
        v.name = "renamed"
    assert structural_hash(a.graph) == structural_hash(b.graph)
    c = ir.serde.deserialize_model(_parallel(3))
    assert structural_hash(a.graph) != structural_hash(c.graph)


def test_constant_subgraphs_are_free_and_dynamic_shapes_fall_back():
    proto = _parallel(2)
    model = ir.serde.deserialize_model(proto)
    from legato.core.rewrite._matcher import apply, find_matches

    apply(model.graph, find_matches(model.graph, MERGE)[0])
    names = {id(n): n.op_type for n in model.graph}
    assert sorted(names[i] for i in foldable(model.graph)) == ["Concat", "Constant"]
    x = model.graph.inputs[0]
    x.shape = ir.Shape(["batch", 16])
    cm = OrtCostModel(cache_path=None, repeats=1)
    node = next(n for n in model.graph if n.op_type == "MatMul")
    assert cm.node_cost(node) > 0 and cm.estimated == 1
