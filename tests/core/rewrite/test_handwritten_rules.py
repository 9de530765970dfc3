"""The shipped hand-written rules (rules/handwritten.json): each verified, each applied by the
search to a real ONNX graph with onnxruntime computing the same outputs, and wrong variants
of them rejected by both checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import ShapeInferencePass

from legato.core.rewrite import _opkernels
from legato.core.rewrite._matcher import apply, build_target, find_matches, target_fits_opset
from legato.core.rewrite.cost import AnalyticCostModel
from legato.core.rewrite.explain import explain_rule
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


# ---- LRN as a banded 1x1 Conv (issue 15, item 8) ---------------------------------------------

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LRN_RULE = HAND["lrn-as-conv-sqrt"]


def _lrn_model(shape, dtype=TensorProto.FLOAT, **attrs):
    x = helper.make_tensor_value_info("x", dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, None)
    return _model([helper.make_node("LRN", ["x"], ["y"], **attrs)], [x], [y])


def _apply_everywhere(model: ir.Model, rule: Rule) -> int:
    applied = 0
    while matches := find_matches(model.graph, rule, limit=1):
        apply(model.graph, matches[0])
        applied += 1
    return applied


@pytest.mark.parametrize("name", ["bvlc_alexnet", "inception_v1", "zfnet512"])
def test_lrn_becomes_a_banded_conv_in_the_light_cnns(name):
    """The LRNs of onnx's AlexNet, Inception v1 and ZFNet (opset 9, IR 3) are matched and
    rewritten; onnxruntime gives the same LRN outputs. (The models' own outputs are a flat
    softmax, since their weights are constants, so the LRN outputs are compared.)"""
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx package")
    proto = onnx.load(str(path))
    lrns = [n for n in proto.graph.node if n.op_type == "LRN"]
    assert len(lrns) == 2
    for n in lrns:          # graph outputs keep their names through the rewrite
        proto.graph.output.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT,
                                                                None))
    model = ir.serde.deserialize_model(proto)
    ShapeInferencePass(strict_mode=False)(model)
    assert sorted(m.nodes["y"].name for m in find_matches(model.graph, LRN_RULE)) == \
        sorted(n.name for n in lrns)
    assert target_fits_opset(LRN_RULE, model.opset_imports[""])
    assert _apply_everywhere(model, LRN_RULE) == 2
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    assert "LRN" not in {n.op_type for n in out.graph.node}
    graph_inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(0)
    feed = {i.name: rng.normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in proto.graph.input if i.name in graph_inputs}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    run = lambda p: ort.InferenceSession(  # noqa: E731
        p.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)
    want, got = run(proto), run(out)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert max(float(np.std(a)) for a in want[1:]) > 0.1     # the LRN outputs are not flat


@pytest.mark.parametrize("shape,attrs", [
    ((1, 16, 6, 6), {"size": 5, "alpha": 1e-4, "bias": 1.0}),
    ((2, 3, 4, 5), {"size": 5, "alpha": 0.5, "bias": 2.0, "beta": 0.75}),   # C < size
    ((1, 9, 7, 7), {"size": 3, "alpha": 2.0}),
    ((1, 8, 3, 3), {"size": 1}),
])
def test_the_lrn_rule_keeps_onnxruntime_outputs(shape, attrs):
    proto = _lrn_model(list(shape), **attrs)
    model = ir.serde.deserialize_model(proto)
    assert _apply_everywhere(model, LRN_RULE) == 1
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    assert sorted(n.op_type for n in out.graph.node) == \
        ["Add", "Constant", "Constant", "Conv", "Div", "Mul", "Mul", "Sqrt", "Sqrt"]
    bias, band = sorted((numpy_helper.to_array(n.attribute[0].t) for n in out.graph.node
                         if n.op_type == "Constant"), key=np.ndim)
    assert bias.shape == () and bias == np.float32(attrs.get("bias", 1.0))
    assert band.dtype == np.float32 and band.shape == (shape[1], shape[1], 1, 1)
    feed = {"x": np.random.default_rng(1).normal(size=shape).astype(np.float32) * 3}
    run = lambda p: ort.InferenceSession(  # noqa: E731
        p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(run(out), run(proto), rtol=1e-5, atol=1e-6)


def test_a_rank3_lrn_gets_a_rank3_band():
    """onnxruntime's LRN takes rank 4 only; the rule follows ONNX's definition for any rank
    >= 3 (checked in float64 by its record), and the band has one 1 per spatial axis."""
    model = ir.serde.deserialize_model(_lrn_model([2, 6, 7], size=3))
    match, = find_matches(model.graph, LRN_RULE)
    nodes, _, _ = build_target(match)
    band, = [n.attributes["value"].value.numpy() for n in nodes
             if n.op_type == "Constant" and n.attributes["value"].value.shape.rank() > 0]
    assert band.shape == (6, 6, 1) and band.dtype == np.float32
    assert np.count_nonzero(band[:, :, 0]) == 6 * 3 - 2          # the window clipped at 0, C-1


def test_lrn_is_left_alone_where_the_rule_was_not_verified():
    """beta other than 0.75 (x^beta is then not sqrt(x) * sqrt(sqrt(x))), an unknown channel
    count (the band needs it), rank 2 (no Conv) and float16 (the bias constant is float32)."""
    for proto, why in [
            (_lrn_model([1, 8, 5, 5], size=5, beta=0.5), "attribute beta=0.5"),
            (_lrn_model([1, "C", 5, 5], size=5), "static_dim(x, 1)"),
            (_lrn_model([4, 8], size=3), "min_rank(x, 3)"),
            (_lrn_model([1, 8, 5, 5], TensorProto.FLOAT16, size=5), "dtype(x, FLOAT)")]:
        model = ir.serde.deserialize_model(proto)
        assert find_matches(model.graph, LRN_RULE) == []
        result = explain_rule(model.graph, LRN_RULE)
        assert not result and why in result.reason, result.reason


def _lrn_variant(size: int, band_size: int, band_alpha: float) -> Rule:
    """The LRN rule for one size and alpha = size * 1e-4, whose band is built for another
    size with the same alpha / size: only the window differs."""
    d = LRN_RULE.to_json()
    d["name"] = f"lrn-{size}-as-band-{band_size}"
    d.pop("verification")
    d["source"]["nodes"][0]["attrs"].update(size=size, alpha=size * 1e-4)
    for nd in d["target"]["nodes"]:
        if nd["id"] == "w":
            nd["attrs"]["value"] = {"band": ["x", band_size, band_alpha]}
    d["examples"] = [{k: v for k, v in ex.items() if k not in ("$size", "$alpha")}
                     for ex in d["examples"]]
    return Rule.from_json(d)


def test_a_band_off_by_one_is_rejected_by_both_checks():
    good = _lrn_variant(4, 4, 4e-4)
    assert verify_numeric(good)["numeric"] == "passed"
    assert prove_rule(good)["z3"] == "proved"
    for wrong in (_lrn_variant(4, 5, 5e-4), _lrn_variant(4, 3, 3e-4), _lrn_variant(5, 6, 6e-4)):
        assert verify_numeric(wrong)["numeric"] == "failed", wrong.name
        assert prove_rule(wrong)["z3"] in ("refuted", "unknown"), wrong.name


def test_a_band_with_floor_and_ceil_swapped_fails_numeric_verification(monkeypatch):
    """The window c - floor((size-1)/2) .. c + ceil((size-1)/2) mirrored: the same for odd
    sizes, wrong for even ones, which the rule's examples include."""
    def mirrored(channels, size, alpha, spatial_rank):
        w = correct(channels, size, alpha, spatial_rank)
        return w[::-1, ::-1].copy()
    correct = _opkernels.lrn_band
    assert verify_numeric(LRN_RULE)["numeric"] == "passed"
    monkeypatch.setattr(_opkernels, "lrn_band", mirrored)
    record = verify_numeric(LRN_RULE)
    assert record["numeric"] == "failed", record
    assert "(1, 7, 3, 4)" in record["detail"], record       # the first example with size 4
