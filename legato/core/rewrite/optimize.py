"""`optimize(model)`: search for a faster equivalent graph, and return it only if it is
measured faster and computes the same outputs; otherwise the original, with the reason.

Steps: check the model; TASO's search with the given rules and cost model (`search.py`); for
the best graph and the candidates the search could not rank (`SearchResult.contenders`), fold
the constant subgraphs the rules produced (weights concatenated or scaled) into initializers
with onnxscript's constant folder; then the guard (`guard.py`): an output comparison on random
inputs and a whole-model A/B in onnxruntime with the same settings (interleaved rounds,
per-round ratios), confirmed by a second one. Where the measurements contradict the predicted
gain, the cost entries behind it are measured again and, if they moved, the search runs once
more within the time limit left. The returned model carries, in `metadata_props`, the rules
applied and the costs and times measured (`legato.rewrite.*`; `Report.explain()` prints
them).

`modelio.py` reads the model in (`prepare`) and gives the result back the input's form
(`finish`): valid for its IR version, inputs and symbolic dimensions as they were, external data
kept. `optimize` takes a ModelProto under 2 GB; `optimize_file` takes paths and handles any size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import onnx
import onnx_ir as ir

from legato.core.rewrite import modelio
from legato.core.rewrite.cost import CostModel, OrtCostModel, foldable, graph_price
from legato.core.rewrite.guard import Offer, judge
from legato.core.rewrite.measure import random_feed
from legato.core.rewrite.modelio import ORIGINAL_NODE, RewriteError
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.search import Candidate, search

__all__ = ["Report", "RewriteError", "fold_constants", "optimize", "optimize_file"]

log = logging.getLogger(__name__)


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
    # every candidate the guard measured (best predicted and the unsure ones): predicted and
    # measured time, ratio, noise, equal outputs, why it was not taken
    candidates: list[dict] = dataclasses.field(default_factory=list)
    searches: int = 1          # 2 when the guard contradicted the cost model and it re-searched
    remeasured: int = 0        # cost entries measured again because of such a contradiction

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
        if math.isnan(self.predicted_before_s):
            lines.append("predicted cost: not priced (no rule matches)")
        else:
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
    """Replace the nodes the rules made that compute from constants only (concatenated or
    scaled weights, a band matrix) by initializers, with onnxscript's constant folder, then
    drop what no longer feeds anything; returns how many nodes were folded.

    Nodes of the user's graph (marked by `modelio.prepare`) are not folded: a DequantizeLinear
    of int8 weights or a ConstantOfShape of a fill stays as the user wrote it (onnxruntime
    fuses the one and folds the other itself). The folder works on a model of its own holding
    the rules' constant nodes and the user's constant nodes they read (sharing the tensors, not
    copying them), so only what is needed is computed."""
    try:
        import onnxscript.optimizer
    except ImportError as err:
        raise RewriteError(f"folding the rules' new constants needs onnxscript ({err}); "
                           "install it: pip install onnxscript (legato[onnx] brings it)") from err

    graph = model.graph
    foldable_ids = foldable(graph)
    targets = [n for n in graph if id(n) in foldable_ids and not n.meta.get(ORIGINAL_NODE)]
    if not targets:
        return 0
    target_ids = {id(n) for n in targets}
    outputs = {id(v) for v in graph.outputs}
    frontier = [v for n in targets for v in n.outputs
                if id(v) in outputs or any(id(u.node) not in target_ids for u in v.uses())]
    # the nodes needed, in graph (topological) order: the targets and their constant ancestors
    needed: set[int] = set()
    stack = list(targets)
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack += [v.producer() for v in node.inputs
                  if v is not None and v.producer() is not None]
    values: dict[int, ir.Value] = {}

    def copy(v: ir.Value) -> ir.Value:
        if id(v) not in values:               # an initializer: the same tensor, not a copy
            values[id(v)] = ir.Value(name=v.name, shape=v.shape, type=v.type,
                                     const_value=v.const_value)
        return values[id(v)]

    nodes = []
    for node in graph:
        if id(node) not in needed:
            continue
        clone = ir.Node(node.domain, node.op_type,
                        inputs=[None if v is None else copy(v) for v in node.inputs],
                        attributes=list(node.attributes.values()),
                        num_outputs=len(node.outputs), version=node.version)
        for old, new in zip(node.outputs, clone.outputs):
            new.shape, new.type, new.name = old.shape, old.type, old.name
            values[id(old)] = new
        nodes.append(clone)
    inits = [v for k, v in values.items() if v.const_value is not None and v.producer() is None]
    sub = ir.Model(ir.Graph(inputs=[], outputs=[values[id(v)] for v in frontier], nodes=nodes,
                            initializers=inits, opset_imports=dict(model.opset_imports)),
                   ir_version=max(model.ir_version, 8))
    chatty = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = chatty.level
    if not log.isEnabledFor(logging.DEBUG):       # it logs every node it folds at INFO
        chatty.setLevel(logging.WARNING)
    try:
        onnxscript.optimizer.fold_constants(sub, input_size_limit=1 << 62,
                                            output_size_limit=1 << 62,
                                            should_fold=lambda node: True)
    except Exception as err:  # noqa: BLE001 (said as the reason the candidate is dropped)
        raise RewriteError(f"the rules' new constants could not be computed "
                           f"({type(err).__name__}: {err})") from err
    finally:
        chatty.setLevel(level)
    for old, new in zip(frontier, sub.graph.outputs):
        tensor = new.const_value
        if tensor is None:
            producer = old.producer()
            raise RewriteError(f"the rules' new constant {old.name!r} ({producer.op_type}) "
                               "could not be computed by onnxscript's constant folder")
        arr = tensor.numpy()
        init = ir.Value(name=_fresh(graph, old.name), shape=ir.Shape(arr.shape),
                        type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                        const_value=ir.tensor(arr))
        for i, gout in enumerate(graph.outputs):
            if gout is old:                          # a graph output keeps its name
                name, old.name = old.name, None
                init.name = name
                graph.outputs[i] = init
        graph.register_initializer(init)
        ir.convenience.replace_all_uses_with(old, init)
    _drop_unused(graph)
    return len(targets)


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
    settings = {"level": level, "threads": threads, "alpha": alpha, "budget": budget,
                "time_limit_s": time_limit_s, "rounds": rounds, "min_speedup": min_speedup,
                "input_shapes": {k: list(v) for k, v in prepared.input_shapes.items()}}
    measuring = isinstance(cost_model, OrtCostModel)
    remeasured = 0
    feeds = None                              # made only when there is something to check
    carried: list[Offer] = []                 # the first attempt's fastest, measured again
    searched_s = 0.0                          # the time limit bounds both searches together
    for attempt in range(2):
        result = search(prepared.model, rules, cost_model, alpha=alpha, budget=budget,
                        time_limit_s=max(time_limit_s - searched_s, 0.0), progress=progress)
        searched_s += result.seconds
        cost_model.save()
        report = Report(False, "", result.applied, result.original_cost, result.cost,
                        stop_reason=result.stop_reason, search_s=searched_s,
                        explored=result.explored, generated=result.generated,
                        tolerance={"rtol": rtol, "atol": atol}, settings=settings,
                        notes=list(prepared.notes), searches=attempt + 1,
                        remeasured=remeasured)
        if explain and attempt == 0:
            from legato.core.rewrite.explain import explain_model

            near_misses = [r.to_json() for r in explain_model(prepared.model, rules)]
        if explain:
            report.near_misses = near_misses
        candidates = ([Candidate(result.model, result.cost, result.error_s, result.applied)]
                      if result.applied else []) + list(result.contenders)
        if workdir is not None and (prepared.external or modelio._model_bytes(
                prepared.model, prepared) >= external_threshold_bytes // 2):
            candidates = candidates[:1]      # a model on disk: one copy of it written
        if not candidates:
            if not result.matched:
                report.reason = "no rule matches the model"
            elif result.explored == 0:
                report.reason = (f"the time limit ({time_limit_s:g} s) ran out while the "
                                 f"original was being priced ({result.seconds:.1f} s), before "
                                 f"any of its {result.matched} matches was tried; raise "
                                 "time_limit_s (--time-limit-s)")
            else:
                report.reason = ("no rewrite found (every rewrite the rules allow was "
                                 "predicted slower beyond doubt)")
            return None, report
        if feeds is None:
            try:
                feeds = [random_feed(prepared.original, seed=seed + k,
                                     shapes=prepared.input_shapes) for k in range(3)]
            except RewriteError as err:      # a type legato cannot make values for
                report.reason = (f"{len(candidates)} rewritten candidate(s) found, but none "
                                 f"can be checked: {err}")
                return None, report
        offers, original_keys = [], set(result.original_keys)
        for k, cand in enumerate(candidates):
            label = "best" if k == 0 and result.applied else f"contender {k}"
            keys = frozenset(graph_price(cand.model.graph, cost_model)[2])
            work = cand.model.clone()
            where = None                     # each candidate written in a folder of its own
            if workdir is not None:
                where = os.path.join(workdir, f"candidate-{attempt}-{k}")
                os.makedirs(where, exist_ok=True)
            try:
                fold_constants(work)
                done = modelio.finish(prepared, work, workdir=where, name=name,
                                      data_name=data_name,
                                      external_threshold_bytes=external_threshold_bytes)
            except Exception as err:  # noqa: BLE001 (a broken candidate must never come back)
                first = str(err).splitlines()[0] if str(err) else ""
                report.candidates.append({"label": label, "rules": len(cand.applied),
                                          "why": f"not valid ({type(err).__name__}: {first})"})
                continue
            offers.append(Offer(label, cand.applied, cand.cost, cand.error_s, done.runnable(),
                                keys, payload=(cand, done)))
        for old in carried:                    # so that searching again never loses it
            offers.append(Offer(f"{old.label} (first search)", old.applied, old.predicted_s,
                                old.error_s, old.runnable, old.keys, payload=old.payload))
        if not offers:
            report.reason = "no rewritten model was valid: " + "; ".join(
                f"{c['label']}: {c['why']}" for c in report.candidates)
            return None, report
        verdict = judge(original, offers, predicted_original_s=result.original_cost,
                        original_error_s=result.original_error_s, feeds=feeds, level=level,
                        threads=threads, rounds=rounds, rtol=rtol, atol=atol,
                        min_speedup=min_speedup)
        report.candidates += [o.to_json() for o in offers]
        report.measured_before_s = verdict.original_s
        shown = verdict.chosen or max((o for o in offers if o.ratio is not None),
                                      key=lambda o: o.ratio, default=offers[0])
        report.measured_after_s = shown.measured_s
        report.max_abs_error, report.max_rel_error = shown.max_abs, shown.max_rel
        if shown is not offers[0] or not result.applied:
            report.applied = list(shown.applied)
            report.predicted_after_s = shown.predicted_s
        # [Note: checked against reality] a measured gain the prediction contradicts beyond
        # the noise of both means some cost entries are wrong (a noisy sample, another load):
        # the entries the two graphs do not share are measured again, and if any moved, the
        # search runs once more with them
        suspects: set[str] = set()
        for offer in verdict.disagree:
            suspects |= set(offer.keys) ^ original_keys
        if verdict.original_s and abs(math.log(result.original_cost / verdict.original_s)) \
                > math.log(1.5):
            suspects |= original_keys
        if suspects and measuring and attempt == 0:
            cost_model.spec_for(result.original.graph, suspects)
            for offer in offers:
                cost_model.spec_for(offer.payload[0].model.graph, suspects)
            moved = cost_model.remeasure(suspects)
            remeasured += len(moved)
            changed = [k for k, (old, new) in moved.items()
                       if abs(math.log(max(new, 1e-9) / max(old, 1e-9))) > math.log(1.25)]
            cost_model.save()
            left = time_limit_s - searched_s
            if changed and verdict.chosen is None and left < 0.25 * time_limit_s:
                report.notes.append(
                    f"the whole-model A/B contradicted the predicted gain: {len(moved)} cost "
                    f"entries measured again, {len(changed)} moved by more than 25%; not "
                    f"searched again: {left:.0f} s of the {time_limit_s:g} s time limit left")
            elif changed and verdict.chosen is None:
                carried = sorted((o for o in offers if o.ratio is not None),
                                 key=lambda o: -o.ratio)[:1]
                prepared.notes.append(
                    f"the whole-model A/B contradicted the predicted gain: {len(moved)} cost "
                    f"entries measured again, {len(changed)} moved by more than 25%; searched "
                    "again with them")
                continue
            report.remeasured = remeasured
        if isinstance(cost_model, OrtCostModel) and not verdict.disagree and verdict.original_s:
            cost_model.cache.confirm(original_keys | set().union(*(o.keys for o in offers)))
            cost_model.save()
        break
    report.reason = verdict.reason
    if verdict.chosen is None:
        return None, report
    chosen_cand, done = verdict.chosen.payload
    report.accepted = True
    report.applied = list(chosen_cand.applied)
    report.predicted_after_s = chosen_cand.cost
    report.measured_after_s = verdict.chosen.measured_s
    report.notes += done.notes
    report.ir_version_change = done.ir_version_change
    meta = dict((p.key, p.value) for p in done.proto.metadata_props)
    meta.update({"legato.rewrite.applied": json.dumps(report.applied),
                 "legato.rewrite.report": json.dumps(report.to_json(), default=str)})
    del done.proto.metadata_props[:]
    for k, v in meta.items():
        done.proto.metadata_props.add(key=k, value=v)
    return done, report
