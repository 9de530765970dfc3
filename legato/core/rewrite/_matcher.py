"""Finding a rule's source pattern in an onnx-ir graph, and replacing it with the target.

Matching starts at the first root: every graph node of that op type is tried, and the pattern
is followed backwards through node inputs, binding pattern variables to graph values (a
variable bound twice must be the same value) and `$` attributes to attribute values. Further
roots are searched among the consumers of values already bound and of matched nodes' outputs,
so a multi-root rule only merges branches that share an input. A match is kept only if its
interior nodes (not roots) feed nothing outside the match and are not graph outputs, and its
preconditions hold.

`apply` builds the target's nodes, points every use of each source root at the matching target
root (graph outputs keep their names), removes the source nodes and restores topological order.
Nodes in other domains, control flow and unknown operators are never touched: a pattern only
names standard operators, and a node it does not name is left as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from legato.core.rewrite.pattern import PNode, Rule, split_ref

__all__ = ["Match", "apply", "build_target", "compose_perms", "find_matches",
           "target_fits_opset"]


@dataclasses.dataclass
class Match:
    """Where a rule's source sits in a graph."""

    rule: Rule
    values: dict[str, ir.Value]
    nodes: dict[str, ir.Node]
    attrs: dict[str, Any]

    def key(self) -> tuple:
        return (self.rule.name, tuple(sorted(id(n) for n in self.nodes.values())))

    def root_nodes(self) -> list[ir.Node]:
        return [self.nodes[split_ref(r)[0]] for r in self.rule.source.outputs]


@functools.lru_cache(maxsize=None)
def _default(op_type: str, name: str) -> Any:
    try:
        schema = onnx.defs.get_schema(op_type, domain="")
    except Exception:  # noqa: BLE001 (an unknown op has no defaults)
        return None
    attr = schema.attributes.get(name)
    if attr is None or not attr.default_value.name:
        return None
    return onnx.helper.get_attribute_value(attr.default_value)


def _norm(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    return value


def _attr_value(node: ir.Node, name: str) -> Any:
    attr = node.attributes.get(name)
    if attr is None:
        return _norm(_default(node.op_type, name))
    return _norm(attr.value)


class _State:
    def __init__(self) -> None:
        self.values: dict[str, ir.Value] = {}
        self.nodes: dict[str, ir.Node] = {}
        self.attrs: dict[str, Any] = {}

    def copy(self) -> "_State":
        s = _State()
        s.values, s.nodes, s.attrs = dict(self.values), dict(self.nodes), dict(self.attrs)
        return s


def _constant_shorthand(node: ir.Node) -> dict[str, Any] | None:
    """A Constant whose only attribute is a `value` tensor of int64 or float32 and rank 0 or
    1, read as the shorthand a pattern names (value_int(s), value_float(s)): exporters and
    legato's own targets write the tensor form, rules the shorthand."""
    attr = node.attributes.get("value")
    if attr is None or len(node.attributes) != 1 or attr.type != ir.AttributeType.TENSOR:
        return None
    arr = attr.value.numpy()
    kind = {np.dtype(np.int64): "value_int", np.dtype(np.float32): "value_float"}.get(arr.dtype)
    if kind is None or arr.ndim > 1:
        return None
    return {kind + "s": tuple(arr.tolist())} if arr.ndim == 1 else {kind: arr.item()}


def _match_attrs(p: PNode, node: ir.Node, st: _State, why: Any = None) -> bool:
    wanted = p.attributes
    short = (_constant_shorthand(node) if node.op_type == "Constant" and "value" not in wanted
             else None)
    for name, want in wanted.items():
        got = _attr_value(node, name) if short is None else short.get(name)
        if isinstance(want, str) and want.startswith("$"):
            if want in st.attrs and st.attrs[want] != got:
                if why is not None:
                    why.fail(st, "attribute-binding", p, node, name, got, want, st.attrs[want])
                return False
            st.attrs[want] = got
        elif _norm(want) != got and not (isinstance(want, (int, float)) and got == want):
            if why is not None:
                why.fail(st, "attribute", p, node, name, got, want)
            return False
    for name in (node.attributes if short is None else ()):
        if name not in wanted and _norm(node.attributes[name].value) != _norm(
                _default(node.op_type, name)):
            if why is not None:
                why.fail(st, "extra-attribute", p, node, name,
                         _norm(node.attributes[name].value), _norm(_default(node.op_type, name)))
            return False
    return True


def _match_node(rule: Rule, p: PNode, node: ir.Node, st: _State, why: Any = None) -> bool:
    """Bind pattern node `p` to `node` and follow its inputs backwards. `why` (explain path
    only, see explain.py) is told each failure; the search passes None and pays nothing."""
    if node.domain not in ("", "ai.onnx") or node.op_type != p.op:
        if why is not None:
            why.fail(st, "op-type", p, node)
        return False
    if len(node.outputs) != p.num_outputs or len(node.inputs) != len(p.inputs):
        if why is not None:
            why.fail(st, "arity", p, node)
        return False
    if p.id in st.nodes:
        if st.nodes[p.id] is node:
            return True
        if why is not None:
            why.fail(st, "shared-node", p, node, st.nodes[p.id])
        return False
    if any(n is node for n in st.nodes.values()):
        if why is not None:
            why.fail(st, "reused-node", p, node)
        return False
    if not _match_attrs(p, node, st, why):
        return False
    st.nodes[p.id] = node                     # bound once its operator and attributes match
    source = rule.source
    for ref, value in zip(p.inputs, node.inputs):
        if value is None:
            if why is not None:
                why.fail(st, "missing-input", p, node, ref, value)
            return False
        name, index = split_ref(ref)
        if name in source.inputs and ":" not in ref:
            if name in st.values:
                if st.values[name] is not value:
                    if why is not None:
                        why.fail(st, "variable-binding", p, node, ref, value,
                                 st.values[name])
                    return False
            else:
                st.values[name] = value
            continue
        producer = value.producer()
        if producer is None:
            if why is not None:
                why.fail(st, "not-computed", p, node, ref, value, source.node(name))
            return False
        if value.index() != index:
            if why is not None:
                why.fail(st, "output-index", p, node, ref, value)
            return False
        if not _match_node(rule, source.node(name), producer, st, why):
            return False
    return True


def _candidates(graph: ir.Graph, op: str, st: _State) -> Iterator[ir.Node]:
    """Nodes of type `op` that read a bound variable or an output of a matched node."""
    seen = set()
    values = [*st.values.values(), *(o for n in st.nodes.values() for o in n.outputs)]
    for value in values:
        for use in value.uses():
            node = use.node
            if id(node) not in seen and node.op_type == op and node.graph is graph:
                seen.add(id(node))
                yield node


def _match_roots(graph: ir.Graph, rule: Rule, roots: list[str], st: _State,
                 order: dict[int, int] | None = None, after: int = -1,
                 exclude: frozenset = frozenset(), why: Any = None,
                 at: ir.Node | None = None) -> Iterator[_State]:
    """Match `roots` in turn. With `order` (node -> graph position; rules with ordered_roots)
    each root's node comes after the previous root's (`after`); nodes in `exclude` are not
    taken as roots; `at` is the only node tried as the first root."""
    if not roots:
        yield st
        return
    name, _ = split_ref(roots[0])
    p = rule.source.node(name)
    if name in st.nodes:                      # reached as an interior node of an earlier root
        yield from _match_roots(graph, rule, roots[1:], st, order, after, exclude, why)
        return
    if st.nodes:
        pool = list(_candidates(graph, p.op, st))
    elif at is not None:
        pool = [at]
    else:                                     # only nodes of the root's type can match it
        pool = [n for n in graph if n.op_type == p.op]
    for node in pool:
        if id(node) in exclude:
            continue
        position = -1
        if order is not None:
            position = order[id(node)]
            if position <= after:
                continue
        trial = st.copy()
        if _match_node(rule, p, node, trial, why):
            yield from _match_roots(graph, rule, roots[1:], trial, order, position, exclude,
                                    why)
    if why is not None and all(any(n is m for m in st.nodes.values()) for n in pool):
        total = len(rule.source.outputs)
        why.fail(st, "missing-root", p, pool, total, total - len(roots))


def _shape(value: ir.Value) -> tuple | None:
    if value.shape is None:
        return None
    dims = tuple(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


NOT_FOLDABLE = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                           "RandomUniformLike", "Multinomial", "Bernoulli"})


def is_constant(value: ir.Value) -> bool:
    """An initializer, a Constant, or computed from constants only (folded before running);
    the same answer as `cost.constant_values`, found by walking up from `value` once (each
    ancestor visited at most once, however deep or branched the constant subgraph)."""
    known: dict[int, bool] = {}
    stack = [value]
    while stack:
        v = stack[-1]
        if id(v) in known:
            stack.pop()
            continue
        if v.const_value is not None:
            known[id(v)] = True
            stack.pop()
            continue
        producer = v.producer()
        if (producer is None or producer.domain not in ("", "ai.onnx")
                or producer.op_type in NOT_FOLDABLE
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for a in producer.attributes.values())):
            known[id(v)] = False
            stack.pop()
            continue
        if producer.op_type == "Constant":
            known[id(v)] = True
            stack.pop()
            continue
        ins = [i for i in producer.inputs if i is not None]
        todo = [i for i in ins if id(i) not in known]
        if todo:
            stack.extend(todo)
            continue
        known[id(v)] = bool(ins) and all(known[id(i)] for i in ins)
        stack.pop()
    return known[id(value)]


def _failed_precondition(rule: Rule, st: _State) -> tuple[str, Any] | None:
    """The first of the rule's preconditions that does not hold for this binding, or None."""
    v = st.values
    for kind, arg in rule.preconditions:
        if kind == "constant" and not is_constant(v[arg]):
            return kind, arg
        if kind == "static_shape" and _shape(v[arg]) is None:
            return kind, arg
        if kind == "rank":
            shape = v[arg[0]].shape
            if shape is None or len(shape) != arg[1]:
                return kind, arg
        if kind == "min_rank":
            shape = v[arg[0]].shape
            if shape is None or len(shape) < arg[1]:
                return kind, arg
        if kind == "static_dim":
            shape = v[arg[0]].shape
            if shape is None or not -len(shape) <= arg[1] < len(shape) \
                    or not isinstance(shape[arg[1]], int):
                return kind, arg
        if kind == "same_shape":
            shapes = [_shape(v[a]) for a in arg]
            if None in shapes or len(set(shapes)) != 1:
                return kind, arg
        if kind == "dim_eq":
            dims = []
            for var, axis in arg:
                shape = _shape(v[var])
                if shape is None or not -len(shape) <= axis < len(shape):
                    return kind, arg
                dims.append(shape[axis])
            if len(set(dims)) != 1:
                return kind, arg
        if kind == "dtype":
            dtype = v[arg[0]].dtype
            if dtype is None or dtype.name != arg[1]:
                return kind, arg
    return None


def _escape(graph: ir.Graph, rule: Rule, st: _State
            ) -> tuple[str, ir.Node, ir.Value, ir.Node | None] | None:
    """An interior (non-root) node's output used outside the match: (pattern node, node,
    value, the outside user, or None for a graph output); None if the match is
    self-contained."""
    roots = {split_ref(r)[0] for r in rule.source.outputs}
    inside = {id(n) for n in st.nodes.values()}
    graph_outputs = {id(v) for v in graph.outputs}
    for pid, node in st.nodes.items():
        if pid in roots:
            continue
        for out in node.outputs:
            if id(out) in graph_outputs:
                return pid, node, out, None
            for use in out.uses():
                if id(use.node) not in inside:
                    return pid, node, out, use.node
    return None


def complete_matches(graph: ir.Graph, rule: Rule, *, exclude_roots: frozenset = frozenset(),
                     why: Any = None, at: ir.Node | None = None) -> Iterator[_State]:
    """Bindings of the whole source that are self-contained and meet the preconditions
    (repeats possible: `find_matches` drops them). `why` and `at`: see `explain.py`."""
    order = {id(n): i for i, n in enumerate(graph)} if rule.ordered_roots else None
    size = len(rule.source.nodes)
    for st in _match_roots(graph, rule, list(rule.source.outputs), _State(), order,
                           exclude=exclude_roots, why=why, at=at):
        if len(st.nodes) != size:             # a node of the pattern was not reached
            if why is not None:
                why.fail(st, "unreached", [n for n in rule.source.nodes if n.id not in st.nodes])
            continue
        escape = _escape(graph, rule, st)
        if escape is not None:
            if why is not None:
                why.fail(st, "escape", *escape)
            continue
        failed = _failed_precondition(rule, st)
        if failed is not None:
            if why is not None:
                why.fail(st, "precondition", *failed)
            continue
        yield st


def find_matches(graph: ir.Graph, rule: Rule, *, limit: int | None = None,
                 exclude_roots: frozenset = frozenset()) -> list[Match]:
    """Every place in `graph` (top level) where `rule.source` matches (at most `limit`);
    nodes whose id is in `exclude_roots` are not taken as roots. Why a rule does not match
    is `explain.explain_rule`'s question, answered on a separate path."""
    found: list[Match] = []
    seen: set[tuple] = set()
    for st in complete_matches(graph, rule, exclude_roots=exclude_roots):
        m = Match(rule, st.values, st.nodes, st.attrs)
        if m.key() in seen:
            continue
        seen.add(m.key())
        found.append(m)
        if limit is not None and len(found) >= limit:
            break
    return found


def _resolve(value: Any, m: Match) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return m.attrs[value]
    if isinstance(value, dict) and "dim" in value:
        var, axis = value["dim"]
        return int(_shape(m.values[var])[axis])
    if isinstance(value, dict) and "compose" in value:
        return compose_perms(*(_resolve(v, m) for v in value["compose"]))
    if isinstance(value, dict) and "band" in value:
        return _band(m, *value["band"])
    if isinstance(value, list):
        return [_resolve(v, m) for v in value]
    return value


def _band(m: Match, var: str, size: Any, alpha: Any) -> ir.Tensor:
    """The `{"band": [var, size, alpha]}` tensor (see pattern.py), of the variable's dtype."""
    from legato.core.rewrite._opkernels import lrn_band

    x = m.values[var]
    shape = None if x.shape is None else tuple(x.shape)
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        raise ValueError(f"rule {m.rule.name!r}: a band needs the rank and dim 1 of {var!r}, "
                         f"whose shape is {shape}; add the preconditions min_rank and "
                         "static_dim")
    weights = lrn_band(shape[1], int(_resolve(size, m)), float(_resolve(alpha, m)),
                       len(shape) - 2)
    dtype = np.float32 if x.dtype is None else x.dtype.numpy()
    return ir.tensor(weights.astype(dtype))


def compose_perms(p: Any, q: Any) -> list[int]:
    """The perm of Transpose(Transpose(x, p), q): [p[i] for i in q]."""
    if p is None or q is None or len(p) != len(q):
        raise ValueError(f"cannot compose the permutations {p} and {q} (a Transpose without "
                         "perm, or ranks that differ)")
    return [int(p[i]) for i in q]


def constant_array(value: ir.Value):
    """The value of an initializer or Constant node as a numpy array; None for anything else
    (including constants still to be computed by folding)."""
    import numpy as np

    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant":
        return None
    attrs = producer.attributes
    if "value" in attrs:
        return attrs["value"].value.numpy()
    for name, dtype in (("value_ints", np.int64), ("value_int", np.int64),
                        ("value_floats", np.float32), ("value_float", np.float32)):
        if name in attrs:
            return np.asarray(attrs[name].value, dtype=dtype)
    return None


def _constant_list(value: ir.Value) -> list | None:
    arr = constant_array(value)
    return None if arr is None else arr.tolist()


def infer_shapes(nodes: list[ir.Node]) -> bool:
    """Give the nodes' outputs shapes and dtypes from legato's operator semantics; False if
    some node could not be inferred (then whole-graph shape inference must run)."""
    from legato.core.rewrite.ops import OPS

    complete = True
    for node in nodes:
        if node.op_type == "Constant":
            arr = constant_array(node.outputs[0])
            if arr is not None:
                node.outputs[0].shape = ir.Shape(list(arr.shape))
                node.outputs[0].dtype = ir.DataType.from_numpy(arr.dtype)
                continue
        op = OPS.get(node.op_type)
        if op is None or any(v is None or _shape(v) is None for v in node.inputs):
            complete = False
            continue
        attr_inputs = dict(op.attr_inputs)
        shapes, attrs = [], {k: a.value for k, a in node.attributes.items()}
        for i, v in enumerate(node.inputs):
            if i in attr_inputs:
                values = _constant_list(v)
                if values is None:
                    complete = False
                    break
                attrs[attr_inputs[i]] = values
            else:
                shapes.append(_shape(v))
        else:
            try:
                outs = op.infer(shapes, attrs)
            except Exception:  # noqa: BLE001 (left to onnx's shape inference)
                complete = False
                continue
            dtype = next((v.dtype for i, v in enumerate(node.inputs)
                          if i not in attr_inputs and v.dtype is not None), None)
            for value, shape in zip(node.outputs, outs):
                value.shape = ir.Shape(list(shape))
                value.dtype = dtype
    return complete


_CONSTANT_FORMS = {"value_float": np.float32, "value_floats": np.float32,
                   "value_int": np.int64, "value_ints": np.int64}


def _constant_value(attrs: dict[str, Any]) -> dict[str, Any]:
    """A Constant's shorthand attribute (value_float, value_ints, ...; opset 12 onward) as
    the `value` tensor every opset accepts."""
    for name, dtype in _CONSTANT_FORMS.items():
        if name in attrs:
            return {"value": ir.tensor(np.asarray(attrs[name], dtype=dtype))}
    return attrs


def build_target(m: Match) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
    """The rule's target as new nodes reading the match's values, not yet in the graph:
    (nodes, the values that replace the source's roots, the source's roots)."""
    target = m.rule.target
    made: dict[str, ir.Node] = {}

    def value_of(ref: str) -> ir.Value:
        name, index = split_ref(ref)
        if name in target.inputs and ":" not in ref:
            return m.values[name]
        return made[name].outputs[index]

    nodes = []
    for p in target.nodes:
        attrs = {k: _resolve(v, m) for k, v in p.attributes.items()}
        attrs = {k: v for k, v in attrs.items() if v is not None}   # bound to "absent"
        if p.op == "Constant":
            attrs = _constant_value(attrs)
        node = ir.Node("", p.op, inputs=[value_of(r) for r in p.inputs],
                       attributes=ir.convenience.convert_attributes(attrs),
                       num_outputs=p.num_outputs)
        made[p.id] = node
        nodes.append(node)
    old_roots = [m.nodes[split_ref(r)[0]].outputs[split_ref(r)[1]]
                 for r in m.rule.source.outputs]
    new_roots = [value_of(r) for r in target.outputs]
    return nodes, new_roots, old_roots


@functools.lru_cache(maxsize=None)
def _schema_fits(op: str, opset: int, n_inputs: int, n_outputs: int,
                 attributes: frozenset[str]) -> bool:
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except Exception:  # noqa: BLE001 (no such operator at this opset)
        return False
    if schema.deprecated or not schema.min_input <= n_inputs <= schema.max_input:
        return False
    if not schema.min_output <= n_outputs <= schema.max_output:
        return False
    return attributes <= set(schema.attributes)


def target_fits_opset(rule: Rule, opset: int) -> bool:
    """Whether every node of the rule's target is valid ONNX at `opset` (Split takes its sizes
    as an input only from opset 13, for instance): a rule whose target is not is not applied
    to a model of that opset."""
    for p in rule.target.nodes:
        names = set(p.attributes)
        if p.op == "Constant" and names & set(_CONSTANT_FORMS):
            names = {"value"}
        if not _schema_fits(p.op, opset, len(p.inputs), p.num_outputs, frozenset(names)):
            return False
    return True


def apply(graph: ir.Graph, m: Match) -> list[ir.Node]:
    """Replace the match with the rule's target; returns the new nodes."""
    new_nodes, new_roots, old_roots = build_target(m)
    graph.extend(new_nodes)
    for old, new in zip(old_roots, new_roots):
        if old.shape is not None and new.shape is None:
            new.shape = old.shape
        if old.dtype is not None and new.dtype is None:
            new.dtype = old.dtype
        for i, out in enumerate(graph.outputs):
            if out is old:
                name = old.name
                old.name = None
                new.name = name
                graph.outputs[i] = new
    ir.convenience.replace_all_uses_with(old_roots, new_roots)
    graph.remove(list(m.nodes.values()), safe=True)
    graph.sort()
    return new_nodes
