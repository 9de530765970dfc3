"""Why a rule does or does not match a graph: `MatchResult`, `explain_rule`, `near_misses`.

The search asks `find_matches` only where a rule matches, and pays nothing for reasons. This
module asks the same matcher again (`_matcher.complete_matches`) with a recorder that every
failed attempt reports to: which check failed, on which graph node and value, and how many of
the pattern's nodes the attempt had bound by then. The attempt that got furthest (most pattern
nodes bound; at equal count, one that failed a later check: an interior output escaping, then a
precondition) is the rule's *closest near-miss*, and its reason is the answer:

    >>> result = explain_rule(graph, rule)
    >>> bool(result), result.describe()
    (False, 'fold-conv-batchnorm: 1/2 pattern nodes; node n3 (Conv): attribute group=2, ...')

The failures, by `MatchResult.kind`:
- `op-type`, `arity`: a graph node of another operator (or domain), or another number of
  inputs or outputs, than the pattern node it was reached for;
- `attribute`, `attribute-binding`, `extra-attribute`: an attribute with another value than
  the pattern's, unequal values where the pattern binds one `$name` twice, or an attribute the
  pattern does not list set to something other than its ONNX default;
- `missing-input`, `variable-binding`, `not-computed`, `output-index`: an omitted optional
  input, one pattern variable read as two different values, an input the pattern wants computed
  by a node that is a graph input or initializer, or another output of the producing node;
- `shared-node`, `reused-node`: a pattern node reached twice binding two graph nodes, or one
  graph node bound to two pattern nodes;
- `missing-root`: no node of the first root's operator in the graph, or, for a rule with several
  roots, too few nodes of the next root's operator reading the values already matched;
- `escape`: an interior (non-root) node's output read outside the match or a graph output;
- `precondition`: a precondition (`constant`, `static_shape`, `rank`, ...) that fails;
- `unreached`: pattern nodes that no root reaches (a malformed rule).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import onnx
import onnx_ir as ir

from legato.core.rewrite._matcher import (
    NOT_FOLDABLE,
    Match,
    _shape,
    _State,
    complete_matches,
    is_constant,
)
from legato.core.rewrite.pattern import PNode, Rule, split_ref

__all__ = ["MatchResult", "explain_model", "explain_rule", "near_misses"]

# later checks rank above earlier ones at the same number of bound pattern nodes
_PHASE = {"unreached": 1, "escape": 2, "precondition": 3}
_TIE = {"missing-root": 1, "reused-node": 0}
_SHOWN = 4          # values or nodes listed in one reason before "and N more"


@dataclasses.dataclass
class MatchResult:
    """How one rule fares on a graph: truthy when it matches somewhere.

    On success `matches` holds the places (at most `limit`); on failure `reason` says why the
    closest attempt stopped, `kind` names the check (see the module docstring), `bound` counts
    the pattern nodes it had matched (of `size`), and `nodes` / `values` are the graph nodes
    and values involved: the nodes it bound, then the node it failed on.
    """

    rule: Rule
    matches: list[Match]
    reason: str = ""
    kind: str = ""
    bound: int = 0
    size: int = 0
    nodes: tuple[ir.Node, ...] = ()
    values: tuple[ir.Value, ...] = ()
    limit: int | None = None

    def __bool__(self) -> bool:
        return bool(self.matches)

    @property
    def count(self) -> int:
        return len(self.matches)

    def describe(self) -> str:
        """One line: where the rule matches, or how far its closest attempt got and why not."""
        if self:
            more = "+" if self.limit is not None and self.count >= self.limit else ""
            return (f"{self.rule.name}: matches at {self.count}{more} "
                    f"place{'s' if self.count != 1 or more else ''}")
        return (f"{self.rule.name}: {self.bound}/{self.size} pattern nodes matched; "
                f"{self.reason}")

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule.name, "matches": self.count, "kind": self.kind,
                "bound": self.bound, "size": self.size, "reason": self.reason,
                "nodes": [_label(n) for n in self.nodes],
                "values": [_value_name(v) for v in self.values]}


class _Trace:
    """The recorder `_matcher` reports failed attempts to; keeps the one that got furthest."""

    def __init__(self) -> None:
        self.key = (-1, -1, -1)
        self.kind = ""
        self.args: tuple = ()
        self.nodes: dict[str, ir.Node] = {}
        self.values: dict[str, ir.Value] = {}
        self.attrs: dict[str, Any] = {}

    def fail(self, st: _State, kind: str, *args: Any) -> None:
        # at one depth, a node that was there and did not fit says the most; then a missing
        # root ("needs 3 roots, found 2"); least, a candidate root that is already matched
        key = (len(st.nodes), _PHASE.get(kind, 0), _TIE.get(kind, 2))
        if key > self.key:
            self.key, self.kind, self.args = key, kind, args
            self.nodes, self.values, self.attrs = dict(st.nodes), dict(st.values), dict(st.attrs)


def explain_rule(graph: ir.Graph, rule: Rule, *, at: ir.Node | None = None,
                 limit: int | None = None) -> MatchResult:
    """Where `rule` matches in `graph`, or why its closest attempt did not.

    Args:
        graph: the graph (top level), with value shapes where preconditions need them.
        rule: the rule.
        at: only try this node as the rule's first root ("does it match here, and if not,
            why?").
        limit: stop after this many matches.
    Returns:
        A `MatchResult`, truthy when the rule matches.
    """
    trace = _Trace()
    matches: list[Match] = []
    seen: set[tuple] = set()
    for st in complete_matches(graph, rule, why=trace, at=at):
        m = Match(rule, st.values, st.nodes, st.attrs)
        if m.key() not in seen:
            seen.add(m.key())
            matches.append(m)
            if limit is not None and len(matches) >= limit:
                break
    size = len(rule.source.nodes)
    if matches:
        return MatchResult(rule, matches, bound=size, size=size, limit=limit)
    if trace.key[0] < 0:        # nothing was tried (cannot happen for a well-formed rule)
        return MatchResult(rule, [], "no attempt was made", "unreached", 0, size, limit=limit)
    reason, nodes, values = _describe(trace, rule, graph)
    bound = [trace.nodes[n.id] for n in rule.source.nodes if n.id in trace.nodes]
    involved = bound + [n for n in nodes if all(n is not b for b in bound)]
    return MatchResult(rule, [], reason, trace.kind, len(trace.nodes), size, tuple(involved),
                       tuple(values), limit)


def near_misses(graph: ir.Graph, rules: Sequence[Rule], *, limit: int | None = 1000
                ) -> list[MatchResult]:
    """`explain_rule` for each rule, in order: how many places each matches, and for each
    that matches nowhere its closest near-miss."""
    return [explain_rule(graph, rule, limit=limit) for rule in rules]


def explain_model(model: onnx.ModelProto | ir.Model, rules: Sequence[Rule] | None = None, *,
                  limit: int | None = 1000) -> list[MatchResult]:
    """`near_misses` on a model's main graph after shape inference (as the search sees it);
    `rules` default to the shipped rules. The model is not modified."""
    import onnx_ir.passes.common as common_passes

    if rules is None:
        from legato.core.rewrite.rules import shipped_rules

        rules = shipped_rules()
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    else:
        model = model.clone()
    common_passes.ShapeInferencePass(strict_mode=False)(model)
    return near_misses(model.graph, rules, limit=limit)


# -- describing a failure -----------------------------------------------------------------------

def _label(node: ir.Node) -> str:
    """`n3 (Conv)`, or for an unnamed node `<Conv -> 'y'>` (its first output)."""
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    if node.name:
        return f"{node.name} ({op})"
    first = node.outputs[0].name if node.outputs else None
    return f"<{op} -> {first!r}>" if first else f"<{op}>"


def _value_name(value: ir.Value | None) -> str:
    return "<omitted>" if value is None else repr(value.name or "<unnamed>")


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _shape_text(value: ir.Value) -> str:
    if value.shape is None:
        return "an unknown shape"
    return "[" + ", ".join(str(d) for d in value.shape) + "]"


def _list(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _origin(value: ir.Value) -> str:
    """What a value is: a graph input, an initializer, or a node's output."""
    if value.is_graph_input():
        return (f"the graph input {_value_name(value)}" +
                (" (also an initializer)" if value.const_value is not None else ""))
    if value.const_value is not None:
        return f"the initializer {_value_name(value)}"
    producer = value.producer()
    if producer is None:
        return f"{_value_name(value)}, which no node produces"
    index = f"output {value.index()} of " if len(producer.outputs) > 1 else ""
    return f"{_value_name(value)}, {index}{_label(producer)}"


def _variable(name: str, trace: _Trace) -> str:
    value = trace.values.get(name)
    return f"{name} is {_origin(value)}" if value is not None else f"{name} is unbound"


def _not_constant(value: ir.Value, depth: int = 0) -> str:
    """Why `is_constant(value)` is False: the graph input or operator it depends on."""
    producer = value.producer()
    if producer is None or depth > 64:
        return f"it depends on {_origin(value)}"
    if producer.domain not in ("", "ai.onnx"):
        return f"it is computed by {_label(producer)}, an operator legato does not fold"
    if producer.op_type in NOT_FOLDABLE:
        return f"it is computed by {_label(producer)}, a random operator (never folded)"
    for v in producer.inputs:
        if v is not None and not is_constant(v):
            return _not_constant(v, depth + 1)
    return f"it is computed by {_label(producer)}, which has no inputs to fold"


def _precondition(kind: str, arg: Any, trace: _Trace) -> tuple[str, list[ir.Value]]:
    v = trace.values
    if kind == "constant":
        return (f"precondition constant({arg}) fails: {_variable(arg, trace)}; "
                f"{_not_constant(v[arg])}", [v[arg]])
    if kind == "static_shape":
        return (f"precondition static_shape({arg}) fails: {_variable(arg, trace)}, of shape "
                f"{_shape_text(v[arg])}", [v[arg]])
    if kind == "rank":
        name, rank = arg
        shape = v[name].shape
        got = "an unknown shape" if shape is None else f"rank {len(shape)}"
        return (f"precondition rank({name}, {rank}) fails: {_variable(name, trace)}, of {got}",
                [v[name]])
    if kind == "min_rank":
        name, rank = arg
        shape = v[name].shape
        got = "an unknown shape" if shape is None else f"rank {len(shape)}"
        return (f"precondition min_rank({name}, {rank}) fails: {_variable(name, trace)}, of "
                f"{got}", [v[name]])
    if kind == "static_dim":
        name, axis = arg
        return (f"precondition static_dim({name}, {axis}) fails: {_variable(name, trace)}, of "
                f"shape {_shape_text(v[name])}", [v[name]])
    if kind == "same_shape":
        shapes = [f"{a} is {_shape_text(v[a])}" for a in arg]
        return (f"precondition same_shape({', '.join(arg)}) fails: {_list(shapes)}",
                [v[a] for a in arg])
    if kind == "dim_eq":
        dims = []
        for var, axis in arg:
            shape = _shape(v[var])
            if shape is None:
                dims.append(f"{var} is {_shape_text(v[var])}")
            elif not -len(shape) <= axis < len(shape):
                dims.append(f"{var} has rank {len(shape)}, no axis {axis}")
            else:
                dims.append(f"{var}[{axis}] = {shape[axis]}")
        terms = ", ".join(f"{var}[{axis}]" for var, axis in arg)
        return (f"precondition dim_eq({terms}) fails: {_list(dims)}",
                [v[var] for var, _ in arg])
    if kind == "dtype":
        name, want = arg
        dtype = v[name].dtype
        return (f"precondition dtype({name}, {want}) fails: {_variable(name, trace)}, of type "
                f"{'unknown' if dtype is None else dtype.name}", [v[name]])
    return f"precondition {kind}({arg}) fails", []


def _describe(trace: _Trace, rule: Rule, graph: ir.Graph
              ) -> tuple[str, list[ir.Node], list[ir.Value]]:
    """(reason, nodes involved, values involved) of the recorded failure."""
    kind, args = trace.kind, trace.args
    if kind == "precondition":
        reason, values = _precondition(*args, trace)
        return reason, [], values
    if kind == "escape":
        pid, node, value, user = args
        where = ("is a graph output" if user is None
                 else f"feeds {_label(user)} outside the match")
        return (f"interior node {_label(node)} (pattern node {pid}) output "
                f"{_value_name(value)} {where}; replacing the match would remove it",
                [node] + ([] if user is None else [user]), [value])
    if kind == "unreached":
        missing: list[PNode] = args[0]
        return (f"pattern nodes {[p.id for p in missing]} are not reached from the rule's "
                "roots, so the rule can never match (fix the rule's source pattern)", [], [])
    if kind == "missing-root":
        p, pool, total, found = args
        return _missing_root(p, pool, total, found, trace, rule)
    p, node = args[0], args[1]
    where = f"node {_label(node)}"
    if kind == "op-type":
        got = node.op_type if node.domain in ("", "ai.onnx") else \
            f"{node.op_type} in domain {node.domain!r}"
        return f"{where} is {got}; pattern node {p.id} wants {p.op}", [node], []
    if kind == "arity":
        return (f"{where} has {len(node.inputs)} inputs and {len(node.outputs)} outputs; pattern "
                f"node {p.id} wants {len(p.inputs)} and {p.num_outputs}", [node], [])
    if kind == "shared-node":
        other = args[2]
        return (f"pattern node {p.id} ({p.op}) is reached twice, as {_label(other)} and as "
                f"{_label(node)}; the pattern wants one node", [other, node], [])
    if kind == "reused-node":
        pid = next((k for k, n in trace.nodes.items() if n is node), "?")
        return (f"{where} is already matched as pattern node {pid}; pattern node {p.id} needs "
                "another node", [node], [])
    if kind == "attribute":
        name, got, want = args[2:]
        return (f"{where}: attribute {name}={_fmt(got)}, pattern wants {name}={_fmt(want)}",
                [node], [])
    if kind == "attribute-binding":
        name, got, var, bound = args[2:]
        return (f"{where}: attribute {name}={_fmt(got)}, but the pattern's {var} is already "
                f"{_fmt(bound)} and wants them equal", [node], [])
    if kind == "extra-attribute":
        name, got, default = args[2:]
        dflt = "it has no default" if default is None else f"default {_fmt(default)}"
        return (f"{where}: attribute {name}={_fmt(got)} is not in pattern node {p.id} ({dflt}); "
                "the rule was verified without it", [node], [])
    ref, value = args[2], args[3]
    # the input's position: where the node has this value and the pattern this reference
    i = next(j for j, (r, v) in enumerate(zip(p.inputs, node.inputs)) if r == ref and v is value)
    if kind == "missing-input":
        return (f"{where}: input {i} is omitted; pattern node {p.id} reads {ref} there",
                [node], [])
    if kind == "variable-binding":
        bound = args[4]
        return (f"{where}: input {i} is {_origin(value)}, but the pattern's {ref} is already "
                f"{_origin(bound)}", [node], [value, bound])
    if kind == "not-computed":
        want: PNode = args[4]
        return (f"{where}: input {i} is {_origin(value)}; pattern node {p.id} wants it computed "
                f"by {want.op} (pattern node {want.id})", [node], [value])
    if kind == "output-index":
        return (f"{where}: input {i} is {_origin(value)}; pattern node {p.id} wants output "
                f"{split_ref(ref)[1]} of that node", [node], [value])
    return f"{kind} at {where}", [node], []


def _missing_root(p: PNode, pool: list[ir.Node], total: int, found: int, trace: _Trace,
                  rule: Rule) -> tuple[str, list[ir.Node], list[ir.Value]]:
    if found == 0:
        return f"no {p.op} node in the graph for pattern root {p.id}", [], []
    # the values this root shares with the roots already matched: the variables it reads
    shared = [var for var in p.inputs if var in trace.values]
    values = [trace.values[var] for var in shared]
    if not values:                   # it reads only matched nodes' outputs
        values = [o for n in trace.nodes.values() for o in n.outputs]
    ids = {id(v) for v in values}
    consumers = [n for n in pool if any(v is not None and id(v) in ids for v in n.inputs)]
    what = _list([f"{var} ({_value_name(v)})" if var else _value_name(v)
                  for var, v in zip(shared or [""] * len(values), values)])
    which = f": {_list([_label(n) for n in consumers])}, all matched already" if consumers \
        else ""
    return (f"pattern needs {total} roots, found {len(consumers)} {p.op} consumer"
            f"{'s' if len(consumers) != 1 else ''} of {what}{which}", consumers, values)
