"""Rule families (legato/core/rewrite/rules/families.py): the shipped file matches its builder,
every member is verified, ordered roots match a set of branches once, and the search merges k
branches in one step and then adds the merged halves of `x W_i + h U_i` with one Add."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from legato.core.rewrite._matcher import find_matches
from legato.core.rewrite.cost import AnalyticCostModel
from legato.core.rewrite.pattern import load_rules
from legato.core.rewrite.rules import shipped_rules
from legato.core.rewrite.rules.families import MAX_ARITY, MERGES_FILE, family_rules
from legato.core.rewrite.search import all_matches, search

ort = pytest.importorskip("onnxruntime")

RULES = {r.name: r for r in shipped_rules()}


def test_the_shipped_file_is_what_the_builder_makes_and_every_member_is_verified():
    stored = load_rules(MERGES_FILE)
    built = family_rules()
    strip = lambda r: {k: v for k, v in r.to_json().items() if k != "verification"}  # noqa: E731
    assert [strip(r) for r in stored] == [strip(r) for r in built], \
        "merges.json is stale: run python -m legato.core.rewrite.rules.families, then " \
        "legato rules verify legato/core/rewrite/rules/merges.json --write"
    for r in stored:
        assert r.verified, (r.name, r.status)
    assert len(stored) == 5 * (MAX_ARITY - 1)


def _affine(n: int, k: int = 8, batch: int = 1, extra_consumer: bool = False) -> onnx.ModelProto:
    """y_i = tanh(x W_i + h U_i) for i < n (NasRNN's gates); optionally one more MatMul of x
    with a weight of another row count, which no merge may take."""
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [batch, k]) for v in "xh"]
    inits, nodes = [], []
    for i in range(n):
        for v in "xh":
            inits.append(numpy_helper.from_array(
                rng.normal(size=(k, k)).astype(np.float32), f"w{v}{i}"))
            nodes.append(helper.make_node("MatMul", [v, f"w{v}{i}"], [f"m{v}{i}"]))
        nodes += [helper.make_node("Add", [f"mx{i}", f"mh{i}"], [f"s{i}"]),
                  helper.make_node("Tanh", [f"s{i}"], [f"y{i}"])]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n)]
    if extra_consumer:
        inits.append(numpy_helper.from_array(np.ones((k + 1, 3), np.float32), "odd"))
        nodes.append(helper.make_node("MatMul", ["x", "odd"], ["z"]))
        inputs[0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", inputs, outs, inits)
    return onnx.shape_inference.infer_shapes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_ordered_roots_match_each_set_of_branches_once():
    graph = ir.serde.deserialize_model(_affine(4)).graph
    # 4 MatMuls of x and 4 of h: one 4-way match each, not 4! orderings
    assert len(find_matches(graph, RULES["merge-parallel-matmul-4"])) == 2
    assert len(find_matches(graph, RULES["merge-parallel-matmul-3"])) == 2 * 4  # C(4, 3) each
    assert len(find_matches(graph, RULES["merge-parallel-matmul"])) == 2 * 6   # C(4, 2) each


def test_the_search_expands_only_a_familys_largest_matches():
    graph = ir.serde.deserialize_model(_affine(4)).graph
    matmul = [r for r in shipped_rules() if r.family == "merge-parallel-matmul"]
    found = all_matches(graph, matmul)
    assert [m.rule.name for m in found] == ["merge-parallel-matmul-4"] * 2


class PerOp(AnalyticCostModel):
    """Every operator costs 1 (a launch-bound device): fewer nodes are cheaper."""

    def node_cost(self, node, constants=None):
        return 0.0 if node.op_type == "Constant" else 1.0


@pytest.mark.parametrize("n", [3, 8])
def test_search_merges_k_branches_in_one_step_then_adds_once(n):
    proto = _affine(n)
    result = search(ir.serde.deserialize_model(proto), shipped_rules(), PerOp(), alpha=1.0)
    suffix = "" if n == 2 else f"-{n}"
    assert sorted(result.applied) == sorted([f"merge-parallel-matmul{suffix}"] * 2
                                            + [f"add-split{suffix}"])
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    ops = [nd.op_type for nd in out.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Add") == 1 and ops.count("Split") == 1
    rng = np.random.default_rng(1)
    feed = {v: rng.normal(size=(1, 8)).astype(np.float32) for v in "xh"}
    run = lambda p: ort.InferenceSession(  # noqa: E731
        p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(run(proto), run(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_branch_that_does_not_fit_is_left_alone():
    proto = _affine(3, extra_consumer=True)
    result = search(ir.serde.deserialize_model(proto), shipped_rules(), PerOp(), alpha=1.0)
    out = ir.serde.serialize_model(result.model)
    odd = [nd for nd in out.graph.node if nd.op_type == "MatMul" and "odd" in nd.input]
    assert len(odd) == 1 and "merge-parallel-matmul-3" in result.applied


def test_merged_convs_keep_one_relu_for_onnxruntime_to_fuse():
    """Three Conv+Relu branches of one input: merged, then relu-split puts one Relu right after
    the merged Conv (where onnxruntime fuses it) instead of three after the Split."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for i, c in enumerate((4, 2, 3)):
        w = rng.normal(size=(c, 3, 1, 1)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(size=c).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"c{i}"]),
                  helper.make_node("Relu", [f"c{i}"], [f"y{i}"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 3, 6, 6])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None)
                           for i in range(3)], inits)
    proto = onnx.shape_inference.infer_shapes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    result = search(ir.serde.deserialize_model(proto), shipped_rules(), PerOp(), alpha=1.0)
    assert sorted(result.applied) == ["merge-parallel-conv-3", "relu-split-3"]
    out = ir.serde.serialize_model(result.model)
    assert [nd.op_type for nd in out.graph.node if nd.op_type != "Constant"] == \
        ["Concat", "Concat", "Conv", "Relu", "Split"]
    feed = {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)}
    run = lambda p: ort.InferenceSession(  # noqa: E731
        p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(run(proto), run(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
