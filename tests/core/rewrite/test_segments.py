"""Segments (what onnxruntime may fuse, timed together) and the search's local pricing: a
child priced from the segments its rewrite touches costs what the whole rewritten graph costs,
and its hash is the whole graph's hash."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from legato.core.rewrite import segments as seg
from legato.core.rewrite.cost import CostModel, Price, constant_values, graph_price
from legato.core.rewrite.rules import shipped_rules
from legato.core.rewrite.search import (_materialize, _Node, _Pricer, _price, _Signer,
                                        _infer_shapes, all_matches, search)

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) / 8, name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> ir.Model:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                       for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                           for n in outputs], inits)
    proto = onnx.shape_inference.infer_shapes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    return ir.serde.deserialize_model(proto)


def _groups(model: ir.Model) -> list[list[str]]:
    view = seg.View(model.graph, constant_values(model.graph)[0])
    return sorted(sorted(n.op_type for n in part) for part in seg.all_segments(model.graph, view))


def test_conv_batchnorm_relu_is_one_segment_and_constants_are_none():
    m = _model([helper.make_node("Concat", ["w1", "w2"], ["w"], axis=0),     # constant: folded
                helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
                helper.make_node("Relu", ["n"], ["y"])],
               [("x", [1, 3, 8, 8])], ["y"],
               [_w("w1", 2, 3, 3, 3), _w("w2", 2, 3, 3, 3), _w("s", 4), _w("b", 4), _w("m", 4),
                numpy_helper.from_array(np.ones(4, np.float32), "v")])
    assert _groups(m) == [["BatchNormalization", "Conv", "Relu"]]


def test_a_heavy_output_read_twice_does_not_fuse():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["a"]),
                helper.make_node("Add", ["a", "b"], ["y1"]),
                helper.make_node("Relu", ["a"], ["y2"])],
               [("x", [2, 8])], ["y1", "y2"], [_w("w", 8, 8), _w("b", 8)])
    assert _groups(m) == [["Add"], ["MatMul"], ["Relu"]]


def test_decomposed_layernorm_is_one_segment():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]),
             helper.make_node("Sub", ["h", "mu"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["y"])]
    m = _model(nodes, [("x", [4, 16])], ["y"],
               [_w("w", 16, 16), numpy_helper.from_array(np.float32([1e-5]), "eps")], opset=13)
    # the MatMul's output is read by ReduceMean and Sub: not fusable into it
    assert _groups(m) == sorted([["MatMul"], sorted(n.op_type for n in nodes[1:])])


def test_an_oversized_component_is_cut_into_heavy_chains(monkeypatch):
    monkeypatch.setattr(seg, "MAX_SEGMENT", 4)
    nodes, inits, prev = [], [], "x"
    for i in range(3):                     # three MatMul -> Add -> Tanh, joined by Adds
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Tanh", [f"a{i}"], [f"t{i}"])]
        inits += [_w(f"w{i}", 8, 8), _w(f"b{i}", 8)]
    nodes += [helper.make_node("Add", ["t0", "t1"], ["s"]),
              helper.make_node("Add", ["s", "t2"], ["y"])]
    groups = _groups(_model(nodes, [("x", [1, 8])], ["y"], inits))
    # chains of at most CHAIN (4) nodes, each follower reading the one before as its first
    # non-constant input: the first chain takes the Add that joins t0 and t1
    assert groups == [["Add"], ["Add", "Add", "MatMul", "Tanh"], ["Add", "MatMul", "Tanh"],
                      ["Add", "MatMul", "Tanh"]]
    assert sum(len(g) for g in groups) == len(nodes)


def test_describe_is_canonical_names_do_not_matter():
    a = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Relu", ["h"], ["y"])], [("x", [2, 8])], ["y"], [_w("w", 8, 8)])
    b = _model([helper.make_node("MatMul", ["in", "k"], ["z"], name="mm"),
                helper.make_node("Relu", ["z"], ["out"])], [("in", [2, 8])], ["out"],
               [_w("k", 8, 8)])
    c = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Relu", ["h"], ["y"])], [("x", [3, 8])], ["y"], [_w("w", 8, 8)])

    def key(m):
        view = seg.View(m.graph, constant_values(m.graph)[0])
        (part,) = seg.all_segments(m.graph, view)
        spec = seg.describe(part, view, opsets={"": 17})
        assert spec.model is not None and spec.why_untimed == ""
        onnx.checker.check_model(spec.model)
        return spec.key

    assert key(a) == key(b) != key(c)


class Composite(CostModel):
    """A deterministic cost that depends on how nodes are grouped: each segment costs a
    number drawn from its operators and shapes, so a wrong segment shows as a wrong sum."""

    fuses = True

    def ticket(self, nodes, view):
        text = repr(sorted((n.op_type, tuple(str(d) for d in (n.outputs[0].shape or ())))
                           for n in nodes))
        h = int(hashlib.sha1(text.encode()).hexdigest()[:6], 16)
        return Price(1e-6 * (1 + h % 997), 0.0, None)


def _zoo(name: str) -> onnx.ModelProto:
    data = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return onnx.load(str(data / f"light_{name}.onnx"))


@pytest.mark.parametrize("name", ["inception_v1", "inception_v2", "resnet50"])
def test_children_priced_locally_cost_what_the_whole_graph_costs(name):
    model = ir.serde.deserialize_model(_zoo(name))
    _infer_shapes(model)
    cm = Composite()
    root_cost = graph_price(model.graph, cm)[0]
    root = _Node(root_cost, 0.0, [], _Signer(model.graph).total(), model=model)
    matches = all_matches(model.graph, shipped_rules(), limit=8)
    assert matches, "the check needs rules that match"
    pricer = _Pricer(model, cm)
    trials = [t for t in (pricer.trial(m) for m in matches) if t is not None]
    _price(trials, cm)
    before = _Signer(model.graph).total()
    for t in trials[:12]:
        child = _Node(root_cost + t.delta, 0.0, [t.match.rule.name],
                      (root.hash + t.hash_delta) & ((1 << 64) - 1), parent=root,
                      matches=[t.match])
        materialized = _materialize(child)
        assert graph_price(materialized.graph, cm)[0] == pytest.approx(child.cost, abs=1e-12)
        assert _Signer(materialized.graph).total() == child.hash
    assert _Signer(model.graph).total() == before          # every trial was undone
    assert graph_price(model.graph, cm)[0] == root_cost


def test_search_on_a_large_model_applies_its_batches_consistently():
    model = ir.serde.deserialize_model(_zoo("densenet121"))
    result = search(model, shipped_rules(), Composite(), budget=6, time_limit_s=300)
    assert result.explored <= 6 and result.generated > 0
    assert graph_price(result.model.graph, Composite())[0] == pytest.approx(result.cost,
                                                                            abs=1e-12)
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
