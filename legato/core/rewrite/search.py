"""TASO's cost-based backtracking search over rewritten graphs (Jia et al., SOSP'19, §5), priced
locally so that it fits a minute on graphs of thousands of nodes.

A priority queue holds candidate graphs by predicted cost. The cheapest is taken out and
*materialized* (its parent copied and its rewrites applied); every match of every rule in it
(within a rule family, only matches no larger member covers: `all_matches`) then makes a child,
and a child whose cost is below `alpha` times the best cost so far joins the queue, so the
search may pass through slightly worse graphs (alpha > 1) to reach better ones. It stops when
the queue is empty, after `budget` graphs taken out, or at `time_limit_s` (`StopReason`).

What makes it fast [Note: local pricing]: a child is not copied when it is made. Its rewrite is
tried in place on its parent (the target's nodes are built, the readers of the replaced values
pointed at them, and all of it undone afterwards), and only the segments the rewrite touches
are priced (`segments.segments_touching`): the child's cost is the parent's plus the new
segments' minus the old ones'. Its structural hash (a sum of per-node signatures: operator,
attributes, and what produces each input) is updated the same way. Only the graphs taken out
of the queue, at most `budget`, are ever copied. The segments priced for all children of one
graph are measured together, interleaved.

Independent rewrites of one rule (58 Conv+BatchNorm folds in DenseNet-121) would otherwise be
explored one subset at a time; so each graph also gets one child that applies all of a rule's
non-overlapping matches that may lower the cost, and at most `max_children_per_rule` children
per rule join the queue.

Uncertainty: each price carries its measured spread; a candidate's `error_s` sums, in
quadrature, the errors of every segment its rewrites changed. A child whose cost is within
twice its error of the bar (alpha times the best) is queued as if below it: where the model
cannot tell, the search keeps going rather than dropping the branch. `SearchResult.contenders` lists
the best few candidates whose predicted gain or loss over the original lies within that error,
and the best rewritten graph even when it is predicted slower, for `optimize` to measure
instead of trusting the prediction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import math
import time
from typing import Any, Callable, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from legato.core.rewrite import segments as seg
from legato.core.rewrite._matcher import (Match, apply, build_target, find_matches, infer_shapes,
                                          target_fits_opset)
from legato.core.rewrite.cost import CostModel, Price, constant_values, graph_price
from legato.core.rewrite.pattern import Rule, split_ref
from legato.core.stop import StopReason

__all__ = ["Candidate", "SearchResult", "all_matches", "search", "structural_hash"]

log = logging.getLogger(__name__)

_MASK = (1 << 64) - 1


@dataclasses.dataclass
class Candidate:
    """A graph the search found: its model (materialized), predicted cost and uncertainty,
    the rules applied to reach it, and the cache keys of the segments it was priced with."""

    model: ir.Model
    cost: float
    error_s: float
    applied: list[str]


@dataclasses.dataclass
class SearchResult:
    """The best graph found and how the search went."""

    model: ir.Model
    cost: float
    original_cost: float
    applied: list[str]
    explored: int
    generated: int
    stop_reason: StopReason    # EXHAUSTED (queue empty), BUDGET or TIME_LIMIT
    seconds: float
    original_error_s: float = 0.0
    error_s: float = 0.0
    matched: int = 0           # matches found in the original graph (0: costs are NaN, since
                               # nothing was priced)
    contenders: list[Candidate] = dataclasses.field(default_factory=list)
    original: ir.Model | None = None      # the input as searched (shapes inferred)
    original_keys: frozenset[str] = frozenset()   # cost entries its price used


# ---------------------------------------------------------------------- signatures


def _ref(value: ir.Value, graph: ir.Graph, inputs: dict[int, int], inits: dict[int, str]
         ) -> tuple:
    if id(value) in inputs:
        return ("in", inputs[id(value)])
    if id(value) in inits:
        return ("init", inits[id(value)])
    producer = value.producer()
    if producer is None:
        return ("outer", value.name)
    return (producer.domain, producer.op_type, seg.attr_digest(producer), value.index())


class _Signer:
    """Per-node signatures of one graph: operator, attributes, and each input's producer
    (operator, attributes, output index) or its graph input or initializer name. Their sum
    modulo 2**64, with the graph outputs', hashes the graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.inputs = {id(v): i for i, v in enumerate(graph.inputs)}
        self.inits = {id(v): name for name, v in graph.initializers.items()}

    def node(self, node: ir.Node) -> int:
        refs = tuple(("",) if v is None else _ref(v, self.graph, self.inputs, self.inits)
                     for v in node.inputs)
        blob = repr((node.domain, node.op_type, seg.attr_digest(node), refs, len(node.outputs)))
        return int.from_bytes(hashlib.blake2b(blob.encode(), digest_size=8).digest(), "little")

    def output(self, index: int, value: ir.Value) -> int:
        blob = repr(("out", index, _ref(value, self.graph, self.inputs, self.inits)))
        return int.from_bytes(hashlib.blake2b(blob.encode(), digest_size=8).digest(), "little")

    def total(self, dead: frozenset[int] = frozenset()) -> int:
        h = sum(self.node(n) for n in self.graph if id(n) not in dead)
        h += sum(self.output(i, v) for i, v in enumerate(self.graph.outputs))
        return h & _MASK


def structural_hash(graph: ir.Graph) -> str:
    """A hash of the computation: operators, attributes and how values flow (not names)."""
    return f"{_Signer(graph).total():016x}"


# ---------------------------------------------------------------------- the search state


def _infer_shapes(model: ir.Model) -> None:
    common_passes.ShapeInferencePass(strict_mode=False)(model)


@dataclasses.dataclass
class _Node:
    """A graph in the queue: materialized (`model` set) or a parent plus matches to apply."""

    cost: float
    error_s: float
    applied: list[str]
    hash: int
    parent: "_Node | None" = None
    matches: list[Match] = dataclasses.field(default_factory=list)
    model: ir.Model | None = None


def _transfer(m: Match, source: ir.Graph, copy: ir.Graph) -> Match:
    """The same match in a clone of its graph (nodes keep their order in a clone)."""
    position = {id(n): i for i, n in enumerate(source)}
    nodes = list(copy)
    inputs = {id(v): i for i, v in enumerate(source.inputs)}
    inits = {id(v): name for name, v in source.initializers.items()}

    def value(v: ir.Value) -> ir.Value:
        if id(v) in inputs:
            return copy.inputs[inputs[id(v)]]
        if id(v) in inits:
            return copy.initializers[inits[id(v)]]
        producer = v.producer()
        return nodes[position[id(producer)]].outputs[v.index()]

    return Match(m.rule, {k: value(v) for k, v in m.values.items()},
                 {k: nodes[position[id(n)]] for k, n in m.nodes.items()}, dict(m.attrs))


def _materialize(item: _Node) -> ir.Model:
    """Copy the parent's model and apply the item's matches (all of them found in the
    parent, touching disjoint nodes)."""
    parent = item.parent.model
    copy = parent.clone()
    moved = [_transfer(m, parent.graph, copy.graph) for m in item.matches]
    complete = True
    for m in moved:
        complete &= infer_shapes(apply(copy.graph, m))
    if not complete:
        _infer_shapes(copy)
    return copy


def _rewrite(model: ir.Model, m: Match) -> ir.Model:
    """A copy of `model` with the match applied (shapes of new values from legato's operator
    semantics, whole-graph inference only when those cannot)."""
    copy = model.clone()
    if not infer_shapes(apply(copy.graph, _transfer(m, model.graph, copy.graph))):
        _infer_shapes(copy)
    return copy


def _ordered_rules(rules: Sequence[Rule]) -> list[Rule]:
    """Rules in the order the search tries them: each family's members by falling arity, at
    the place of the family's first member; other rules where they are."""
    out: list[Rule] = []
    placed: set[str] = set()
    for rule in rules:
        if not rule.family:
            out.append(rule)
        elif rule.family not in placed:
            placed.add(rule.family)
            out += sorted((r for r in rules if r.family == rule.family),
                          key=lambda r: -len(r.source.outputs))
    return out


def all_matches(graph: ir.Graph, rules: Sequence[Rule], *, limit: int | None = None
                ) -> list[Match]:
    """The matches the search expands: every rule's (at most `limit` each), except that within
    a family a member's match is dropped when a larger member's match already took any of
    its roots (k branches merge in one step, not through k - 2 partial merges)."""
    found: list[Match] = []
    taken: dict[str, set[int]] = {}
    for rule in _ordered_rules(rules):
        exclude = frozenset(taken.get(rule.family, ())) if rule.family else frozenset()
        matches = find_matches(graph, rule, limit=limit, exclude_roots=exclude)
        if rule.family:
            roots = taken.setdefault(rule.family, set())
            for m in matches:
                roots.update(id(n) for n in m.root_nodes())
        found += matches
    return found


# ---------------------------------------------------------------------- trying a rewrite


@dataclasses.dataclass
class _Trial:
    """A match tried in place: the segments it removes and adds (as tickets), the change of
    the graph's hash, and the nodes it touches (for telling independent matches apart)."""

    match: Match
    before: list[Any]
    after: list[Any]
    hash_delta: int
    touched: frozenset[int]
    delta: float = 0.0
    error_s: float = 0.0


class _Pricer:
    """Prices the children of one materialized graph."""

    def __init__(self, model: ir.Model, cost_model: CostModel) -> None:
        self.model = model
        self.graph = model.graph
        self.cost_model = cost_model
        self.constants = constant_values(self.graph)[0]
        self.view = seg.View(self.graph, self.constants)
        self.signer = _Signer(self.graph)
        self._before: dict[tuple, Any] = {}

    def _live_producers(self, values, view: seg.View) -> list[ir.Node]:
        out = []
        for v in values:
            p = v.producer() if v is not None else None
            if view.live(p) and p.graph is self.graph:
                out.append(p)
        return out

    def trial(self, m: Match) -> _Trial | None:
        """Try `m` in place and undo it; None when its new values' shapes cannot be inferred
        locally (the child is then priced whole when it is taken out)."""
        removed = list(m.nodes.values())
        removed_ids = frozenset(id(n) for n in removed)
        view = self.view
        # the world before, priced before the target's nodes exist (they read the match's
        # values, and would count as their readers)
        old_roots = [m.nodes[split_ref(r)[0]].outputs[split_ref(r)[1]]
                     for r in m.rule.source.outputs]
        readers = {id(c): c for old in old_roots for c in view.consumers(old)
                   if id(c) not in removed_ids}
        in_values = [v for n in removed for v in n.inputs] + list(m.values.values())
        producers = self._live_producers(in_values, view)
        touched_before = [*removed, *producers, *readers.values()]
        before = []
        for key, part in self.cost_model.touching(touched_before, view).items():
            if key not in self._before:
                self._before[key] = self.cost_model.ticket(part, view)
            before.append(self._before[key])
        new_nodes, new_roots, old_roots = build_target(m)
        rewired: list[tuple[ir.Node, int, ir.Value]] = []
        try:
            if not infer_shapes(new_nodes):
                return None
            for old, new in zip(old_roots, new_roots):
                if old.shape is not None and new.shape is None:
                    new.shape = old.shape
                if old.dtype is not None and new.dtype is None:
                    new.dtype = old.dtype
            sig = self.signer
            h_before = sum(sig.node(n) for n in removed) + sum(sig.node(c)
                                                              for c in readers.values())
            outputs = list(self.graph.outputs)
            out_pos = {id(v): i for i, v in enumerate(outputs)}
            h_before += sum(sig.output(out_pos[id(o)], o) for o in old_roots if id(o) in out_pos)
            # rewire the readers of the replaced values to the new ones
            for old, new in zip(old_roots, new_roots):
                for use in list(old.uses()):
                    if id(use.node) in removed_ids:
                        continue
                    rewired.append((use.node, use.idx, old))
                    use.node.replace_input_with(use.idx, new)
            consts = set(self.constants)
            for n in new_nodes:
                ins = [v for v in n.inputs if v is not None]
                if n.op_type == "Constant" or (ins and all(id(v) in consts for v in ins)):
                    consts.update(id(o) for o in n.outputs)
            outs_after = set(view.outputs)
            for old, new in zip(old_roots, new_roots):
                if id(old) in outs_after:
                    outs_after.discard(id(old))
                    outs_after.add(id(new))
            after_view = seg.View(self.graph, consts, dead=removed_ids, outputs=outs_after)
            live_producers = [p for p in producers if id(p) not in removed_ids]
            touched_after = [*new_nodes, *live_producers, *readers.values()]
            after = [self.cost_model.ticket(part, after_view)
                     for part in self.cost_model.touching(touched_after, after_view).values()]
            h_after = sum(sig.node(n) for n in new_nodes) + sum(sig.node(c)
                                                               for c in readers.values())
            for old, new in zip(old_roots, new_roots):
                if id(old) in out_pos:
                    h_after += sig.output(out_pos[id(old)], new)
            touched = frozenset(id(n) for n in [*touched_before, *new_nodes])
            return _Trial(m, before, after, (h_after - h_before) & _MASK, touched)
        finally:
            for node, index, old in reversed(rewired):
                node.replace_input_with(index, old)
            for n in new_nodes:
                for i in range(len(n.inputs)):
                    n.replace_input_with(i, None)


def _price(trials: list[_Trial], cost_model: CostModel) -> None:
    """Settle every trial's tickets in one measurement (interleaved), then each delta."""
    tickets = [t for trial in trials for t in (*trial.before, *trial.after)]
    prices: list[Price] = cost_model.settle(tickets)
    i = 0
    for trial in trials:
        nb, na = len(trial.before), len(trial.after)
        pb, pa = prices[i:i + nb], prices[i + nb:i + nb + na]
        i += nb + na
        trial.delta = sum(p.seconds for p in pa) - sum(p.seconds for p in pb)
        trial.error_s = math.sqrt(sum(p.error_s ** 2 for p in (*pa, *pb)))


def _independent(trials: list[_Trial]) -> list[_Trial]:
    """Trials of one rule that may lower the cost (a gain, or a loss within twice its error)
    and touch disjoint nodes, best first."""
    chosen, used = [], set()
    for t in sorted(trials, key=lambda t: t.delta):
        if t.delta >= 2 * t.error_s:
            continue
        if used.isdisjoint(t.touched):
            chosen.append(t)
            used |= t.touched
    return chosen


def search(model: ir.Model, rules: Sequence[Rule], cost_model: CostModel, *,
           alpha: float = 1.05, budget: int = 200, time_limit_s: float = 60.0,
           max_matches_per_rule: int = 64, max_children_per_rule: int = 4,
           contenders: int = 3,
           progress: Callable[[int, float], None] | None = None) -> SearchResult:
    """Search for the cheapest graph reachable from `model` by `rules` (see the module doc).

    Args:
        model: the model to rewrite (not modified).
        rules: the rules to apply.
        cost_model: what a graph costs.
        alpha: keep candidates up to alpha times the best cost (TASO: 1.05).
        budget: graphs taken out of the queue before stopping.
        time_limit_s: wall-clock limit.
        max_matches_per_rule: matches of one rule tried per graph.
        max_children_per_rule: children of one rule (the cheapest) queued per graph.
        contenders: how many unsure candidates to hand back for measuring.
        progress: called with (graphs explored, best cost) after each graph.
    Returns:
        A `SearchResult` with the best model (a copy) and the rules applied to reach it.
    """
    start = time.perf_counter()
    deadline = start + time_limit_s
    root_model = model.clone()
    _infer_shapes(root_model)
    cost_model.bind(root_model)
    opset = root_model.opset_imports.get("", root_model.opset_imports.get("ai.onnx", 17))
    rules = [r for r in rules if target_fits_opset(r, opset)]
    root_matches = all_matches(root_model.graph, rules, limit=max_matches_per_rule)
    if not root_matches:                # nothing to search: the original is not even priced
        return SearchResult(root_model, math.nan, math.nan, [], 0, 0, StopReason.EXHAUSTED,
                            time.perf_counter() - start, original=root_model)
    base, base_error, base_keys = graph_price(root_model.graph, cost_model)
    root = _Node(base, 0.0, [], _Signer(root_model.graph).total(), model=root_model)
    counter = itertools.count()
    queue: list[tuple[float, int, _Node]] = [(base, next(counter), root)]
    seen = {root.hash}
    best = root
    generated: list[_Node] = []                     # every child made, for the contenders
    explored, matched = 0, len(root_matches)
    stop = StopReason.EXHAUSTED
    while queue:
        if explored >= budget:
            stop = StopReason.BUDGET
            break
        if time.perf_counter() > deadline:   # (also when pricing the original took it all)
            stop = StopReason.TIME_LIMIT
            break
        _, _, item = heapq.heappop(queue)
        if item.model is None:
            try:
                item.model = _materialize(item)
            except Exception as err:  # noqa: BLE001 (a rewrite that cannot apply is dropped)
                log.debug("rewrite %s failed to apply: %s", item.applied[-1:], err)
                continue
        explored += 1
        matches = (root_matches if item is root else
                   all_matches(item.model.graph, rules, limit=max_matches_per_rule))
        pricer = _Pricer(item.model, cost_model)
        trials, whole = [], []
        for m in matches:
            if time.perf_counter() > deadline:
                break
            try:
                t = pricer.trial(m)
            except Exception as err:  # noqa: BLE001 (a rule that cannot apply is skipped)
                log.debug("rule %s failed to apply: %s", m.rule.name, err)
                continue
            if t is None:
                whole.append(m)
            else:
                trials.append(t)
        _price(trials, cost_model)
        children: list[_Node] = []
        by_rule: dict[str, list[_Trial]] = {}
        for t in trials:
            by_rule.setdefault(t.match.rule.name, []).append(t)
        for name, group in by_rule.items():
            group.sort(key=lambda t: t.delta)
            for t in group:
                children.append(_Node(item.cost + t.delta,
                                      math.hypot(item.error_s, t.error_s),
                                      item.applied + [name], (item.hash + t.hash_delta) & _MASK,
                                      parent=item, matches=[t.match]))
            batch = _independent(group)
            if len(batch) >= 2:
                children.append(_Node(
                    item.cost + sum(t.delta for t in batch),
                    math.hypot(item.error_s, *(t.error_s for t in batch)),
                    item.applied + [name] * len(batch),
                    (item.hash + sum(t.hash_delta for t in batch)) & _MASK,
                    parent=item, matches=[t.match for t in batch]))
        for m in whole:                              # priced on the whole rewritten graph
            try:
                copy = _rewrite(item.model, m)
                cost, error, _ = graph_price(copy.graph, cost_model)
            except Exception as err:  # noqa: BLE001
                log.debug("rule %s failed to apply: %s", m.rule.name, err)
                continue
            children.append(_Node(cost, math.hypot(item.error_s, error, base_error),
                                  item.applied + [m.rule.name],
                                  _Signer(copy.graph).total(), model=copy))
        queued: dict[str, int] = {}
        for child in sorted(children, key=lambda c: c.cost):
            if child.hash in seen:
                continue
            seen.add(child.hash)
            generated.append(child)
            rule = child.applied[-1]
            # unsure (within twice its error of the bar) counts as below it: kept exploring
            if (child.cost - 2 * child.error_s < alpha * best.cost
                    and queued.get(rule, 0) < max_children_per_rule):
                queued[rule] = queued.get(rule, 0) + 1
                heapq.heappush(queue, (child.cost, next(counter), child))
            if child.cost < best.cost:
                best = child
        if progress is not None:
            progress(explored, best.cost)
    if best.model is None:
        try:
            best.model = _materialize(best)
        except Exception as err:  # noqa: BLE001 (never taken out, it could not be applied)
            log.debug("the best rewrite failed to apply: %s", err)
            generated = [c for c in generated if c is not best]
            best = root
    picked = _contenders(root, best, generated, contenders)
    out = []
    for c in picked:
        try:
            if c.model is None:
                c.model = _materialize(c)
        except Exception as err:  # noqa: BLE001
            log.debug("contender failed to apply: %s", err)
            continue
        out.append(Candidate(c.model, c.cost, c.error_s, c.applied))
    return SearchResult(best.model, best.cost, base, best.applied, explored, len(generated),
                        stop, time.perf_counter() - start, original_error_s=base_error,
                        error_s=best.error_s, matched=matched, contenders=out,
                        original=root_model, original_keys=frozenset(base_keys))


def _contenders(root: _Node, best: _Node, generated: list[_Node], k: int) -> list[_Node]:
    """Candidates worth measuring besides the best (at most `k`): the cheapest of the most
    rewritten graphs (a merge alone may cost more, and the gain come only with the Add that
    follows it: NasRNN at one thread; or the prediction may stop short of the gain), when none
    was predicted faster the cheapest rewritten graph, and those whose predicted difference
    from the original lies within twice its uncertainty, cheapest first, so that a wrong price
    is caught rather than trusted."""
    if k <= 0 or not generated:
        return []
    out: list[_Node] = []
    deepest = max(len(c.applied) for c in generated)
    if deepest > len(best.applied):
        out.append(min((c for c in generated if len(c.applied) == deepest),
                       key=lambda c: c.cost))
    if best is root:
        cheapest = min(generated, key=lambda c: c.cost)
        if all(c is not cheapest for c in out):
            out.append(cheapest)
    unsure = sorted((c for c in generated if c is not best and all(c is not o for o in out)
                     and c.cost - 2 * c.error_s < root.cost), key=lambda c: c.cost - c.error_s)
    out += unsure
    return out[:k]
