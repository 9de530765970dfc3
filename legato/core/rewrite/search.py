"""TASO's cost-based backtracking search over rewritten graphs (Jia et al., SOSP'19, §5).

A priority queue holds candidate graphs by cost. The cheapest is taken out; every match of
every rule is applied to a copy of it (within a rule family, only matches no larger member
covers: `all_matches`), and each new graph (deduplicated by a structural hash)
whose cost is below `alpha` times the best cost so far joins the queue, so the search may pass
through slightly worse graphs (alpha > 1) to reach better ones. It stops when the queue is
empty, after `budget` graphs taken out, or at `time_limit_s`; `stop_reason` says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import time
from typing import Callable, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from legato.core.rewrite._matcher import Match, apply, find_matches, infer_shapes
from legato.core.rewrite.cost import CostModel, graph_cost
from legato.core.rewrite.pattern import Rule
from legato.core.stop import StopReason

__all__ = ["SearchResult", "all_matches", "search", "structural_hash"]

log = logging.getLogger(__name__)


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


def structural_hash(graph: ir.Graph) -> str:
    """A hash of the computation: operators, attributes and how values flow (not names)."""
    keys: dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        keys[id(v)] = f"in{i}"
    for name, v in graph.initializers.items():
        keys[id(v)] = f"init:{name}"
    parts = []
    for node in graph:
        attrs = sorted((k, repr(a.value)) for k, a in node.attributes.items())
        ins = tuple(keys.get(id(v), "?") if v is not None else "" for v in node.inputs)
        h = hashlib.sha1(repr((node.domain, node.op_type, attrs, ins)).encode()).hexdigest()[:16]
        for j, out in enumerate(node.outputs):
            keys[id(out)] = f"{h}:{j}"
        parts.append(h)
    outs = tuple(keys.get(id(v), "?") for v in graph.outputs)
    return hashlib.sha1(repr((sorted(parts), outs)).encode()).hexdigest()


def _infer_shapes(model: ir.Model) -> None:
    common_passes.ShapeInferencePass(strict_mode=False)(model)


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


def _rewrite(model: ir.Model, m: Match) -> ir.Model:
    """A copy of `model` with the match applied; shapes of new values from legato's operator
    semantics (whole-graph inference only when those cannot)."""
    copy = model.clone()
    new_nodes = apply(copy.graph, _transfer(m, model.graph, copy.graph))
    if not infer_shapes(new_nodes):
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


def search(model: ir.Model, rules: Sequence[Rule], cost_model: CostModel, *,
           alpha: float = 1.05, budget: int = 200, time_limit_s: float = 60.0,
           max_matches_per_rule: int = 64,
           progress: Callable[[int, float], None] | None = None) -> SearchResult:
    """Search for the cheapest graph reachable from `model` by `rules` (see the module doc).

    Args:
        model: the model to rewrite (not modified).
        rules: the rules to apply.
        cost_model: what a graph costs (`graph_cost`).
        alpha: keep candidates up to alpha times the best cost (TASO: 1.05).
        budget: graphs taken out of the queue before stopping.
        time_limit_s: wall-clock limit.
        max_matches_per_rule: matches of one rule tried per graph.
        progress: called with (graphs explored, best cost) after each graph.
    Returns:
        A `SearchResult` with the best model (a copy) and the rules applied to reach it.
    """
    start = time.perf_counter()
    root = model.clone()
    _infer_shapes(root)
    base = graph_cost(root.graph, cost_model)
    counter = itertools.count()
    queue = [(base, next(counter), root, [])]
    seen = {structural_hash(root.graph)}
    best_cost, best_model, best_applied = base, root, []
    explored = generated = 0
    stop = StopReason.EXHAUSTED
    while queue:
        if explored >= budget:
            stop = StopReason.BUDGET
            break
        if time.perf_counter() - start > time_limit_s:
            stop = StopReason.TIME_LIMIT
            break
        cost, _, current, applied = heapq.heappop(queue)
        explored += 1
        for m in all_matches(current.graph, rules, limit=max_matches_per_rule):
            rule = m.rule
            try:
                new = _rewrite(current, m)
            except Exception as err:  # noqa: BLE001 (a rule that cannot apply is skipped)
                log.debug("rule %s failed to apply: %s", rule.name, err)
                continue
            key = structural_hash(new.graph)
            if key in seen:
                continue
            seen.add(key)
            generated += 1
            new_cost = graph_cost(new.graph, cost_model)
            if new_cost < alpha * best_cost:      # against the best before it (TASO's order)
                heapq.heappush(queue, (new_cost, next(counter), new, applied + [rule.name]))
            if new_cost < best_cost:
                best_cost, best_model, best_applied = new_cost, new, applied + [rule.name]
        if progress is not None:
            progress(explored, best_cost)
    return SearchResult(best_model, best_cost, base, best_applied, explored, generated, stop,
                        time.perf_counter() - start)
