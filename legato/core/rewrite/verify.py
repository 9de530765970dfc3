"""Checking that a rule's source and target compute the same thing.

Numerically (`verify_numeric`): both patterns become ONNX graphs in float64 (double) and run in
onnx's reference evaluator on random inputs of each example shape the rule gives (generated
rules carry the shapes they were found on), with a tolerance far below float32 rounding. A
rule that disagrees anywhere fails. (Formal verification with Z3 against per-operator axioms,
as TASO does, is `prove.py`; a rule's record says which checks it passed.)

onnx's reference LRN sums over the batch axis instead of the channels (onnx/onnx#7805; fixed
upstream by onnx/onnx#8331, not in onnx 1.23) and takes rank 4 only, so LRN runs through
legato's float64 kernel (`ops.py`, checked against onnxruntime and against the ONNX definition
in tests/core/rewrite/test_ops.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from legato.core.rewrite import _opkernels
from legato.core.rewrite._matcher import compose_perms
from legato.core.rewrite.pattern import Pattern, Rule, _thaw_attr, split_ref

__all__ = ["pattern_model", "verify_numeric"]


def _reference_ops() -> list[type]:
    """Operators the reference evaluator runs through legato's kernels instead of its own."""
    from onnx.reference.op_run import OpRun

    from legato.core.rewrite.ops import get_op

    class LRN(OpRun):
        op_domain = ""

        def _run(self, x, alpha=None, beta=None, bias=None, size=None):  # noqa: ANN001
            attrs = {"alpha": alpha, "beta": beta, "bias": bias, "size": size}
            y, = get_op("LRN").eval_f64([x], {k: v for k, v in attrs.items() if v is not None})
            return (y.astype(x.dtype),)

    return [LRN]


def _resolve(value: Any, shapes: dict[str, tuple[int, ...]], attrs: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return attrs[value]
    if isinstance(value, dict) and "dim" in value:
        var, axis = value["dim"]
        return int(shapes[var][axis])
    if isinstance(value, dict) and "compose" in value:
        return compose_perms(*(_resolve(v, shapes, attrs) for v in value["compose"]))
    if isinstance(value, dict) and "band" in value:
        var, size, alpha = value["band"]
        return _opkernels.lrn_band(int(shapes[var][1]), int(_resolve(size, shapes, attrs)),
                                   float(_resolve(alpha, shapes, attrs)), len(shapes[var]) - 2)
    if isinstance(value, list):
        return [_resolve(v, shapes, attrs) for v in value]
    return value


def pattern_model(pattern: Pattern, shapes: dict[str, tuple[int, ...]],
                  attrs: dict[str, Any] | None = None, opset: int = 17,
                  int_inputs: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """The pattern as a float64 ONNX model: variables are inputs (int64 for `int_inputs`,
    such as split sizes), roots are outputs."""
    attrs = attrs or {}

    def ref(r: str) -> str:
        name, index = split_ref(r)
        return name if name in pattern.inputs and ":" not in r else f"{name}__{index}"

    nodes = []
    for p in pattern.nodes:
        values = {}
        for k, v in p.attributes.items():
            values[k] = _resolve(v, shapes, attrs)
        if p.op == "Constant" and set(values) == {"value_float"}:
            # a float32 scalar in a real graph (the rule requires FLOAT); float64 in this check
            values = {"value": helper.make_tensor("v", TensorProto.DOUBLE, [],
                                                  [float(values["value_float"])])}
        elif p.op == "Constant" and isinstance(values.get("value"), np.ndarray):   # a band
            values = {"value": numpy_helper.from_array(values["value"].astype(np.float64), "v")}
        nodes.append(helper.make_node(p.op, [ref(r) for r in p.inputs],
                                      [f"{p.id}__{j}" for j in range(p.num_outputs)], **values))
    inputs = [helper.make_tensor_value_info(
        v, TensorProto.INT64 if v in int_inputs else TensorProto.DOUBLE, list(shapes[v]))
        for v in pattern.inputs]
    outputs = [helper.make_tensor_value_info(ref(r), TensorProto.DOUBLE, None)
               for r in pattern.outputs]
    g = helper.make_graph(nodes, "pattern", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def verify_numeric(rule: Rule, *, trials: int = 3, seed: int = 0, rtol: float = 1e-9,
                   atol: float = 1e-12) -> dict[str, Any]:
    """Run source and target on random float64 inputs of each example shape.

    Returns {"numeric": "passed"|"failed"|"skipped", "max_abs": ..., "detail": ...}."""
    from onnx.reference import ReferenceEvaluator

    if not rule.examples:
        return {"numeric": "skipped", "detail": "the rule gives no example shapes"}
    rng = np.random.default_rng(seed)
    worst = 0.0
    for ex in rule.examples:
        given = {k: _plain(_thaw_attr(v)) for k, v in ex}
        # a variable given as {"value": [...]} is that int64 tensor (split sizes, shapes, axes);
        # one given as {"positive": shape} is drawn in [0.5, 2) (a variance under a Sqrt)
        fixed = {k: np.asarray(v["value"], dtype=np.int64) for k, v in given.items()
                 if isinstance(v, dict) and "value" in v}
        positive = {k for k, v in given.items() if isinstance(v, dict) and "positive" in v}
        shapes = {k: (fixed[k].shape if k in fixed else
                      tuple(v["positive"]) if k in positive else tuple(v))
                  for k, v in given.items() if not k.startswith("$")}
        attrs = {k: v for k, v in given.items() if k.startswith("$")}
        ints = frozenset(fixed)
        ops = _reference_ops()
        src = ReferenceEvaluator(pattern_model(rule.source, shapes, attrs, int_inputs=ints),
                                 new_ops=ops)
        dst = ReferenceEvaluator(pattern_model(rule.target, shapes, attrs, int_inputs=ints),
                                 new_ops=ops)
        for _ in range(trials):
            feed = {v: fixed[v] if v in fixed else rng.uniform(0.5, 2.0, shapes[v])
                    if v in positive else rng.standard_normal(shapes[v])
                    for v in rule.source.inputs}
            try:
                want = src.run(None, feed)
            except Exception as err:  # noqa: BLE001 (the example does not fit the source)
                return {"numeric": "failed", "max_abs": float("inf"),
                        "detail": f"shapes {shapes}: the source does not run "
                                  f"({type(err).__name__}: {err}); fix the example shapes"}
            try:
                got = dst.run(None, {v: feed[v] for v in rule.target.inputs})
            except Exception as err:  # noqa: BLE001 (an ill-shaped target is a wrong rule)
                return {"numeric": "failed", "max_abs": float("inf"),
                        "detail": f"shapes {shapes}: the target does not run where the "
                                  f"source does ({type(err).__name__}: {err})"}
            for w, g in zip(want, got):
                if np.shape(w) != np.shape(g):
                    return {"numeric": "failed", "max_abs": float("inf"),
                            "detail": f"shapes {shapes}: output shape {np.shape(g)} against "
                                      f"{np.shape(w)}"}
                err = float(np.max(np.abs(np.asarray(w) - np.asarray(g)), initial=0.0))
                worst = max(worst, err)
                # relative to the output's scale: folding reorders float64 rounding (a Conv
                # with BatchNormalization folded in differs by ~1e-10 where outputs cross 0)
                scale = float(np.max(np.abs(np.asarray(w)), initial=0.0))
                if not np.allclose(g, w, rtol=rtol, atol=atol + rtol * scale):
                    return {"numeric": "failed", "max_abs": err,
                            "detail": f"shapes {shapes}: max abs error {err:.3g}"}
    return {"numeric": "passed", "max_abs": worst,
            "detail": f"{len(rule.examples)} shapes x {trials} random inputs, float64"}
