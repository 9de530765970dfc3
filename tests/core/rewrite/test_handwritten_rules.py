"""The shipped hand-written rules (rules/handwritten.json): each verified, each applied by the
search to a real ONNX graph with onnxruntime computing the same outputs, and wrong variants
of them rejected by both checks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from legato.core.rewrite.cost import AnalyticCostModel
from legato.core.rewrite.optimize import fold_constants
from legato.core.rewrite.pattern import Rule, load_rules
from legato.core.rewrite.prove import prove_rule
from legato.core.rewrite.rules import RULES_DIR, shipped_rules
from legato.core.rewrite.search import search
from legato.core.rewrite.verify import verify_numeric

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("z3")

HAND = {r.name: r for r in load_rules(RULES_DIR / "handwritten.json")}


class PerOp(AnalyticCostModel):
    """Every operator but Constant and Identity costs 1: fewer operators are cheaper."""

    def node_cost(self, node, constants=None):
        return 0.0 if node.op_type in ("Constant", "Identity") else 1.0


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return onnx.shape_inference.infer_shapes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _rewrite_and_compare(proto, feed):
    result = search(ir.serde.deserialize_model(proto), list(HAND.values()), PerOp(), alpha=1.0)
    fold_constants(result.model)
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    run = lambda p: ort.InferenceSession(  # noqa: E731
        p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(run(proto), run(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return result, [n.op_type for n in out.graph.node]


@pytest.mark.parametrize("name", sorted(HAND))
def test_every_hand_written_rule_is_verified(name):
    assert HAND[name].verified, HAND[name].status


def test_transpose_chains_collapse_and_cancel():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[0, 1, 3, 2]),   # BERT's k^T
             helper.make_node("Transpose", ["x"], ["u"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["u"], ["v"], perm=[0, 3, 1, 2]),   # inverse
             helper.make_node("Relu", ["v"], ["z"])]
    feed = {"x": np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)}
    result, ops = _rewrite_and_compare(_model(nodes, [x], [y, z]), feed)
    assert ops.count("Transpose") == 1, ops
    assert "transpose-transpose" in result.applied and "transpose-identity-4d" in result.applied


def test_scalars_fold_into_matmul_and_conv_weights():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0.5, np.float32), "s"),
             numpy_helper.from_array(np.array(-2.0, np.float32), "r"),
             numpy_helper.from_array(rng.normal(size=(2, 3, 3, 3)).astype(np.float32), "k")]
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]),
             helper.make_node("MatMul", ["xs", "w"], ["m"]),
             helper.make_node("Mul", ["m", "r"], ["y"]),
             helper.make_node("Conv", ["img", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["z"])]
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6]),
                           helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 5, 5])],
                   [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in "yz"],
                   inits)
    feed = {"x": rng.normal(size=(3, 6)).astype(np.float32),
            "img": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)}
    result, ops = _rewrite_and_compare(proto, feed)
    assert sorted(ops) == ["Conv", "MatMul"], ops
    assert {"scalar-before-matmul-into-weight", "scalar-after-matmul-into-weight",
            "scalar-after-conv-into-weight"} <= set(result.applied)


def test_a_scalar_that_is_not_a_scalar_is_left_alone():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "v")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Mul", ["m", "v"], ["y"])]     # per-column scale: rank 1
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = search(ir.serde.deserialize_model(proto), shipped_rules(), PerOp(), alpha=1.0)
    assert result.applied == []


def _variant(name: str, edit) -> Rule:
    d = HAND[name].to_json()
    d["name"] = name + "-wrong"
    d.pop("verification")
    edit(d)
    return Rule.from_json(d)


def test_wrong_variants_are_rejected_by_both_checks():
    def swap_compose(d):
        d["target"]["nodes"][0]["attrs"]["perm"] = {"compose": ["$q", "$p"]}

    def drop_scalar_precondition(d):
        d["preconditions"] = [p for p in d["preconditions"] if "rank" not in p]
        d["examples"] = [{"x": [2, 3], "w": [3, 3], "s": [3]}]   # W * s scales the wrong axis

    for rule in (_variant("transpose-transpose", swap_compose),
                 _variant("scalar-before-matmul-into-weight", drop_scalar_precondition)):
        assert prove_rule(rule)["z3"] in ("refuted", "unknown"), rule.name
        assert verify_numeric(rule)["numeric"] == "failed", rule.name


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folds_into_the_conv_before_it(bias):
    rng = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(rng.normal(size=(c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "s"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 2, size=c).astype(np.float32), "v")]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "c"))
    nodes = [helper.make_node("Conv", ["x", "w", "c"] if bias else ["x", "w"], ["y0"],
                              pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["y0", "s", "b", "m", "v"], ["y"],
                              epsilon=1e-3, momentum=0.9)]
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 9])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    feed = {"x": rng.normal(size=(2, 3, 9, 9)).astype(np.float32)}
    result, ops = _rewrite_and_compare(proto, feed)
    assert ops == ["Conv"], ops
    assert result.applied == ["fold-conv-batchnorm" + ("" if bias else "-nobias")]


def test_a_wrong_batchnorm_fold_and_a_wrong_axiom_are_rejected():
    from legato.core.rewrite import axioms as A

    def mean_minus_bias(d):
        for nd in d["target"]["nodes"]:
            if nd["op"] == "Sub":
                nd["inputs"] = ["m", "c"]

    wrong = _variant("fold-conv-batchnorm", mean_minus_bias)
    assert prove_rule(wrong)["z3"] in ("refuted", "unknown")
    assert verify_numeric(wrong)["numeric"] == "failed"
    good = A.get_axiom("convb-mul-chan")
    lhs, rhs = good.concl.args
    # the weights scaled by a vector shaped for the output (one axis short) are wrong
    bad_rhs = A.mk(rhs.op, *rhs.args[:3], A.mul(rhs.args[3].args[0],
                                                A.chan(rhs.args[3].args[1].args[0],
                                                       A.rank(A.x) - 2)), rhs.args[4])
    bad = A.Axiom("convb-mul-chan-short", A.mk("==", lhs, bad_rhs), good.hyps, good.trigger,
                  good.examples)
    assert not A.validate_axiom(bad)["ok"]
