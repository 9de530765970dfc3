"""The framework-free grouping of a traced op graph into pipeline-profile nodes."""

from __future__ import annotations

from legato.adapters._pipeline_graph import Op, group_ops, layer_node, time_layer


def test_merges_are_nodes_and_single_producer_ops_fold():
    # x -> stem -> conv -> relu(fold) -> add(stem, relu) -> size(fold) ; x.flatten -> own node
    ops = [Op("stem", "stem", True, inputs=(), reads_model_input=True),
           Op("conv", "conv", True, inputs=("stem",)),
           Op("relu", "relu", False, inputs=("conv",)),
           Op("add", "add", False, inputs=("relu", "stem")),
           Op("size", "size", False, inputs=("add",), yields_tensor=False),
           Op("flat", "flatten", False, reads_model_input=True),
           Op("shape", "shape", False, reads_model_input=True, yields_tensor=False),
           Op("const", "zeros", False),
           Op("scale", "mul", False, has_params=True, inputs=("add",))]
    groups, edges, group_of = group_ops(ops, ["scale", "flat"])
    assert [(g.id, g.members) for g in groups] == [
        ("stem", ["stem"]), ("conv", ["conv", "relu"]), ("add", ["add", "size"]),
        ("flatten", ["flat"]), ("mul", ["scale"])]
    assert edges == [("stem", "conv"), ("conv", "add"), ("stem", "add"), ("add", "mul")]
    assert group_of["shape"] is None and group_of["const"] is None
    by_id = {g.id: g for g in groups}
    assert by_id["conv"].outputs == ["relu"]  # the raw conv output stays inside
    assert by_id["stem"].outputs == ["stem"]
    assert by_id["mul"].produces_model_output and by_id["flatten"].produces_model_output
    assert not by_id["add"].produces_model_output


def test_repeated_names_get_a_call_suffix():
    ops = [Op("a", "shared", True), Op("b", "shared", True, inputs=("a",)),
           Op("c", "shared", True, inputs=("b",))]
    groups, edges, _ = group_ops(ops, ["c"])
    assert [g.id for g in groups] == ["shared", "shared#2", "shared#3"]
    assert edges == [("shared", "shared#2"), ("shared#2", "shared#3")]


def test_time_layer_takes_medians_after_warmup():
    calls = iter(range(100))

    def step(mode):
        i = next(calls)
        return float(i), {"full": 10.0, "input": 1.0, "weight": 2.0}[mode] * i

    fwd, bwd = time_layer(step, ("full", "input", "weight"), warmup=1, repeats=3)
    # warmup uses calls 0-2; timed calls 3..11: forward median 7, full at 3, 6, 9
    assert fwd == 7.0 and bwd == {"full": 60.0, "input": 7.0, "weight": 16.0}
    node = layer_node("n", "d", fwd, bwd, [4, 8], 16, 32, split_backward=False)
    assert node.activation_bytes == 12 and node.activation_outputs == (4, 8)
    assert node.backward_input_s is None and node.backward_s == 60.0
