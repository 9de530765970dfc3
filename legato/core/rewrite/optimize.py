"""`optimize(model)`: search for a faster equivalent graph, and return it only if it is
measured faster and computes the same outputs; otherwise the original, with the reason.

Steps: check the model; TASO's search with the given rules and cost model (`search.py`); fold
the constant subgraphs the rules produced (weights concatenated or scaled) into initializers
with onnx's reference evaluator; then a whole-model A/B in onnxruntime with the same settings
(interleaved rounds, medians) and an output comparison on random inputs. The returned model
carries, in `metadata_props`, the rules applied and the costs and times measured
(`legato.rewrite.*`; `Report.explain()` prints them).

`modelio.py` reads the model in (`prepare`) and gives the result back the input's form
(`finish`): valid for its IR version, inputs and symbolic dimensions as they were, external data
kept. `optimize` takes a ModelProto under 2 GB; `optimize_file` takes paths and handles any size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from legato.core.rewrite import modelio
from legato.core.rewrite._matcher import constant_array
from legato.core.rewrite.cost import CostModel, OrtCostModel, foldable
from legato.core.rewrite.measure import ab_time, compare_outputs, random_feed, session
from legato.core.rewrite.modelio import ORIGINAL_NODE, RewriteError
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.search import search

__all__ = ["Report", "RewriteError", "fold_constants", "optimize", "optimize_file"]


@dataclasses.dataclass
class Report:
    """What `optimize` did and measured."""

    accepted: bool
    reason: str
    applied: list[str]
    predicted_before_s: float
    predicted_after_s: float
    measured_before_s: float | None = None
    measured_after_s: float | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    tolerance: dict[str, float] = dataclasses.field(default_factory=dict)
    stop_reason: str = ""
    search_s: float = 0.0
    explored: int = 0
    generated: int = 0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    # optimize(explain=True): per rule, its matches in the input model or its closest
    # near-miss (`explain.MatchResult.to_json()`: rule, matches, bound, size, reason, ...)
    near_misses: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)   # how the model was read, written
    ir_version_change: tuple[int, int] | None = None   # (input's, output's) when it had to rise

    @property
    def speedup(self) -> float | None:
        if self.measured_before_s and self.measured_after_s:
            return self.measured_before_s / self.measured_after_s
        return None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "speedup": self.speedup}

    def explain(self) -> str:
        lines = [f"{'accepted' if self.accepted else 'kept the original'}: {self.reason}"]
        if self.applied:
            lines.append("rules applied: " + ", ".join(self.applied))
        lines.append(f"predicted cost: {self.predicted_before_s * 1e3:.3f} ms -> "
                     f"{self.predicted_after_s * 1e3:.3f} ms")
        if self.measured_before_s is not None and self.measured_after_s is not None:
            lines.append(f"measured: {self.measured_before_s * 1e3:.3f} ms -> "
                         f"{self.measured_after_s * 1e3:.3f} ms ({self.speedup:.3f}x)")
        if self.max_abs_error is not None:
            lines.append(f"max error: {self.max_abs_error:.3g} absolute, "
                         f"{self.max_rel_error:.3g} relative (tolerance {self.tolerance})")
        lines.append(f"search: {self.explored} graphs explored, {self.generated} generated, "
                     f"{self.search_s:.2f} s, stopped: {self.stop_reason}")
        if self.near_misses:
            matched = sorted((m for m in self.near_misses if m["matches"]),
                             key=lambda m: -m["matches"])
            missed = sorted((m for m in self.near_misses if not m["matches"]),
                            key=lambda m: -m["bound"] / max(1, m["size"]))
            lines.append(f"rules matching the input model: {len(matched)} of "
                         f"{len(self.near_misses)}")
            lines.extend(f"  {m['rule']}: {m['matches']} place{'s' * (m['matches'] != 1)}"
                         for m in matched)
            if missed:
                lines.append("closest near-miss of each rule that matches nowhere (pattern "
                             "nodes matched; why it stopped):")
                lines.extend(f"  {m['rule']}: {m['bound']}/{m['size']}; {m['reason']}"
                             for m in missed)
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def fold_constants(model: ir.Model) -> int:
    """Replace nodes computed from constants only by initializers, with onnx's reference
    evaluator, then drop what no longer feeds anything; returns how many nodes were folded.

    Nodes of the user's graph (marked by `modelio.prepare`) are not folded: a DequantizeLinear
    of int8 weights or a Cast of bfloat16 ones stays as the user wrote it (onnxruntime fuses
    the one and folds the other itself); only the nodes the rules made are, reading the values
    of the user's constant nodes they depend on."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opset = model.opset_imports.get("", 17)
    foldable_ids = foldable(graph)
    targets = [n for n in graph if id(n) in foldable_ids and n.op_type != "Constant"
               and not n.meta.get(ORIGINAL_NODE)]
    computed: dict[int, np.ndarray] = {}

    def array(v: ir.Value) -> np.ndarray:
        if id(v) in computed:
            return computed[id(v)]
        arr = constant_array(v)
        if arr is not None:
            return arr
        producer = v.producer()
        if producer is None or id(producer) not in foldable_ids:
            raise RewriteError(f"cannot read the constant {v.name!r}")
        # a constant node of the user's graph: evaluated for its consumers, not replaced;
        # its own constant inputs first, without recursion (chains can be long)
        pending = [producer]
        while pending:
            node = pending[-1]
            todo = [i.producer() for i in node.inputs
                    if i is not None and id(i) not in computed and constant_array(i) is None
                    and i.producer() is not None]
            if todo:
                pending.extend(todo)
                continue
            pending.pop()
            if id(node.outputs[0]) not in computed:
                values = _evaluate(node, opset, array, ReferenceEvaluator)
                computed.update((id(out), value) for out, value in zip(node.outputs, values))
        return computed[id(v)]

    for node in targets:
        for out, arr in zip(node.outputs, _evaluate(node, opset, array, ReferenceEvaluator)):
            init = ir.Value(name=_fresh(graph, out.name), shape=ir.Shape(arr.shape),
                            type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                            const_value=ir.tensor(arr))
            for i, gout in enumerate(graph.outputs):
                if gout is out:                       # a graph output keeps its name
                    name, out.name = out.name, None
                    init.name = name
                    graph.outputs[i] = init
            graph.register_initializer(init)
            ir.convenience.replace_all_uses_with(out, init)
    _drop_unused(graph)
    return len(targets)


def _evaluate(node: ir.Node, opset: int, array: Callable[[ir.Value], np.ndarray],
              evaluator: Any) -> list[np.ndarray]:
    """Run one node with onnx's reference evaluator on its inputs' values."""
    proto = ir.serde.serialize_node(node)
    names, feed = [], {}
    for i, v in enumerate(node.inputs):
        names.append("" if v is None else f"i{i}")
        if v is not None:
            feed[f"i{i}"] = array(v)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(f"o{j}" for j in range(len(node.outputs)))
    outs = [onnx.helper.make_tensor_value_info(f"o{j}", 0, None)
            for j in range(len(node.outputs))]
    ev = evaluator(onnx.helper.make_model(
        onnx.helper.make_graph([proto], "fold", [], outs),
        opset_imports=[onnx.helper.make_opsetid("", opset)]))
    return [np.asarray(arr) for arr in ev.run(None, feed)]


def _drop_unused(graph: ir.Graph) -> None:
    """Remove nodes and initializers that feed nothing (repeatedly)."""
    outputs = {id(v) for v in graph.outputs}
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if all(not o.uses() and id(o) not in outputs for o in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    inputs = {id(v) for v in graph.inputs}
    for name, value in list(graph.initializers.items()):
        if not value.uses() and id(value) not in outputs and id(value) not in inputs:
            del graph.initializers[name]


def _fresh(graph: ir.Graph, base: str | None) -> str:
    base = (base or "folded") + "_folded"
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}{k}"
    return name


def optimize(model: onnx.ModelProto, *, rules: Sequence[Rule] | None = None,
             alpha: float = 1.05, budget: int = 200, time_limit_s: float = 60.0,
             level: str = "all", threads: int = 1, rounds: int = 7, rtol: float = 1e-4,
             atol: float = 1e-5, seed: int = 0, cost_model: CostModel | None = None,
             min_speedup: float = 1.03, use_cache: bool = True,
             progress: Callable[[int, float], None] | None = None, explain: bool = False,
             input_shapes: Mapping[str, Sequence[int]] | None = None,
             freeze_initializer_inputs: bool = False
             ) -> tuple[onnx.ModelProto, Report]:
    """Rewrite `model` for onnxruntime on this CPU (see the module docstring).

    Args:
        model: the model (not modified), any IR version from 3 and opset from 7, under 2 GB
            (`optimize_file` takes larger ones).
        rules: rules to search with (default: the shipped, verified rule set).
        alpha, budget, time_limit_s: the search's threshold and limits.
        level, threads: the onnxruntime settings to measure under ("all", 1).
        rounds: A/B rounds of the final measurement.
        rtol, atol: output tolerance against the original.
        min_speedup: keep the rewrite only if it measures at least this much faster in two
            independent A/B runs (fresh sessions, opposite order); below ~3% a difference on
            this kind of machine is noise (the zoo benchmark saw 1.005x "wins" measure 0.92x).
        cost_model: per-operator costs (default: measured in onnxruntime, cached).
        use_cache: read and write the on-disk cost cache (False: measure everything afresh
            and keep it in memory only; `LEGATO_NO_COST_CACHE=1` does the same).
        explain: also fill `report.near_misses`: where each rule matches the input model,
            or why its closest attempt did not (`explain.explain_model`; off: no cost).
        input_shapes: static shapes by input name, e.g. {"x": (1, 3, 224, 224)}, for inputs
            with symbolic dimensions: the search costs and the A/B times the model at these
            shapes; the returned model keeps its symbolic dimensions.
        freeze_initializer_inputs: let rules fold initializers that are also graph inputs
            (IR >= 4 makes those overridable at run time, so by default they are treated as
            inputs); the returned model then no longer lists them as inputs.
    Returns:
        (model, report): the rewritten model when accepted, else the original unchanged.
    """
    if not isinstance(model, onnx.ModelProto):
        raise RewriteError(f"optimize takes an onnx.ModelProto, not {type(model).__name__}; "
                           "for a file use optimize_file(src, dst)")
    prepared = modelio.prepare(model, input_shapes=input_shapes,
                               freeze_initializer_inputs=freeze_initializer_inputs)
    done, report = _optimize(prepared, rules=rules, alpha=alpha, budget=budget,
                             time_limit_s=time_limit_s, level=level, threads=threads,
                             rounds=rounds, rtol=rtol, atol=atol, seed=seed,
                             cost_model=cost_model, min_speedup=min_speedup,
                             use_cache=use_cache, progress=progress, explain=explain)
    return (model, report) if done is None else (done.proto, report)


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                  external_data_threshold_bytes: int = modelio.EXTERNAL_DATA_THRESHOLD_BYTES,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  freeze_initializer_inputs: bool = False, **options: Any) -> Report:
    """`optimize` from file to file, for models of any size: write the rewritten model to
    `dst` if it is accepted, else the original (`report.accepted` says which).

    The input is read with its external data memory-mapped; the output is written with
    external data (`<dst name>.data`, never one of the input's data files) when the input had
    external data or the output reaches `external_data_threshold_bytes` (default just under
    protobuf's 2 GB limit), else as one file. `dst` is checked before the search
    (`modelio.check_output_path`): not a regular file, the input itself without `overwrite`,
    or an unwritable folder raise RewriteError. Files move into place by rename, so a failure
    leaves `dst` as it was.

    Args:
        src, dst: the input model and the output path.
        overwrite: allow `dst` to be `src` (also through a symlink).
        external_data_threshold_bytes: the output size from which external data is used.
        input_shapes, freeze_initializer_inputs, **options: as for `optimize`.
    Returns:
        The report; `report.notes` says how the model was read and written.
    """
    target = modelio.check_output_path(dst, src=src, overwrite=overwrite)
    prepared = modelio.prepare(src, input_shapes=input_shapes,
                               freeze_initializer_inputs=freeze_initializer_inputs)
    workdir = modelio.workdir_beside(target)
    try:
        done, report = _optimize(prepared, workdir=workdir, name=target.name,
                                 data_name=modelio.data_name_for(target, prepared),
                                 external_threshold_bytes=external_data_threshold_bytes,
                                 **options)
        if done is not None:
            if done.path is None:
                modelio.write_proto(done.proto, target, workdir)
            else:
                modelio.save_finished(done)
                modelio.move_into_place(done, target)
            if done.data_name is not None:
                report.notes.append(f"written with external data in {done.data_name}")
        elif not modelio.write_original(prepared, target, workdir):
            report.notes.append(f"{target} is the input: left as it was")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _optimize(prepared: modelio.Prepared, *, rules: Sequence[Rule] | None = None,
              alpha: float = 1.05, budget: int = 200, time_limit_s: float = 60.0,
              level: str = "all", threads: int = 1, rounds: int = 7, rtol: float = 1e-4,
              atol: float = 1e-5, seed: int = 0, cost_model: CostModel | None = None,
              min_speedup: float = 1.03, use_cache: bool = True,
              progress: Callable[[int, float], None] | None = None, explain: bool = False,
              workdir: str | None = None, name: str = "model.onnx", data_name: str | None = None,
              external_threshold_bytes: int = modelio.EXTERNAL_DATA_THRESHOLD_BYTES
              ) -> tuple[modelio.Finished | None, Report]:
    """Search, then the no-regression guard; (the accepted result or None, the report)."""
    if rules is None:
        from legato.core.rewrite.rules import shipped_rules

        rules = shipped_rules()
    original = prepared.runnable()        # what onnxruntime loads: the proto or the file
    cost_model = cost_model or OrtCostModel(level=level, threads=threads,
                                            use_cache=use_cache)
    result = search(prepared.model, rules, cost_model, alpha=alpha,
                    budget=budget, time_limit_s=time_limit_s, progress=progress)
    if isinstance(cost_model, OrtCostModel):
        cost_model.save()
    settings = {"level": level, "threads": threads, "alpha": alpha, "budget": budget,
                "time_limit_s": time_limit_s, "rounds": rounds, "min_speedup": min_speedup,
                "input_shapes": {k: list(v) for k, v in prepared.input_shapes.items()}}
    report = Report(False, "", result.applied, result.original_cost, result.cost,
                    stop_reason=result.stop_reason, search_s=result.seconds,
                    explored=result.explored, generated=result.generated,
                    tolerance={"rtol": rtol, "atol": atol}, settings=settings,
                    notes=list(prepared.notes))
    if explain:
        from legato.core.rewrite.explain import explain_model

        report.near_misses = [r.to_json() for r in explain_model(prepared.model, rules)]
    if not result.applied:
        report.reason = "no rule lowered the predicted cost"
        return None, report
    try:
        fold_constants(result.model)
    except Exception as err:  # noqa: BLE001 (an operator the reference evaluator lacks)
        report.reason = (f"the rewritten model's new constants could not be computed "
                         f"({type(err).__name__}: {err})")
        return None, report
    try:
        done = modelio.finish(prepared, result.model, workdir=workdir, name=name,
                              data_name=data_name,
                              external_threshold_bytes=external_threshold_bytes)
        report.notes += done.notes
        report.ir_version_change = done.ir_version_change
        candidate = done.runnable()
        a, b = session(original, level=level, threads=threads), session(candidate, level=level,
                                                                         threads=threads)
    except Exception as err:  # noqa: BLE001 (a broken candidate must never come back)
        report.reason = f"the rewritten model did not load ({type(err).__name__}: {err})"
        return None, report
    feeds = [random_feed(prepared.original, seed=seed + k, shapes=prepared.input_shapes)
             for k in range(3)]
    same = compare_outputs(a, b, feeds, rtol=rtol, atol=atol)
    report.max_abs_error, report.max_rel_error = same["max_abs"], same["max_rel"]
    timed = ab_time({"original": a, "rewritten": b}, feeds[0], rounds=rounds)
    report.measured_before_s = timed["original"]["median_s"]
    report.measured_after_s = timed["rewritten"]["median_s"]
    if not same["equal"]:
        report.reason = (f"outputs differ beyond rtol={rtol}, atol={atol} (max abs error "
                         f"{same['max_abs']:.3g}); the original is returned")
        return None, report
    first = report.measured_before_s / report.measured_after_s
    if first < min_speedup:
        report.reason = (f"not measured faster by {min_speedup:.2f}x ("
                         f"{report.measured_after_s * 1e3:.3f} ms against "
                         f"{report.measured_before_s * 1e3:.3f} ms, {first:.3f}x, median of "
                         f"{rounds} rounds)")
        return None, report
    # confirm with fresh sessions in the opposite order: a first win can be drift or noise
    b2, a2 = session(candidate, level=level, threads=threads), session(original, level=level,
                                                                     threads=threads)
    again = ab_time({"rewritten": b2, "original": a2}, feeds[0], rounds=rounds)
    second = again["original"]["median_s"] / again["rewritten"]["median_s"]
    if second < min_speedup:
        report.reason = (f"not measured faster on confirmation: a first A/B measured "
                         f"{first:.3f}x, fresh sessions in the opposite order {second:.3f}x "
                         f"(below {min_speedup:.2f}x)")
        return None, report
    report.measured_before_s = (report.measured_before_s + again["original"]["median_s"]) / 2
    report.measured_after_s = (report.measured_after_s + again["rewritten"]["median_s"]) / 2
    report.accepted = True
    report.reason = (f"measured {report.speedup:.3f}x faster with equal outputs (two A/B runs: "
                     f"{first:.3f}x, {second:.3f}x)")
    meta = dict((p.key, p.value) for p in done.proto.metadata_props)
    meta.update({"legato.rewrite.applied": json.dumps(result.applied),
                 "legato.rewrite.report": json.dumps(report.to_json(), default=str)})
    del done.proto.metadata_props[:]
    for k, v in meta.items():
        done.proto.metadata_props.add(key=k, value=v)
    return done, report
