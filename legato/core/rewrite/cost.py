"""What a graph costs: per-operator latency measured with onnxruntime, cached on disk, with an
analytic fallback.

`OrtCostModel.node_cost(node)` builds a one-node ONNX model with the node's operator,
attributes and input shapes (constant inputs become initializers with their real values, others
graph inputs filled with random data), times it in onnxruntime with the model's settings
(optimization level, threads), and keeps the median. Results are cached in memory and in a JSON
file keyed by operator, input shapes and dtypes, attributes, optimization level, threads and
onnxruntime version (`~/.cache/legato/op_costs.json` by default; `LEGATO_COST_CACHE` moves it).
The time of an empty session run is subtracted (a whole model pays it once, not per node).
A node whose shapes are not static, whose operator is not standard, or that fails alone gets
the analytic estimate: multiply-accumulates at `flops_per_s` plus bytes moved at `bytes_per_s`
plus a fixed per-operator overhead.

A node all of whose inputs are constants costs nothing: it is folded before the model runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from legato.core._files import atomic_json
from legato.core.rewrite._matcher import constant_array, is_constant

__all__ = ["AnalyticCostModel", "CostModel", "OrtCostModel", "foldable", "graph_cost"]

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _static(value: ir.Value) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


class CostModel:
    """Cost of one node, in seconds; subclasses implement `node_cost`."""

    def node_cost(self, node: ir.Node, constants: set[int] | None = None) -> float:
        """`constants`: ids of values known constant (graph_cost passes them)."""
        raise NotImplementedError


class AnalyticCostModel(CostModel):
    """Multiply-accumulates and bytes moved, at rates typical of one CPU core."""

    def __init__(self, flops_per_s: float = 2e10, bytes_per_s: float = 1e10,
                 overhead_s: float = 2e-6) -> None:
        self.flops_per_s, self.bytes_per_s, self.overhead_s = flops_per_s, bytes_per_s, overhead_s

    def node_cost(self, node: ir.Node, constants: set[int] | None = None) -> float:
        shapes = [_static(v) for v in node.inputs if v is not None]
        outs = [_static(v) for v in node.outputs]
        moved = sum(math.prod(s) for s in shapes + outs if s is not None) * 4
        macs = 0
        op = node.op_type
        if op in ("MatMul", "Gemm") and len(shapes) >= 2 and None not in shapes[:2] and outs[0]:
            a = shapes[0]
            k = a[-1] if not (op == "Gemm" and _attr(node, "transA", 0)) else a[0]
            macs = math.prod(outs[0]) * k
        elif op == "Conv" and len(shapes) >= 2 and None not in shapes[:2] and outs[0]:
            w = shapes[1]
            macs = math.prod(outs[0]) * math.prod(w[1:])
        return self.overhead_s + 2 * macs / self.flops_per_s + moved / self.bytes_per_s


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


class OrtCostModel(CostModel):
    """Per-operator latency measured in onnxruntime (see the module docstring)."""

    def __init__(self, *, level: str = "all", threads: int = 1, repeats: int = 20,
                 cache_path: str | os.PathLike | None = None, opset: int = 17,
                 fallback: CostModel | None = None, use_cache: bool = True) -> None:
        import onnxruntime as ort

        if level not in LEVELS:
            raise ValueError(f"level={level!r}; use one of {list(LEVELS)}")
        self.level, self.threads, self.repeats, self.opset = level, threads, repeats, opset
        self.fallback = fallback or AnalyticCostModel()
        self.version = ort.__version__
        default = Path(os.environ.get("LEGATO_COST_CACHE",
                                      Path.home() / ".cache" / "legato" / "op_costs.json"))
        self.cache_path = Path(cache_path) if cache_path is not None else default
        if not use_cache or os.environ.get("LEGATO_NO_COST_CACHE", "") not in ("", "0"):
            self.cache_path = None
        self._cache: dict[str, float] = {}
        self._dirty = 0
        self._lock = threading.Lock()
        self.measured = self.cached = self.estimated = 0
        self._overhead: float | None = None
        self._memo: dict[tuple, float] = {}
        self._digests: dict[int, tuple] = {}
        try:
            self._cache = (json.loads(self.cache_path.read_text()).get("costs", {})
                           if self.cache_path is not None else {})
        except (OSError, ValueError):
            self._cache = {}

    def _key(self, node: ir.Node, shapes: list, dtypes: list, consts: list) -> str:
        attrs = {k: (repr(v.value) if not isinstance(v.value, (int, float, str, list))
                     else v.value) for k, v in sorted(node.attributes.items())}
        blob = json.dumps([node.op_type, shapes, dtypes, consts, attrs, self.level, self.threads,
                           self.version], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def node_cost(self, node: ir.Node, constants: set[int] | None = None) -> float:
        subgraphs = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                        for a in node.attributes.values())
        if node.domain not in ("", "ai.onnx") or subgraphs:
            self.estimated += 1
            return self.fallback.node_cost(node)
        inputs = [v for v in node.inputs]
        shapes = [_static(v) if v is not None else () for v in inputs]
        outs = [_static(v) for v in node.outputs]
        if any(s is None for s in shapes) or any(s is None for s in outs) or any(
                v is not None and v.dtype is None for v in inputs):
            self.estimated += 1
            return self.fallback.node_cost(node)
        def const(v: ir.Value) -> bool:
            return id(v) in constants if constants is not None else is_constant(v)

        consts = [self._digest(v) if v is not None and const(v) else None for v in inputs]
        dtypes = [v.dtype.name if v is not None else None for v in inputs]
        fast = (node.op_type, tuple(shapes), tuple(dtypes), tuple(consts),
                tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items())))
        with self._lock:
            if fast in self._memo:
                self.cached += 1
                return self._memo[fast]
        key = self._key(node, [list(s) for s in shapes], dtypes, consts)
        with self._lock:
            if key in self._cache:
                self.cached += 1
                self._memo[fast] = self._cache[key]
                return self._cache[key]
        try:
            cost = self._measure(node)
            self.measured += 1
        except Exception:  # noqa: BLE001 (a node that cannot run alone gets the estimate)
            self.estimated += 1
            return self.fallback.node_cost(node)
        with self._lock:
            self._cache[key] = cost
            self._memo[fast] = cost
            self._dirty += 1
        return cost

    def _digest(self, value: ir.Value) -> str:
        """`_const_digest`, memoized per tensor object (clones share initializer tensors)."""
        tensor = value.const_value
        if tensor is None:
            return _const_digest(value)
        hit = self._digests.get(id(tensor))
        if hit is None or hit[0] is not tensor:
            hit = (tensor, _const_digest(value))      # the tensor kept alive: its id stays its
            self._digests[id(tensor)] = hit
        return hit[1]

    def _measure(self, node: ir.Node) -> float:
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        rng = np.random.default_rng(0)
        g_inputs, inits, names, feed = [], [], [], {}
        for i, v in enumerate(node.inputs):
            if v is None:
                names.append("")
                continue
            name = f"in{i}"
            names.append(name)
            dtype = v.dtype.numpy()
            if is_constant(v):       # folded before running: an initializer (ORT may prepack it)
                arr = _known_array(v)
                if arr is None:
                    arr = rng.standard_normal(_static(v)).astype(dtype)
                inits.append(numpy_helper.from_array(arr.astype(dtype, copy=False), name))
            else:
                arr = (rng.standard_normal(_static(v)) if np.issubdtype(dtype, np.floating)
                       else np.ones(_static(v))).astype(dtype)
                feed[name] = arr
                g_inputs.append(helper.make_tensor_value_info(name, v.dtype.value, list(arr.shape)))
        outs = [helper.make_tensor_value_info(f"out{i}", o.dtype.value if o.dtype else 1, None)
                for i, o in enumerate(node.outputs)]
        proto_node = ir.serde.serialize_node(node)
        del proto_node.input[:]
        proto_node.input.extend(names)
        del proto_node.output[:]
        proto_node.output.extend(o.name for o in outs)
        model = helper.make_model(helper.make_graph([proto_node], "op", g_inputs, outs, inits),
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[self.level])
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        # a session run has a fixed cost (~10 us) that a whole model pays once, not per node
        return max(statistics.median(times) - self._run_overhead(), 1e-7)

    def _run_overhead(self) -> float:
        if getattr(self, "_overhead", None) is None:
            import onnxruntime as ort
            from onnx import helper

            x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
            y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
            m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])],
                                                    "nop", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", self.opset)])
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(m.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
            feed = {"x": np.zeros(1, np.float32)}
            times = []
            for i in range(self.repeats + 3):
                t0 = time.perf_counter()
                sess.run(None, feed)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            self._overhead = statistics.median(times)
        return self._overhead

    def save(self) -> None:
        """Write the cache file (atomically) if anything was measured."""
        with self._lock:
            if not self._dirty or self.cache_path is None:
                return
            try:
                merged = json.loads(self.cache_path.read_text()).get("costs", {})
            except (OSError, ValueError):
                merged = {}
            merged.update(self._cache)
            atomic_json(self.cache_path, {"format": "legato.rewrite.op_costs", "costs": merged},
                        indent=None)
            self._dirty = 0


_known_array = constant_array


def _const_digest(value: ir.Value) -> str:
    arr = _known_array(value)
    if arr is None:
        return f"computed{list(_static(value) or ())}"
    if arr.size <= 16:                    # small constants (shapes, axes) change the op
        return repr(arr.tolist())
    return f"{arr.dtype}{list(arr.shape)}"


def constant_values(graph: ir.Graph) -> tuple[set[int], set[int]]:
    """(ids of constant values, ids of nodes computed from constants only), in one pass."""
    const_values: set[int] = {id(v) for v in graph.initializers.values()}
    out: set[int] = set()
    for node in graph:                      # topological order
        ins = [v for v in node.inputs if v is not None]
        if node.op_type == "Constant" or (ins and all(id(v) in const_values
                                                      for v in ins)):
            if not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for a in node.attributes.values()):
                out.add(id(node))
                const_values.update(id(v) for v in node.outputs)
    return const_values, out


def foldable(graph: ir.Graph) -> set[int]:
    """ids of the nodes computed from constants only (folded before the model runs)."""
    return constant_values(graph)[1]


def graph_cost(graph: ir.Graph, model: CostModel) -> float:
    """Sum of node costs, leaving out nodes computed from constants only (folded)."""
    consts, skip = constant_values(graph)
    return sum(model.node_cost(node, consts) for node in graph if id(node) not in skip)
