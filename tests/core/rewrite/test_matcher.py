"""Rule patterns found and replaced in onnx-ir graphs; outputs checked with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from legato.core.rewrite._matcher import apply, find_matches
from _rule_fixtures import TRANSPOSE_PAIR  # beside this file
from legato.core.rewrite.pattern import Rule, RuleError, load_rules, save_rules

ort = pytest.importorskip("onnxruntime")



def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(m)


def _run(model: onnx.ModelProto, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _relu_sigmoid_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),
             helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Relu", ["a"], ["y1"]),
             helper.make_node("Sigmoid", ["b"], ["y2"])]
    return _model(nodes, [x], [y1, y2], [w1, w2])


MERGE = {
    "name": "merge-parallel-matmul-relu-sigmoid",
    "source": {"inputs": ["x", "w1", "w2"],
               "nodes": [{"id": "a", "op": "MatMul", "inputs": ["x", "w1"]},
                         {"id": "b", "op": "MatMul", "inputs": ["x", "w2"]}],
               "outputs": ["a", "b"]},
    "target": {"inputs": ["x", "w1", "w2"],
               "nodes": [{"id": "w", "op": "Concat", "inputs": ["w1", "w2"],
                          "attrs": {"axis": 1}},
                         {"id": "m", "op": "MatMul", "inputs": ["x", "w"]},
                         {"id": "s", "op": "Split", "inputs": ["m"], "outputs": 2,
                          "attrs": {"axis": -1, "num_outputs": 2}}],
               "outputs": ["s:0", "s:1"]},
    "preconditions": [{"constant": "w1"}, {"constant": "w2"}, {"rank": ["w1", 2]},
                      {"same_shape": ["w1", "w2"]}],
}


def test_single_root_rule_rewrites_and_keeps_outputs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
             helper.make_node("Relu", ["t2"], ["y"])]
    proto = _model(nodes, [x], [y], [])
    model = ir.serde.deserialize_model(proto)
    rule = Rule.from_json(TRANSPOSE_PAIR)
    matches = find_matches(model.graph, rule)
    assert len(matches) == 1
    apply(model.graph, matches[0])
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert out.graph.output[0].name == "y"
    feed = {"x": np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)}
    np.testing.assert_array_equal(_run(proto, feed)[0], _run(out, feed)[0])


def test_attribute_mismatch_and_outside_uses_block_a_match():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 3])
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
             helper.make_node("Relu", ["t2"], ["y"]),
             helper.make_node("Sigmoid", ["t1"], ["z"])]      # t1 is used outside the match
    model = ir.serde.deserialize_model(_model(nodes, [x], [y, z], []))
    assert find_matches(model.graph, Rule.from_json(TRANSPOSE_PAIR)) == []


def test_multi_root_rule_merges_parallel_branches():
    proto = _relu_sigmoid_model()
    model = ir.serde.deserialize_model(proto)
    rule = Rule.from_json(MERGE)
    # w1 (8x4) and w2 (8x6) differ: the precondition refuses
    assert find_matches(model.graph, rule) == []
    loose = Rule.from_json({**MERGE, "preconditions": [{"constant": "w1"},
                                                       {"constant": "w2"}],
                            "target": {**MERGE["target"], "nodes": [
                                MERGE["target"]["nodes"][0], MERGE["target"]["nodes"][1],
                                {"id": "sizes", "op": "Constant", "inputs": [],
                                 "attrs": {"value_ints": [{"dim": ["w1", -1]},
                                                          {"dim": ["w2", -1]}]}},
                                {"id": "s", "op": "Split", "inputs": ["m", "sizes"],
                                 "outputs": 2, "attrs": {"axis": -1}}]}})
    matches = find_matches(model.graph, loose)
    assert len(matches) == 1
    apply(model.graph, matches[0])
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    ops = sorted(n.op_type for n in out.graph.node)
    assert ops.count("MatMul") == 1 and "Split" in ops
    feed = {"x": np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)}
    for a, b in zip(_run(proto, feed), _run(out, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rule_files_round_trip_and_bad_rules_are_named(tmp_path):
    rules = [Rule.from_json(TRANSPOSE_PAIR), Rule.from_json(MERGE)]
    path = save_rules(tmp_path / "rules.json", rules)
    assert load_rules(path) == rules
    with pytest.raises(RuleError, match="kebab-case"):
        Rule.from_json({**TRANSPOSE_PAIR, "name": "Bad Name"})
    with pytest.raises(RuleError, match="neither a pattern variable nor an earlier node"):
        Rule.from_json({**TRANSPOSE_PAIR, "target": {
            "inputs": ["x"], "nodes": [{"id": "r", "op": "Relu", "inputs": ["q"]}],
            "outputs": ["r"]}})
    with pytest.raises(RuleError, match="not bound by the source"):
        Rule.from_json({**TRANSPOSE_PAIR, "target": {
            "inputs": ["x", "y"], "nodes": [{"id": "r", "op": "Add", "inputs": ["x", "y"]}],
            "outputs": ["r"]}})
    with pytest.raises(RuleError, match="unknown precondition"):
        Rule.from_json({**TRANSPOSE_PAIR, "preconditions": [{"fast": "x"}]})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RuleError, match="is not JSON"):
        load_rules(tmp_path / "bad.json")


LRN_BAND = {
    "name": "lrn-band",
    "source": {"inputs": ["x"],
               "nodes": [{"id": "y", "op": "LRN", "inputs": ["x"],
                          "attrs": {"alpha": "$a", "size": "$n"}}],
               "outputs": ["y"]},
    "target": {"inputs": ["x"],
               "nodes": [{"id": "w", "op": "Constant", "inputs": [],
                          "attrs": {"value": {"band": ["x", "$n", "$a"]}}},
                         {"id": "y", "op": "Conv", "inputs": ["x", "w"]}],
               "outputs": ["y"]},
    "preconditions": [{"min_rank": ["x", 3]}, {"static_dim": ["x", 1]}],
}


def _with_target_attr(value, op="Constant", attr="value"):
    d = {**LRN_BAND, "target": {**LRN_BAND["target"], "nodes": [
        {"id": "w", "op": op, "inputs": [], "attrs": {attr: value}},
        {"id": "y", "op": "Conv", "inputs": ["x", "w"]}]}}
    return Rule.from_json(d)


def test_a_band_round_trips_and_is_checked_when_a_rule_is_read(tmp_path):
    rule = Rule.from_json(LRN_BAND)
    assert load_rules(save_rules(tmp_path / "r.json", [rule])) == [rule]
    assert rule.target.node("w").attributes == {"value": {"band": ["x", "$n", "$a"]}}
    assert _with_target_attr({"band": ["x", 3, 1e-4]}).name == "lrn-band"   # numbers are fine
    for value, why in [({"band": ["q", "$n", "$a"]}, "a source variable first"),
                       ({"band": ["x", "$n"]}, r"band takes \[variable, size, alpha\]"),
                       ({"band": ["x", "$m", "$a"]}, r"\$m is not bound"),
                       ({"band": ["x", 0, "$a"]}, "size >= 1"),
                       ({"band": ["x", "$n", "big"]}, "numbers"),
                       ({"bands": ["x", "$n", "$a"]}, "not a derived value"),
                       ({"dim": ["q", 1]}, "dim takes"),
                       ("$zz", r"\$zz is not bound")]:
        with pytest.raises(RuleError, match=why):
            _with_target_attr(value)
    with pytest.raises(RuleError, match="only be a Constant's value"):
        _with_target_attr({"band": ["x", "$n", "$a"]}, op="Identity", attr="perm")


def test_band_preconditions_need_the_rank_and_the_channels():
    rule = Rule.from_json(LRN_BAND)
    for shape, matches in (([1, 4, 5, 5], 1), ([2, 4, 6], 1), ([1, "C", 5, 5], 0), ([4, 8], 0),
                           (None, 0)):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
        proto = _model([helper.make_node("LRN", ["x"], ["y"], size=3)], [x],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [])
        assert len(find_matches(ir.serde.deserialize_model(proto).graph, rule)) == matches, shape


def test_is_constant_agrees_with_constant_values_on_deep_and_branched_constants():
    """A chain of 300 constant nodes (deeper than the old recursion limit of 64) and a ladder
    of 60 diamonds (2**60 paths for a walk without memory): both constant, answered at once,
    the same as cost.constant_values, and a graph input anywhere makes them not constant."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from legato.core.rewrite._matcher import is_constant
    from legato.core.rewrite.cost import constant_values

    def graph(source: str):
        nodes, prev = [], source
        for i in range(300):
            nodes.append(helper.make_node("Neg", [prev], [f"c{i}"]))
            prev = f"c{i}"
        for i in range(60):
            nodes += [helper.make_node("Relu", [prev], [f"l{i}"]),
                      helper.make_node("Neg", [prev], [f"r{i}"]),
                      helper.make_node("Add", [f"l{i}", f"r{i}"], [f"d{i}"])]
            prev = f"d{i}"
        nodes.append(helper.make_node("Add", ["x", prev], ["y"]))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])
                                           for n in ("x", "w")[:1 + (source == "w")]],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [] if source == "w" else
                              [numpy_helper.from_array(np.ones(2, np.float32), "k")])
        return ir.serde.deserialize_model(helper.make_model(
            g, opset_imports=[helper.make_opsetid("", 17)])).graph

    g = graph("k")
    last = next(n for n in g if n.op_type == "Add" and n.outputs[0].name == "y").inputs[1]
    consts = constant_values(g)[0]
    assert is_constant(last) and id(last) in consts
    assert all(is_constant(o) == (id(o) in consts) for n in g for o in n.outputs)
    g = graph("w")                                   # the chain starts at a graph input
    last = next(n for n in g if n.outputs[0].name == "y").inputs[1]
    assert not is_constant(last) and id(last) not in constant_values(g)[0]
