"""Real ONNX files through `optimize`: IR 3 to the current IR, opsets from 7, subgraphs and
custom domains, fp16/bf16/quantized models, overridable initializers, symbolic dimensions and
external data (modelio.py)."""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from legato.core.rewrite import modelio
from legato.core.rewrite.cost import AnalyticCostModel
from legato.core.rewrite.measure import outputs, random_feed, session
from legato.core.rewrite.optimize import RewriteError, optimize, optimize_file
from legato.core.rewrite.rules import shipped_rules

pytest.importorskip("onnxruntime")

RULES = {r.name: r for r in shipped_rules()}
SCALE = RULES["scalar-after-matmul-into-weight"]         # makes Mul(w, s): folded into a new
TRANSPOSES = [RULES[n] for n in ("transpose-transpose", "transpose-identity-2d")]
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
# accept any candidate with equal outputs: these tests are about validity, not speed
FORCE = {"cost_model": AnalyticCostModel(), "min_speedup": 0.0, "rounds": 1}


def _same_outputs(a, b, feed):
    for x, y in zip(outputs(session(a), feed), outputs(session(b), feed)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=1e-5, atol=1e-5)


def _scaled_matmul(ir_version: int, opset: int, *, initializer_inputs: bool = False,
                   batch: int | str = 2) -> onnx.ModelProto:
    """y = (x @ w) * s; in IR 3 (or with initializer_inputs) w and s are also graph inputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, [batch, 4])]
    if ir_version < 4 or initializer_inputs:
        inputs += [helper.make_tensor_value_info("w", T.FLOAT, [4, 3]),
                   helper.make_tensor_value_info("s", T.FLOAT, [])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Mul", ["m", "s"], ["y"])]
    graph = helper.make_graph(nodes, "scaled", inputs,
                              [helper.make_tensor_value_info("y", T.FLOAT, [batch, 3])], [w, s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version, producer_name="test-producer")
    model.doc_string = "a test model"
    helper.set_model_props(model, {"author": "legato tests"})
    onnx.checker.check_model(model)
    return model


def _versions() -> list[tuple[int, int]]:
    """(IR version, the highest opset released with it) from 3 to onnx's current, and opset 7."""
    best: dict[int, int] = {}
    for row in helper.VERSION_TABLE:
        best[row[1]] = max(best.get(row[1], 0), row[2])
    pairs = [(ir_v, max(op, 7)) for ir_v, op in sorted(best.items()) if ir_v >= 3]
    return [(3, 7)] + pairs


def test_ir3_light_model_comes_back_valid_with_folded_weights_as_inputs():
    """onnx's light_shufflenet (IR 3): folding a BatchNormalization into its Conv adds
    initializers, which IR 3 requires to be graph inputs too (today's failure:
    'conv..._folded in initializer but not in graph input')."""
    proto = onnx.load(os.path.join(LIGHT, "light_shufflenet.onnx"))
    out, report = optimize(proto, budget=1, **FORCE)
    assert report.accepted, report.reason
    assert out.ir_version == 3 and report.ir_version_change is None
    onnx.checker.check_model(out)
    inputs = [i.name for i in out.graph.input]
    inits = {t.name for t in out.graph.initializer}
    assert inits <= set(inputs)                            # IR 3: every initializer an input
    assert any(n.endswith("_folded") for n in inits)        # the folded weights among them
    assert set(inputs) - inits == {"gpu_0/data_0"} and inputs[0] == "gpu_0/data_0"
    assert out.producer_name == proto.producer_name and out.opset_import == proto.opset_import
    _same_outputs(proto, out, random_feed(proto))


@pytest.mark.parametrize("ir_version,opset", _versions())
def test_every_ir_version_and_opset_keeps_its_form(ir_version, opset):
    proto = _scaled_matmul(ir_version, opset)
    out, report = optimize(proto, rules=[SCALE], **FORCE)
    assert report.accepted and report.applied == [SCALE.name], report.reason
    onnx.checker.check_model(out)
    assert out.ir_version == ir_version and list(out.opset_import) == list(proto.opset_import)
    assert [n.op_type for n in out.graph.node] == ["MatMul"]          # w * s was folded
    inits = {t.name for t in out.graph.initializer}
    if ir_version < 4:
        assert [i.name for i in out.graph.input][0] == "x" and inits <= {
            i.name for i in out.graph.input}
        assert "w" not in {i.name for i in out.graph.input}          # gone: not an input
    else:
        assert [i.name for i in out.graph.input] == ["x"]
    assert out.doc_string == "a test model" and out.producer_name == "test-producer"
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["author"] == "legato tests" and "legato.rewrite.applied" in meta
    _same_outputs(proto, out, random_feed(proto))


def test_overridable_initializers_are_not_folded_as_constants():
    """IR >= 4: an initializer that is also a graph input can be overridden at run time;
    folding it into another constant would ignore the override."""
    proto = _scaled_matmul(8, 17, initializer_inputs=True)
    out, report = optimize(proto, rules=[SCALE], **FORCE)
    assert report.applied == [] and out is proto
    assert any("overridable" in note for note in report.notes)
    # asked to, it folds them, and the output no longer offers them as inputs
    out, report = optimize(proto, rules=[SCALE], freeze_initializer_inputs=True, **FORCE)
    assert report.accepted and [i.name for i in out.graph.input] == ["x"]
    onnx.checker.check_model(out)


def test_overridable_initializers_stay_overridable_when_another_rule_applies():
    proto = _scaled_matmul(8, 17, initializer_inputs=True)
    t = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
         helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0])]
    proto.graph.node[0].input[0] = "t2"
    proto.graph.node.insert(0, t[1])
    proto.graph.node.insert(0, t[0])
    out, report = optimize(proto, rules=[SCALE, *TRANSPOSES], **FORCE)
    assert report.accepted and SCALE.name not in report.applied, report
    assert [i.name for i in out.graph.input] == ["x", "w", "s"]
    assert {t.name for t in out.graph.initializer} == {"w", "s"}
    feed = {"x": np.ones((2, 4), np.float32), "w": np.full((4, 3), 2.0, np.float32),
            "s": np.array(3.0, np.float32)}                  # an override of both
    _same_outputs(proto, out, feed)


def _control_flow_model() -> onnx.ModelProto:
    """The scaled MatMul beside an If reading x, an If reading the rewritten value y, a Loop,
    an onnxruntime contrib op and a model-local function (custom domains)."""
    base = _scaled_matmul(8, 17)
    g = base.graph
    g.input.append(helper.make_tensor_value_info("cond", T.BOOL, []))
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", T.FLOAT, [2, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [],
                               [helper.make_tensor_value_info("n", T.FLOAT, [2, 4])])
    then_y = helper.make_graph([helper.make_node("Sigmoid", ["y"], ["sy"])], "then_y", [],
                               [helper.make_tensor_value_info("sy", T.FLOAT, [2, 3])])
    else_y = helper.make_graph([helper.make_node("Identity", ["y"], ["iy"])], "else_y", [],
                               [helper.make_tensor_value_info("iy", T.FLOAT, [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Add", ["v_in", "x"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", T.INT64, []),
         helper.make_tensor_value_info("c_in", T.BOOL, []),
         helper.make_tensor_value_info("v_in", T.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("c_out", T.BOOL, []),
         helper.make_tensor_value_info("v_out", T.FLOAT, [2, 4])])
    g.initializer.extend([numpy_helper.from_array(np.array(3, np.int64), "trips"),
                          numpy_helper.from_array(np.array(True), "true")])
    g.node.extend([
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
        helper.make_node("If", ["cond"], ["zy"], then_branch=then_y, else_branch=else_y),
        helper.make_node("Loop", ["trips", "true", "x"], ["acc"], body=body),
        helper.make_node("Gelu", ["y"], ["gelu"], domain="com.microsoft"),
        helper.make_node("Double", ["z"], ["z2"], domain="local.fn")])
    fn = helper.make_function("local.fn", "Double", ["a"], ["b"],
                              [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    base.functions.append(fn)
    base.opset_import.extend([helper.make_opsetid("com.microsoft", 1),
                              helper.make_opsetid("local.fn", 1)])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("zy", T.FLOAT, [2, 3]),
                     helper.make_tensor_value_info("acc", T.FLOAT, [2, 4]),
                     helper.make_tensor_value_info("gelu", T.FLOAT, [2, 3]),
                     helper.make_tensor_value_info("z2", T.FLOAT, [2, 4])])
    onnx.checker.check_model(base)
    return base


def test_subgraphs_custom_domains_and_functions_are_preserved():
    proto = _control_flow_model()
    out, report = optimize(proto, rules=[SCALE], **FORCE)
    assert report.accepted, report.reason
    onnx.checker.check_model(out)
    assert [o.name for o in out.graph.output] == ["zy", "acc", "gelu", "z2"]
    assert list(out.opset_import) == list(proto.opset_import)
    assert list(out.functions) == list(proto.functions)
    by_out = {n.output[0]: n for n in out.graph.node}
    orig = {n.output[0]: n for n in proto.graph.node}
    # the If and the Loop read only x: their bodies come back byte for byte
    for name in ("z", "acc"):
        assert [a.SerializeToString() for a in by_out[name].attribute] == [
            a.SerializeToString() for a in orig[name].attribute]
    assert by_out["gelu"].domain == "com.microsoft" and by_out["z2"].domain == "local.fn"
    assert len(out.graph.value_info) <= len(proto.graph.value_info)
    for cond in (True, False):
        feed = {"x": np.arange(8, dtype=np.float32).reshape(2, 4) - 4,
                "cond": np.array(cond)}
        _same_outputs(proto, out, feed)


def _with_transposes(model: onnx.ModelProto, name: str = "x2") -> onnx.ModelProto:
    """Add a float path x2 -> Transpose -> Transpose -> t_out that the shipped transpose rules
    remove, so that a candidate is built around the rest of the model."""
    g = model.graph
    g.input.append(helper.make_tensor_value_info(name, T.FLOAT, [2, 3]))
    g.node.extend([helper.make_node("Transpose", [name], ["t_mid"], perm=[1, 0]),
                   helper.make_node("Transpose", ["t_mid"], ["t_out"], perm=[1, 0])])
    g.output.append(helper.make_tensor_value_info("t_out", T.FLOAT, [2, 3]))
    onnx.checker.check_model(model)
    return model


def _fp16_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float16), "w16")
    g = helper.make_graph([helper.make_node("MatMul", ["x16", "w16"], ["y16"])], "fp16",
                          [helper.make_tensor_value_info("x16", T.FLOAT16, [2, 4])],
                          [helper.make_tensor_value_info("y16", T.FLOAT16, [2, 4])], [w])
    return _with_transposes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _bf16_model() -> onnx.ModelProto:
    """bfloat16 input and output, and a bfloat16 weight cast to float (weight compression)."""
    import ml_dtypes

    wb = numpy_helper.from_array(np.eye(4).astype(ml_dtypes.bfloat16), "wb")
    g = helper.make_graph(
        [helper.make_node("Cast", ["xb"], ["xf"], to=T.FLOAT),
         helper.make_node("Cast", ["wb"], ["wf"], to=T.FLOAT),
         helper.make_node("MatMul", ["xf", "wf"], ["yf"]),
         helper.make_node("Cast", ["yf"], ["yb"], to=T.BFLOAT16)], "bf16",
        [helper.make_tensor_value_info("xb", T.BFLOAT16, [2, 4])],
        [helper.make_tensor_value_info("yb", T.BFLOAT16, [2, 4])], [wb])
    return _with_transposes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _qdq_model() -> onnx.ModelProto:
    """QDQ int8 Conv (onnxruntime fuses it into an int8 kernel) and a QLinearConv on uint8
    input: the int8 weights must stay int8."""
    rng = np.random.default_rng(0)
    w8 = numpy_helper.from_array(rng.integers(-5, 5, (4, 3, 3, 3)).astype(np.int8), "w8")
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    zp8 = numpy_helper.from_array(np.array(0, np.int8), "zp8")
    zpu = numpy_helper.from_array(np.array(128, np.uint8), "zpu")
    nodes = [helper.make_node("QuantizeLinear", ["xq", "scale", "zp8"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp8"], ["dq"]),
             helper.make_node("DequantizeLinear", ["w8", "scale", "zp8"], ["wdq"]),
             helper.make_node("Conv", ["dq", "wdq"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "scale", "zp8"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "scale", "zp8"], ["yq"]),
             helper.make_node("QLinearConv", ["xu", "scale", "zpu", "w8", "scale", "zp8",
                                              "scale", "zpu"], ["yu"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("xq", T.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("xu", T.UINT8, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("yq", T.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("yu", T.UINT8, [1, 4, 8, 8])], [w8, scale, zp8, zpu])
    return _with_transposes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("make", [_fp16_model, _bf16_model, _qdq_model],
                         ids=["fp16", "bf16", "int8-qdq-and-qlinearconv"])
def test_fp16_bf16_and_quantized_models_pass_through(make):
    proto = make()
    out, report = optimize(proto, rules=TRANSPOSES, **FORCE)
    assert report.accepted and report.applied, report.reason
    onnx.checker.check_model(out)
    # everything but the transpose pair is as it was: nodes, initializers and their dtypes
    kept = [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node
            if n.op_type != "Transpose"]
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node
            if n.output[0] != "t_out"] == kept
    assert sorted((t.name, t.data_type, t.raw_data) for t in out.graph.initializer) == sorted(
        (t.name, t.data_type, t.raw_data) for t in proto.graph.initializer)
    assert list(out.graph.input) == list(proto.graph.input)
    assert list(out.graph.output) == list(proto.graph.output)
    feed = random_feed(proto, seed=3)
    for x, y in zip(outputs(session(proto), feed), outputs(session(out), feed)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_input_shapes_time_at_static_shapes_and_keep_symbolic_dims():
    proto = _scaled_matmul(8, 17, batch="N")
    out, report = optimize(proto, rules=[SCALE], input_shapes={"x": (5, 4)}, **FORCE)
    assert report.accepted and report.settings["input_shapes"] == {"x": [5, 4]}
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 4]
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3]
    assert all(d.dim_value != 5 for vi in out.graph.value_info
               for d in vi.type.tensor_type.shape.dim)
    onnx.checker.check_model(out)
    _same_outputs(proto, out, {"x": np.ones((7, 4), np.float32)})   # any batch still runs
    # without shapes, the note says what the timing used
    _, report = optimize(proto, rules=[SCALE], **FORCE)
    assert any("symbolic dimensions" in n and "x [N, 4]" in n for n in report.notes)


@pytest.mark.parametrize("shapes,message", [
    ({"nope": (1, 4)}, "has no input of that name; its inputs are: x [N, 4] (float)"),
    ({"x": (1, 4, 1)}, "has rank 3, but the model's input is ['N', 4] (rank 2)"),
    ({"x": (1, 5)}, "gives dimension 1 as 5, but the model fixes it to 4"),
    ({"x": (0, 4)}, "must be positive integers"),
])
def test_input_shapes_that_do_not_fit_are_refused_clearly(shapes, message):
    with pytest.raises(RewriteError) as err:
        optimize(_scaled_matmul(8, 17, batch="N"), rules=[SCALE], input_shapes=shapes,
                 **FORCE)
    assert message in str(err.value)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _save_external(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data", size_threshold=0)


def test_external_data_is_read_and_written_as_external_data(tmp_path):
    src = tmp_path / "in.onnx"
    _save_external(_scaled_matmul(8, 17), src)
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    dst = tmp_path / "out" / "fast.onnx"
    report = optimize_file(src, dst, rules=[SCALE], **FORCE)
    assert report.accepted, report.reason
    assert {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["fast.onnx", "fast.onnx.data"]
    header = onnx.load(str(dst), load_external_data=False)
    assert all(modelio.external_data_helper.uses_external_data(t)
               for t in header.graph.initializer if t.name.endswith("folded"))
    onnx.checker.check_model(str(dst))
    _same_outputs(str(src), str(dst), {"x": np.ones((2, 4), np.float32)})


def test_the_inputs_data_file_is_never_overwritten(tmp_path):
    src = tmp_path / "m.onnx"
    _save_external(_scaled_matmul(8, 17), src)
    data = _digest(tmp_path / "m.onnx.data")
    with pytest.raises(RewriteError, match="the input model's external data file m.onnx.data"):
        optimize_file(src, tmp_path / "m.onnx.data", overwrite=True, rules=[SCALE], **FORCE)
    report = optimize_file(src, src, overwrite=True, rules=[SCALE], **FORCE)
    assert report.accepted
    assert _digest(tmp_path / "m.onnx.data") == data           # the old one untouched
    assert (tmp_path / "m.onnx.1.data").exists()                 # the new one beside it
    onnx.checker.check_model(str(src))
    # nothing to rewrite any more: the input is left as it was
    report = optimize_file(src, src, overwrite=True, rules=[SCALE], **FORCE)
    assert not report.accepted and any("left as it was" in n for n in report.notes)


def test_the_original_is_written_with_its_external_data_when_nothing_is_accepted(tmp_path):
    src = tmp_path / "in.onnx"
    _save_external(_scaled_matmul(8, 17), src)
    dst = tmp_path / "copy.onnx"
    report = optimize_file(src, dst, rules=[], **FORCE)
    assert not report.accepted and (tmp_path / "copy.onnx.data").exists()
    header = onnx.load(str(dst), load_external_data=False)
    assert {e.value for t in header.graph.initializer for e in t.external_data
            if e.key == "location"} == {"copy.onnx.data"}
    _same_outputs(str(src), str(dst), {"x": np.ones((2, 4), np.float32)})


def test_a_small_threshold_writes_external_data_for_a_plain_file(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(_scaled_matmul(8, 17), str(src))
    dst = tmp_path / "out.onnx"
    report = optimize_file(src, dst, rules=[SCALE], external_data_threshold_bytes=16, **FORCE)
    assert report.accepted and (tmp_path / "out.onnx.data").exists()
    assert any("external data" in n for n in report.notes)
    onnx.checker.check_model(str(dst))
    _same_outputs(str(src), str(dst), {"x": np.ones((2, 4), np.float32)})
    # the default threshold keeps a small model in one file
    report = optimize_file(src, tmp_path / "one.onnx", rules=[SCALE], **FORCE)
    assert report.accepted and not (tmp_path / "one.onnx.data").exists()


def test_a_model_with_unloaded_external_data_is_refused_with_the_fix(tmp_path):
    src = tmp_path / "in.onnx"
    _save_external(_scaled_matmul(8, 17), src)
    with pytest.raises(RewriteError, match="optimize_file"):
        optimize(onnx.load(str(src), load_external_data=False), rules=[SCALE], **FORCE)


def test_the_light_models_files_are_all_ir3():
    """The IR 3 test above stands for the nine light CNNs: they share the layout."""
    files = sorted(glob.glob(os.path.join(LIGHT, "*.onnx")))
    assert len(files) == 9
    for f in files:
        m = onnx.load(f)
        assert m.ir_version == 3
        assert {t.name for t in m.graph.initializer} <= {i.name for i in m.graph.input}


@pytest.mark.parametrize("opset", [17, 21])
def test_folding_through_a_users_dequantize_is_done_or_declined_never_a_crash(opset):
    """w = DequantizeLinear(int8) is constant, so the scalar moves into it; folding the new
    Mul must evaluate the user's DequantizeLinear, which onnx's reference evaluator has from
    opset 19 only: below that the original comes back with the reason."""
    w8 = numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3), "w8")
    inits = [w8, numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(np.array(0.5, np.float32), "s")]
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w8", "scale", "zp"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["m"]),
         helper.make_node("Mul", ["m", "s"], ["y"])], "dq",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    out, report = optimize(proto, rules=[SCALE], **FORCE)
    assert report.applied == [SCALE.name]
    if opset < 19:
        assert out is proto and "could not be computed" in report.reason
    else:
        # the folded float weight was built, checked and run against the original (which
        # onnxruntime runs as an int8 kernel: the two may differ by more than rtol)
        assert report.max_abs_error is not None and report.max_abs_error < 0.05
        assert report.accepted or "outputs differ" in report.reason


def test_optimize_takes_a_model_not_a_path(tmp_path):
    with pytest.raises(RewriteError, match="optimize_file"):
        optimize(str(tmp_path / "m.onnx"))
