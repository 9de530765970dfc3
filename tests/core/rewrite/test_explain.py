"""Why a rule does not match: each kind of failure with its reason, the closest near-miss of
every shipped rule on real models, `optimize(explain=True)` and `legato rewrite --explain`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from legato.core.rewrite import MatchResult, explain_model, explain_rule, near_misses
from legato.core.rewrite._matcher import find_matches
from legato.core.rewrite.cost import AnalyticCostModel
from legato.core.rewrite.optimize import optimize
import _rule_fixtures  # beside this file
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.rules import shipped_rules
from legato.core.rewrite.rules.families import merge_matmul

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
F = TensorProto.FLOAT

# Relu(Conv(x, w)) with group=1 (a rule only needs to be well formed to be matched)
RELU_CONV = Rule.from_json({
    "name": "relu-of-conv",
    "source": {"inputs": ["x", "w"],
               "nodes": [{"id": "c", "op": "Conv", "inputs": ["x", "w"], "attrs": {"group": 1}},
                         {"id": "r", "op": "Relu", "inputs": ["c"]}],
               "outputs": ["r"]},
    "target": {"inputs": ["x", "w"],
               "nodes": [{"id": "c", "op": "Conv", "inputs": ["x", "w"], "attrs": {"group": 1}},
                         {"id": "r", "op": "Relu", "inputs": ["c"]}],
               "outputs": ["r"]},
    "preconditions": [{"constant": "w"}]})

TRANSPOSE_PAIR = Rule.from_json(_rule_fixtures.TRANSPOSE_PAIR)

DOUBLE = Rule.from_json({
    "name": "add-to-itself",
    "source": {"inputs": ["x"], "nodes": [{"id": "a", "op": "Add", "inputs": ["x", "x"]}],
               "outputs": ["a"]},
    "target": {"inputs": ["x"], "nodes": [{"id": "a", "op": "Add", "inputs": ["x", "x"]}],
               "outputs": ["a"]}})

MERGE2, MERGE3 = Rule.from_json(merge_matmul(2)), Rule.from_json(merge_matmul(3))


def _graph(nodes, inputs, outputs, inits=()) -> ir.Graph:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(m)).graph


def _weight(name="w", shape=(4, 2, 3, 3)):
    return numpy_helper.from_array(
        np.random.default_rng(0).normal(size=shape).astype(np.float32), name)


def _conv_relu(conv_inputs=("x", "w"), conv_attrs=None, extra=(), outputs=("y",),
               inputs=None, inits=None):
    x = helper.make_tensor_value_info("x", F, [1, 4, 8, 8])
    nodes = [helper.make_node("Conv", list(conv_inputs), ["c"], name="conv_3",
                              **(conv_attrs if conv_attrs is not None else {"group": 1})),
             helper.make_node("Relu", ["c"], ["y"], name="relu_4"), *extra]
    outs = [helper.make_tensor_value_info(o, F, None) for o in outputs]
    return _graph(nodes, inputs or [x], outs, [_weight()] if inits is None else inits)


def _check_fails(result: MatchResult, kind: str, *phrases: str) -> None:
    assert not result and result.matches == []
    assert result.kind == kind, result.describe()
    for phrase in phrases:
        assert phrase in result.reason, result.reason


# -- each kind of failure -----------------------------------------------------------------------
def test_a_match_is_truthy_and_agrees_with_find_matches():
    g = _conv_relu(conv_attrs={"group": 1}, inits=[_weight(shape=(4, 4, 3, 3))])
    result = explain_rule(g, RELU_CONV)
    assert result and result.count == 1 and result.reason == ""
    assert [m.key() for m in result.matches] == [m.key() for m in find_matches(g, RELU_CONV)]
    assert result.describe() == "relu-of-conv: matches at 1 place"


def test_attribute_mismatch_names_node_attribute_and_wanted_value():
    result = explain_rule(_conv_relu(conv_attrs={"group": 2}), RELU_CONV)
    _check_fails(result, "attribute", "node conv_3 (Conv): attribute group=2, pattern wants "
                 "group=1")
    assert (result.bound, result.size) == (1, 2)                # the Relu was matched
    assert [n.name for n in result.nodes] == ["relu_4", "conv_3"]


def test_wrong_operator_is_named():
    x = helper.make_tensor_value_info("x", F, [1, 4, 8, 8])
    g = _graph([helper.make_node("Sigmoid", ["x"], ["c"], name="sig_1"),
                helper.make_node("Relu", ["c"], ["y"], name="relu_2")],
               [x], [helper.make_tensor_value_info("y", F, None)])
    _check_fails(explain_rule(g, RELU_CONV), "op-type",
                 "node sig_1 (Sigmoid) is Sigmoid; pattern node c wants Conv")


def test_arity_is_named():
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    g = _conv_relu(conv_inputs=("x", "w", "b"), inits=[_weight(shape=(4, 4, 3, 3)), bias])
    _check_fails(explain_rule(g, RELU_CONV), "arity",
                 "has 3 inputs and 1 outputs; pattern node c wants 2 and 1")


def test_an_attribute_the_pattern_does_not_list_is_named():
    g = _conv_relu(conv_attrs={"group": 1, "strides": [2, 2]},
                   inits=[_weight(shape=(4, 4, 3, 3))])
    _check_fails(explain_rule(g, RELU_CONV), "extra-attribute",
                 "attribute strides=[2, 2] is not in pattern node c")


def test_interior_output_used_outside_the_match_is_named():
    g = _conv_relu(conv_attrs={"group": 1}, inits=[_weight(shape=(4, 4, 3, 3))],
                   extra=[helper.make_node("Sigmoid", ["c"], ["z"], name="sig_9")],
                   outputs=("y", "z"))
    result = explain_rule(g, RELU_CONV)
    _check_fails(result, "escape", "interior node conv_3 (Conv) (pattern node c) output 'c' "
                 "feeds sig_9 (Sigmoid) outside the match")
    assert (result.bound, result.size) == (2, 2)
    g = _conv_relu(conv_attrs={"group": 1}, inits=[_weight(shape=(4, 4, 3, 3))],
                   outputs=("y", "c"))
    _check_fails(explain_rule(g, RELU_CONV), "escape", "output 'c' is a graph output")


def test_failed_precondition_says_what_the_value_is():
    x = helper.make_tensor_value_info("x", F, [1, 4, 8, 8])
    weight = helper.make_tensor_value_info("weight", F, [4, 4, 3, 3])
    g = _conv_relu(conv_inputs=("x", "weight"), inputs=[x, weight], inits=[])
    result = explain_rule(g, RELU_CONV)
    _check_fails(result, "precondition",
                 "precondition constant(w) fails: w is the graph input 'weight'")
    assert [v.name for v in result.values] == ["weight"]

    a = helper.make_tensor_value_info("a", F, [2, 8])
    w1, w2 = _weight("w1", (8, 4)), _weight("w2", (1, 8, 6))
    g = _graph([helper.make_node("MatMul", ["a", "w1"], ["p"]),
                helper.make_node("MatMul", ["a", "w2"], ["q"])],
               [a], [helper.make_tensor_value_info(n, F, None) for n in "pq"], [w1, w2])
    _check_fails(explain_rule(g, MERGE2), "precondition",
                 "precondition rank(w2, 2) fails: w2 is the initializer 'w2', of rank 3")
    same = Rule.from_json({**merge_matmul(2), "preconditions": [{"same_shape": ["w1", "w2"]}]})
    _check_fails(explain_rule(g, same), "precondition",
                 "precondition same_shape(w1, w2) fails: w1 is [8, 4], w2 is [1, 8, 6]")


def test_a_missing_root_says_how_many_were_found():
    x = helper.make_tensor_value_info("x", F, [2, 8])
    inits = [_weight(f"w{i}", (8, 8)) for i in range(2)]
    g = _graph([helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm_{i}")
                for i in range(2)],
               [x], [helper.make_tensor_value_info(f"y{i}", F, None) for i in range(2)], inits)
    assert explain_rule(g, MERGE2)
    result = explain_rule(g, MERGE3)
    _check_fails(result, "missing-root", "pattern needs 3 roots, found 2 MatMul consumers of "
                 "x ('x'): mm_0 (MatMul), mm_1 (MatMul), all matched already")
    assert (result.bound, result.size) == (2, 3)
    _check_fails(explain_rule(g, RELU_CONV), "missing-root",
                 "no Relu node in the graph for pattern root r")


def test_a_variable_read_as_two_values_and_an_input_that_is_not_computed():
    a, b = (helper.make_tensor_value_info(n, F, [3]) for n in "ab")
    g = _graph([helper.make_node("Add", ["a", "b"], ["y"], name="add_1")], [a, b],
               [helper.make_tensor_value_info("y", F, None)])
    _check_fails(explain_rule(g, DOUBLE), "variable-binding",
                 "input 1 is the graph input 'b', but the pattern's x is already the graph "
                 "input 'a'")
    x = helper.make_tensor_value_info("x", F, [1, 4, 8, 8])
    g = _graph([helper.make_node("Relu", ["x"], ["y"], name="relu_1")], [x],
               [helper.make_tensor_value_info("y", F, None)])
    _check_fails(explain_rule(g, RELU_CONV), "not-computed",
                 "input 0 is the graph input 'x'; pattern node r wants it computed by Conv")


def test_the_closest_attempt_is_the_one_that_bound_most_nodes():
    """Relu(Sigmoid) comes first in the graph and fails after one node; Relu(T(T')) fails
    after two, on the second Transpose's perm: that one is the near-miss."""
    x = helper.make_tensor_value_info("x", F, [3, 5])
    g = _graph([helper.make_node("Sigmoid", ["x"], ["s"], name="sig_0"),
                helper.make_node("Relu", ["s"], ["y0"], name="relu_1"),
                helper.make_node("Transpose", ["x"], ["t1"], name="tr_2", perm=[0, 1]),
                helper.make_node("Transpose", ["t1"], ["t2"], name="tr_3", perm=[1, 0]),
                helper.make_node("Relu", ["t2"], ["y1"], name="relu_4")],
               [x], [helper.make_tensor_value_info(f"y{i}", F, None) for i in range(2)])
    result = explain_rule(g, TRANSPOSE_PAIR)
    _check_fails(result, "attribute", "node tr_2 (Transpose): attribute perm=[0, 1], pattern "
                 "wants perm=[1, 0]")
    assert (result.bound, result.size) == (2, 3)
    assert [n.name for n in result.nodes] == ["tr_3", "relu_4", "tr_2"]
    # at= asks about one root only
    relu_1 = next(n for n in g if n.name == "relu_1")
    _check_fails(explain_rule(g, TRANSPOSE_PAIR, at=relu_1), "op-type",
                 "node sig_0 (Sigmoid) is Sigmoid; pattern node t2 wants Transpose")


def test_results_serialize_for_reports():
    result = explain_rule(_conv_relu(conv_attrs={"group": 2}), RELU_CONV)
    data = json.loads(json.dumps(result.to_json()))
    assert data == {"rule": "relu-of-conv", "matches": 0, "kind": "attribute", "bound": 1,
                    "size": 2, "reason": result.reason,
                    "nodes": ["relu_4 (Relu)", "conv_3 (Conv)"], "values": []}
    assert result.describe().startswith("relu-of-conv: 1/2 pattern nodes matched; node conv_3")


# -- real models --------------------------------------------------------------------------------
def _light(name: str) -> onnx.ModelProto:
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx package")
    return onnx.load(str(path))


def test_near_misses_on_squeezenet_name_the_reason_of_every_shipped_rule():
    rules = shipped_rules()
    results = explain_model(_light("squeezenet"), rules)
    assert [r.rule.name for r in results] == [r.name for r in rules]
    assert all(not r and r.reason for r in results)       # nothing matches SqueezeNet
    by_name = {r.rule.name: r for r in results}
    # the fire modules' expand convolutions share their input but not their kernel
    merge = by_name["merge-parallel-conv"]
    assert merge.kind == "attribute-binding" and (merge.bound, merge.size) == (1, 2)
    assert "attribute kernel_shape=[3, 3], but the pattern's $k is already [1, 1]" in \
        merge.reason
    assert by_name["fold-conv-batchnorm"].reason == \
        "no BatchNormalization node in the graph for pattern root y"


def test_near_misses_on_inception_count_matches_and_say_why_larger_merges_fail():
    model = ir.serde.deserialize_model(_light("inception_v1"))
    import onnx_ir.passes.common as common_passes

    common_passes.ShapeInferencePass(strict_mode=False)(model)
    rules = [r for r in shipped_rules() if r.family == "merge-parallel-conv"]
    results = near_misses(model.graph, rules, limit=None)
    for rule, result in zip(rules, results):
        assert result.count == len(find_matches(model.graph, rule)), rule.name
    counts = {r.rule.name: r.count for r in results}
    assert counts["merge-parallel-conv"] > counts["merge-parallel-conv-3"] > 0
    four = results[2]
    assert four.rule.name == "merge-parallel-conv-4" and four.kind == "missing-root"
    assert four.reason.startswith("pattern needs 4 roots, found 3 Conv consumers of x")
    assert four.bound == 3


# -- optimize(explain=True) and the CLI ---------------------------------------------------------
class Flat(AnalyticCostModel):
    """Every node costs the same: merging (which adds a Split) never pays."""

    def node_cost(self, node, constants=None):
        return 1.0


def _two_matmuls() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", F, [2, 8])
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm_{i}")
             for i in range(2)]
    g = helper.make_graph(nodes, "g", [x],
                          [helper.make_tensor_value_info(f"y{i}", F, None) for i in range(2)],
                          [_weight(f"w{i}", (8, 8)) for i in range(2)])
    return onnx.shape_inference.infer_shapes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_optimize_fills_near_misses_only_when_asked():
    pytest.importorskip("onnxruntime")
    proto = _two_matmuls()
    _, plain = optimize(proto, rules=[MERGE2, MERGE3], cost_model=Flat())
    assert plain.near_misses == [] and "near-miss" not in plain.explain()
    _, report = optimize(proto, rules=[MERGE2, MERGE3], cost_model=Flat(), explain=True)
    assert [m["rule"] for m in report.near_misses] == [MERGE2.name, MERGE3.name]
    assert [m["matches"] for m in report.near_misses] == [1, 0]
    text = report.explain()
    assert "rules matching the input model: 1 of 2\n  merge-parallel-matmul: 1 place\n" in text
    assert ("  merge-parallel-matmul-3: 2/3; pattern needs 3 roots, found 2 MatMul consumers "
            "of x ('x')") in text
    json.dumps(report.to_json())


def _cli(*args, timeout=300):
    env = {**os.environ, "LEGATO_NO_COST_CACHE": "1"}
    return subprocess.run([sys.executable, "-m", "legato.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def test_rewrite_explain_lists_each_rules_closest_near_miss(tmp_path):
    pytest.importorskip("onnxruntime")
    src = LIGHT / "light_squeezenet.onnx"
    if not src.exists():
        pytest.skip(f"{src} is not in this onnx package")
    out = tmp_path / "out.onnx"
    proc = _cli("rewrite", str(src), "-o", str(out), "--budget", "1", "--time-limit", "20",
                "--explain")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    n = len(shipped_rules())
    assert f"rules matching the input model: 0 of {n}" in lines
    near = lines[lines.index(f"rules matching the input model: 0 of {n}") + 2:][:n]
    assert len(near) == n and all(line.startswith("  ") and "/" in line for line in near)
    assert ("  merge-parallel-conv: 1/2; node n7 (Conv): attribute kernel_shape=[3, 3], but "
            "the pattern's $k is already [1, 1] and wants them equal") in lines
    assert "  fold-conv-batchnorm: 0/2; no BatchNormalization node in the graph for pattern " \
           "root y" in lines
    quiet = _cli("rewrite", str(src), "-o", str(out), "--budget", "1", "--time-limit", "20")
    assert quiet.returncode == 0 and "near-miss" not in quiet.stdout
