"""Which nodes onnxruntime runs as one kernel, so that they are timed together: segments.

onnxruntime fuses Conv+BatchNormalization+Relu, Conv+Add+Relu, MatMul+Add into Gemm, the
decomposed LayerNorm and GELU, and more; a node timed alone cannot show that, and a rewrite that
breaks a fusion was predicted faster and measured slower. So the cost model times *segments*:
the connected groups that onnxruntime could fuse, as one small model.

An edge p -> c (through value v) is *fusable* when c is elementwise or a reduction (Add, Relu,
BatchNormalization, ReduceMean, Softmax...), p is a heavy operator (Conv, MatMul, Gemm...) or
elementwise or a reduction, v is not a graph output and not a constant, and, when p is heavy, c
is v's only consumer (onnxruntime fuses into a kernel only what nothing else reads). A segment is
a connected component of fusable edges of at most `MAX_SEGMENT` nodes; a larger component
(an unrolled RNN step's whole gate tree) is cut into chains: each heavy node with the
elementwise nodes that follow it one by one (each the only reader of the one before, through
its first non-constant input), and every other node alone. Nodes computed from constants only
are not in any segment: they are folded before the model runs and cost nothing.

Everything here is local: the segments that contain a node depend only on the nodes around it,
so the search can price a rewrite from the segments it touches (`View`, `segments_touching`),
not the whole graph.

`describe` turns a segment into a `SegmentSpec`: a canonical description (which two isomorphic
segments share, so one measurement serves both; names play no part) and the small ONNX model
that times it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["ANCHORS", "FUSING", "MAX_SEGMENT", "SegmentSpec", "View", "all_segments",
           "attr_digest", "describe", "segments_touching"]

ANCHORS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulInteger", "ConvInteger",
                     "QLinearConv", "QLinearMatMul", "Einsum"})
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "Sqrt", "Reciprocal", "Neg",
    "Abs", "Exp", "Log", "Erf", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Mish",
    "BatchNormalization", "Cast", "ThresholdedRelu", "Sin", "Cos", "Floor", "Ceil", "Round",
    "Sign", "QuantizeLinear", "DequantizeLinear"})
REDUCING = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2",
                      "ReduceSumSquare", "ReduceProd", "Softmax", "LogSoftmax",
                      "LayerNormalization"})
FUSING = ELEMENTWISE | REDUCING
MAX_SEGMENT = 24          # nodes timed as one model at most
CHAIN = 4                 # a heavy node and up to 3 followers, in an oversized component

_STANDARD = ("", "ai.onnx")


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values())


class View:
    """The graph as the cost model sees it: which nodes are live, who reads a value, which
    values are graph outputs and which are constants. A trial rewrite is seen through a second
    View (`dead`: the nodes it removes; `outputs`: the graph outputs after it; `constants`:
    values computed from constants only, folded before running)."""

    def __init__(self, graph: ir.Graph | None, constants: set[int], *,
                 dead: frozenset[int] = frozenset(), outputs: set[int] | None = None) -> None:
        self.graph = graph
        self.constants = constants
        self.dead = dead
        if outputs is None:
            outputs = {id(v) for v in graph.outputs} if graph is not None else set()
        self.outputs = outputs

    def consumers(self, value: ir.Value) -> list[ir.Node]:
        out, seen = [], set()
        for use in value.uses():
            node = use.node
            if id(node) not in seen and id(node) not in self.dead:
                seen.add(id(node))
                out.append(node)
        return out

    def live(self, node: ir.Node | None) -> bool:
        return node is not None and id(node) not in self.dead

    def folded(self, node: ir.Node) -> bool:
        """Computed from constants only (or a Constant): folded, in no segment."""
        return all(id(o) in self.constants for o in node.outputs) and bool(node.outputs)

    def fusable(self, producer: ir.Node, consumer: ir.Node, value: ir.Value) -> bool:
        if id(value) in self.constants or id(value) in self.outputs:
            return False
        if consumer.domain not in _STANDARD or consumer.op_type not in FUSING:
            return False
        if producer.domain not in _STANDARD or _has_subgraph(producer):
            return False
        if producer.op_type in ANCHORS:
            return len(self.consumers(value)) == 1
        return producer.op_type in FUSING

    def neighbours(self, node: ir.Node) -> Iterable[ir.Node]:
        """Nodes joined to `node` by a fusable edge, either way."""
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if self.live(producer) and not self.folded(producer) and self.fusable(
                    producer, node, value):
                yield producer
        for value in node.outputs:
            for consumer in self.consumers(value):
                if not self.folded(consumer) and self.fusable(node, consumer, value):
                    yield consumer

    def main_input(self, node: ir.Node) -> ir.Value | None:
        """The first input that is not a constant."""
        for value in node.inputs:
            if value is not None and id(value) not in self.constants:
                return value
        return None


def _component(node: ir.Node, view: View) -> tuple[list[ir.Node], bool]:
    """The fusable component around `node`, and True; or part of it and False when it has
    more than MAX_SEGMENT nodes."""
    seen = {id(node): node}
    stack = [node]
    while stack:
        current = stack.pop()
        for other in view.neighbours(current):
            if id(other) not in seen:
                seen[id(other)] = other
                if len(seen) > MAX_SEGMENT:
                    return list(seen.values()), False     # oversized: no need to see it all
                stack.append(other)
    return list(seen.values()), len(seen) <= MAX_SEGMENT


def _chains(component: Sequence[ir.Node], view: View) -> list[list[ir.Node]]:
    """The heavy-node chains of an oversized component (see the module docstring); the
    component's other nodes are segments of their own."""
    taken: set[int] = set()
    members = {id(n) for n in component}
    out = []
    for node in component:
        if node.op_type not in ANCHORS or id(node) in taken:
            continue
        chain, current = [node], node
        taken.add(id(node))
        while len(chain) < CHAIN and len(current.outputs) == 1:
            value = current.outputs[0]
            readers = view.consumers(value)
            if len(readers) != 1:
                break
            nxt = readers[0]
            if (id(nxt) in taken or id(nxt) not in members or view.folded(nxt)
                    or view.main_input(nxt) is not value
                    or not view.fusable(current, nxt, value)):
                break
            chain.append(nxt)
            taken.add(id(nxt))
            current = nxt
        out.append(chain)
    return out


def segments_touching(nodes: Iterable[ir.Node], view: View) -> dict[tuple, list[ir.Node]]:
    """The segments that contain any of `nodes` (live, not folded), keyed by their node ids.

    A whole component is returned whenever one of its nodes is touched, since a rewrite inside
    an oversized component can change how all of it is cut."""
    out: dict[tuple, list[ir.Node]] = {}
    done: set[int] = set()
    for node in nodes:
        if id(node) in done or not view.live(node) or view.folded(node):
            continue
        component, complete = _component(node, view)
        if complete:
            parts = [component]
        else:
            full = _full_component(node, view)
            parts = _chains(full, view)
            chained = {id(n) for part in parts for n in part}
            parts += [[n] for n in full if id(n) not in chained]
            component = full
        for n in component:
            done.add(id(n))
        for part in parts:
            out[tuple(sorted(id(n) for n in part))] = part
    return out


def _full_component(node: ir.Node, view: View) -> list[ir.Node]:
    seen = {id(node): node}
    stack = [node]
    while stack:
        for other in view.neighbours(stack.pop()):
            if id(other) not in seen:
                seen[id(other)] = other
                stack.append(other)
    return list(seen.values())


def all_segments(graph: ir.Graph, view: View) -> list[list[ir.Node]]:
    """A partition of the graph's live, unfolded top-level nodes into segments, in graph order
    of their first node."""
    out: list[list[ir.Node]] = []
    done: set[int] = set()
    for node in graph:
        if id(node) in done or not view.live(node) or view.folded(node):
            continue
        for key, part in segments_touching([node], view).items():
            if not any(i in done for i in key):
                out.append(part)
                done.update(key)
    return out


# ---------------------------------------------------------------------- description


_DIGESTS: "weakref.WeakKeyDictionary[ir.Node, str]" = weakref.WeakKeyDictionary()


def attr_digest(node: ir.Node) -> str:
    """A short digest of a node's attributes (tensor attributes by their bytes); memoized per
    node (the search never changes a node's attributes)."""
    hit = _DIGESTS.get(node)
    if hit is None:
        hit = _DIGESTS[node] = _attr_digest(node)
    return hit


def _attr_digest(node: ir.Node) -> str:
    parts = []
    for name, attr in sorted(node.attributes.items()):
        value = attr.value
        if attr.type == ir.AttributeType.TENSOR:
            arr = value.numpy()
            text = f"T{arr.dtype}{list(arr.shape)}:" + hashlib.sha1(arr.tobytes()).hexdigest()[:12]
        elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            text = f"G{id(value)}"
        elif isinstance(value, (list, tuple)):
            text = repr([v if isinstance(v, (int, float, str)) else repr(v) for v in value])
        else:
            text = repr(value)
        parts.append(f"{name}={text}")
    return hashlib.sha1(";".join(parts).encode()).hexdigest()[:16]


def _static(value: ir.Value) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


def _known(value: ir.Value) -> np.ndarray | None:
    from legato.core.rewrite._matcher import constant_array

    try:
        return constant_array(value)
    except Exception:  # noqa: BLE001 (an unreadable constant is measured with random data)
        return None


def const_digest(value: ir.Value) -> str:
    """What of a constant's value changes the cost: small constants (shapes, axes, pads) by
    value, large ones (weights) by dtype and shape only."""
    arr = _known(value)
    if arr is None:
        return f"computed{list(_static(value) or ())}"
    if arr.size <= 16:
        return repr(arr.tolist())
    return f"{arr.dtype}{list(arr.shape)}"


@dataclasses.dataclass
class SegmentSpec:
    """A segment described canonically: `key` identifies its computation and shapes; `model`
    builds the ONNX model that times it (None when it cannot be timed alone: dynamic shapes,
    unknown dtypes, custom domains); `nodes` the ids of the graph nodes it covers;
    `weight_bytes` the bytes of its constant inputs, `io_bytes` those of the others and its
    outputs."""

    key: str
    nodes: tuple[int, ...]
    op_types: tuple[str, ...]
    model: onnx.ModelProto | None
    feed: dict[str, tuple[tuple[int, ...], str]]
    weight_bytes: int
    io_bytes: int
    why_untimed: str = ""


def _order(nodes: list[ir.Node]) -> list[ir.Node]:
    """Topological order inside the segment, ties broken by operator and attributes."""
    ids = {id(n) for n in nodes}
    indeg = {id(n): 0 for n in nodes}
    readers: dict[int, list[ir.Node]] = {id(n): [] for n in nodes}
    for n in nodes:
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in ids:
                indeg[id(n)] += 1
                readers[id(p)].append(n)
    ready = [n for n in nodes if indeg[id(n)] == 0]
    out = []
    while ready:
        ready.sort(key=lambda n: (n.op_type, attr_digest(n)))
        n = ready.pop(0)
        out.append(n)
        for r in readers[id(n)]:
            indeg[id(r)] -= 1
            if indeg[id(r)] == 0:
                ready.append(r)
    return out if len(out) == len(nodes) else list(nodes)


def describe(nodes: list[ir.Node], view: View, *, opsets: dict[str, int],
             context: Any = None, build: Any = None) -> SegmentSpec:
    """The canonical description and timing model of a segment (see `SegmentSpec`).
    `context` (for instance the cache traffic around it) is part of the key; `build(key)`
    says whether the timing model is wanted (default: always; a cached key needs none)."""
    order = _order(nodes)
    inside = {id(n) for n in order}
    position = {id(n): i for i, n in enumerate(order)}
    ext: list[ir.Value] = []
    ext_index: dict[int, int] = {}
    desc_nodes = []
    why = ""
    for n in order:
        refs = []
        for v in n.inputs:
            if v is None:
                refs.append("")
                continue
            p = v.producer()
            if p is not None and id(p) in inside:
                refs.append(f"n{position[id(p)]}:{v.index()}")
                continue
            if id(v) not in ext_index:
                ext_index[id(v)] = len(ext)
                ext.append(v)
            refs.append(f"x{ext_index[id(v)]}")
        desc_nodes.append([n.domain, n.op_type, attr_digest(n), refs, len(n.outputs)])
        if n.domain not in _STANDARD:
            why = why or f"{n.domain}::{n.op_type} is not a standard operator"
        if _has_subgraph(n):
            why = why or f"{n.op_type} holds a subgraph"
    outs: list[ir.Value] = []
    for n in order:
        for v in n.outputs:
            if id(v) in view.outputs or any(id(c) not in inside for c in view.consumers(v)):
                outs.append(v)
    if not outs:
        outs = [v for v in order[-1].outputs]
    desc_inputs = []
    weight_bytes = io_bytes = 0
    for v in ext:
        shape = _static(v)
        dtype = v.dtype.name if v.dtype is not None else None
        const = const_digest(v) if id(v) in view.constants else None
        desc_inputs.append([list(shape) if shape is not None else None, dtype, const])
        if shape is None or v.dtype is None:
            why = why or f"input {v.name!r} has no static shape or type"
            continue
        size = int(np.prod(shape, dtype=np.int64)) * _itemsize(v.dtype)
        if const is not None:
            weight_bytes += size
        else:
            io_bytes += size
    out_refs = []
    for v in outs:
        p = v.producer()
        out_refs.append(f"n{position[id(p)]}:{v.index()}")
        shape = _static(v)
        if shape is None or v.dtype is None:
            why = why or f"output {v.name!r} has no static shape or type"
        else:
            io_bytes += int(np.prod(shape, dtype=np.int64)) * _itemsize(v.dtype)
    blob = json.dumps([desc_nodes, desc_inputs, out_refs, sorted(opsets.items()), context],
                      sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:32]
    model, feed = (None, {})
    if not why and (build is None or build(key)):
        try:
            model, feed = _build(order, ext, outs, view, opsets, position)
        except Exception as err:  # noqa: BLE001 (a segment that cannot be built is estimated)
            why = f"cannot build a model of it alone ({type(err).__name__}: {err})"
    return SegmentSpec(key, tuple(sorted(inside)), tuple(n.op_type for n in order), model, feed,
                       weight_bytes, io_bytes, why)


def _itemsize(dtype: ir.DataType) -> int:
    try:
        return max(1, dtype.itemsize)
    except Exception:  # noqa: BLE001 (sub-byte or unknown types)
        return 1


def _build(order: list[ir.Node], ext: list[ir.Value], outs: list[ir.Value], view: View,
           opsets: dict[str, int], position: dict[int, int]
           ) -> tuple[onnx.ModelProto, dict[str, tuple[tuple[int, ...], str]]]:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    names: dict[int, str] = {}
    g_inputs, inits, feed = [], [], {}
    for i, v in enumerate(ext):
        name = f"x{i}"
        names[id(v)] = name
        shape = _static(v)
        dtype = v.dtype.numpy()
        if id(v) in view.constants:
            arr = _known(v)
            if arr is None or tuple(arr.shape) != shape:
                arr = _random(rng, shape, dtype)
            inits.append(numpy_helper.from_array(np.asarray(arr).astype(dtype, copy=False), name))
        else:
            g_inputs.append(helper.make_tensor_value_info(name, v.dtype.value, list(shape)))
            feed[name] = (shape, np.dtype(dtype).str)
    protos = []
    for n in order:
        proto = onnx.NodeProto(op_type=n.op_type, domain=n.domain)
        for attr in n.attributes.values():
            proto.attribute.append(ir.serde.serialize_attribute(attr))
        for v in n.inputs:
            if v is None:
                proto.input.append("")
            elif id(v) in names:
                proto.input.append(names[id(v)])
            else:
                p = v.producer()
                proto.input.append(f"n{position[id(p)]}_{v.index()}")
        proto.output.extend(f"n{position[id(n)]}_{j}" for j in range(len(n.outputs)))
        proto.name = f"n{position[id(n)]}"
        protos.append(proto)
    g_outputs = [helper.make_tensor_value_info(f"n{position[id(v.producer())]}_{v.index()}",
                                               v.dtype.value, list(_static(v)))
                 for v in outs]
    graph = helper.make_graph(protos, "segment", g_inputs, g_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in opsets.items()])
    model.ir_version = min(model.ir_version, 10)
    return model, feed


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return np.ones(shape, dtype=bool)
    return np.ones(shape, dtype=dtype)
