"""What a graph costs: segments timed in onnxruntime, corrected for the context they run in,
cached per machine, with their measured spread; an analytic estimate where timing is
impossible.

A graph's predicted time is the sum of its segments' costs (`segments.py`: the groups of nodes
onnxruntime may fuse into one kernel, timed together, so Conv+BatchNorm+Relu or MatMul+Add cost
what the fused kernel costs). Nodes computed from constants only cost nothing: they are folded.

`OrtCostModel` times a segment as a small model of its own, under the same optimization level
and thread count as the whole model, with constant inputs as initializers (weight prepacking
counts) and pre-bound inputs and outputs (no allocation or copy in the timing):

- *interleaved and repeated*: the segments priced together are timed in rounds (A B C A B C
  ...) beside two reference models (one Neg node and a chain of eight), whose medians give
  a session run's fixed cost, taken off each segment (a whole model pays it once), apart from
  a node's own cost, which every node pays in a model as alone; each segment's cost is its
  median over `rounds` rounds and its spread the interquartile range over the median. A segment
  whose spread is wider than `max_spread` is measured again (up to `retries` times) and the
  tighter measurement kept; the spread travels with the cost, so a decision resting on a
  noisy cost is known to be unsure.
- *in context*: timed alone and back to back, a segment keeps its weights in the caches; in a
  model, the rest of it streams through them in between (`traffic`: the model's weights and
  activations, up to twice the L3 size). So each segment pays, per byte of its constant
  inputs, the `cold_penalty` measured for that traffic and weight size: a [1,512]x[512,512]
  MatMul took 14 us alone and 51 us among 64 others with their own weights (1 MiB L2,
  32 MiB L3 here). Reading the traffic before every timed run instead also made
  onnxruntime's own code cold, which a model's nodes are not, and priced a 256-float Add at
  1.3 us. With several threads, a parallel kernel run alone first wakes its sleeping workers,
  which in a model the node before has just used: the `wake_surplus` measured for that is
  taken off segments big enough to run in parallel.
- *fusion and layout*: the NCHWc reorders onnxruntime puts at a lone segment's edges (which a
  model's chain of NCHWc convolutions does not pay) are timed in the same rounds and taken off.
- *cached per machine* (`costcache.py`): entries are keyed by the segment's canonical form and
  the machine section (CPU, cores, caches, onnxruntime version, level, threads). The guard in
  `optimize` checks them against whole-model measurements and has entries that disagree
  measured again (`remeasure`).

A segment that cannot be timed alone (dynamic shapes, a custom domain, a subgraph, a failure)
gets `AnalyticCostModel`'s estimate with a relative error of 50%.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from legato.core.rewrite import segments as seg
from legato.core.rewrite.costcache import (CostCache, Entry, cache_disabled, default_cache_path,
                                           machine_info, machine_key)

__all__ = ["AnalyticCostModel", "CostModel", "OrtCostModel", "Price", "constant_values",
           "foldable", "graph_cost", "graph_price"]

log = logging.getLogger(__name__)

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
UNTIMED_ERROR = 0.5       # relative error of an analytic estimate
REF_CHAIN = 8             # nodes in the longer reference model


@dataclasses.dataclass(frozen=True)
class Price:
    """A segment's cost: seconds, its uncertainty in seconds (for a measured median, its
    interquartile range over the square root of the samples), and the cache key behind it."""

    seconds: float
    error_s: float = 0.0
    key: str | None = None


def _static(value: ir.Value) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


class CostModel:
    """What a graph costs. A subclass either prices single nodes (`node_cost`, the default:
    every node a segment of its own) or sets `fuses` and prices segments (`ticket`/`settle`)."""

    fuses = False

    def node_cost(self, node: ir.Node, constants: set[int] | None = None) -> float:
        """Seconds for one node; `constants`: ids of values known constant."""
        raise NotImplementedError

    def bind(self, model: ir.Model) -> None:
        """Called once with the model to be searched, before any pricing."""

    def ticket(self, nodes: Sequence[ir.Node], view: seg.View) -> Any:
        """What `settle` needs to price this segment later; called while `view` holds (a
        trial rewrite is undone afterwards)."""
        return Price(sum(self.node_cost(n, view.constants) for n in nodes))

    def settle(self, tickets: Sequence[Any]) -> list[Price]:
        """Prices for tickets, measured together where measuring is needed."""
        return list(tickets)

    def segments(self, graph: ir.Graph, view: seg.View) -> list[list[ir.Node]]:
        if self.fuses:
            return seg.all_segments(graph, view)
        return [[n] for n in graph if view.live(n) and not view.folded(n)]

    def touching(self, nodes: Iterable[ir.Node], view: seg.View) -> dict[tuple, list[ir.Node]]:
        if self.fuses:
            return seg.segments_touching(nodes, view)
        return {(id(n),): [n] for n in nodes if view.live(n) and not view.folded(n)}

    def save(self) -> None:
        """Persist what was measured (a cache); nothing by default."""


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


def _traffic_bucket(total_bytes: int, l2: int, l3: int) -> int:
    """The bytes read between two runs of a segment, rounded to the nearest quarter octave
    (so near sizes share cache entries; 0: the model fits in half the L2 and stays warm)."""
    if total_bytes <= (l2 or 2 ** 20) // 2:
        return 0
    target = min(total_bytes, 2 * (l3 or 32 * 2 ** 20))
    return int(2 ** (round(4 * math.log2(target)) / 4)) // 4096 * 4096


class OrtCostModel(CostModel):
    """Segments timed in onnxruntime, in context, interleaved, cached (module docstring).

    Args:
        level, threads: the onnxruntime settings the whole model will run under.
        rounds: timing rounds per measurement (the median is kept).
        max_spread: re-measure a segment whose interquartile range exceeds this fraction of its
            median (and 2 us); `retries` times at most.
        cache_path: the cache file (default `~/.cache/legato/op_costs.json`, or
            `LEGATO_COST_CACHE`); `use_cache=False` or `LEGATO_NO_COST_CACHE=1`: in memory only.
        fallback: the estimate for segments that cannot be timed alone.
    """

    fuses = True

    def __init__(self, *, level: str = "all", threads: int = 1, rounds: int = 9,
                 max_spread: float = 0.25, retries: int = 2, cache_path: Any = None,
                 fallback: CostModel | None = None, use_cache: bool = True,
                 repeats: int | None = None) -> None:
        import onnxruntime as ort

        if level not in LEVELS:
            raise ValueError(f"level={level!r}; use one of {list(LEVELS)}")
        if threads < 1:
            raise ValueError(f"threads={threads}; use threads >= 1")
        self.level, self.threads = level, threads
        self.rounds = max(3, repeats if repeats is not None else rounds)
        self.max_spread, self.retries = max_spread, retries
        self.fallback = fallback or AnalyticCostModel()
        self.version = ort.__version__
        path = cache_path if cache_path is not None else default_cache_path()
        if not use_cache or cache_disabled():
            path = None
        self.cache = CostCache(path, machine_key(ort_version=self.version, level=level,
                                                 threads=threads),
                               {**machine_info(), "onnxruntime": self.version, "level": level,
                                "threads": threads})
        self.opsets: dict[str, int] = {"": 17}
        self.traffic = 0
        self.measured = self.cached = self.estimated = self.remeasured = 0
        self.measure_s = 0.0
        self.run_overhead_s = self.node_overhead_s = 0.0   # from the reference models
        self._specs: dict[str, seg.SegmentSpec] = {}     # measured here, by key
        self._penalty: dict[int, float] = {}
        self._wake: float | None = None
        self._empty: Any = None

    @property
    def cache_path(self):
        return self.cache.path

    # ------------------------------------------------------------------ pricing

    def bind(self, model: ir.Model) -> None:
        self.opsets = {d: v for d, v in model.opset_imports.items() if d in ("", "ai.onnx")}
        self.opsets.setdefault("", 17)
        total = 0
        for value in model.graph.initializers.values():
            shape = _static(value)
            if shape is not None and value.dtype is not None:
                total += math.prod(shape) * seg._itemsize(value.dtype)
        for node in model.graph:
            for value in node.outputs:
                shape = _static(value)
                if shape is not None and value.dtype is not None:
                    total += math.prod(shape) * seg._itemsize(value.dtype)
        info = machine_info()
        self.traffic = _traffic_bucket(total, info["l2_bytes"], info["l3_bytes"])

    def ticket(self, nodes: Sequence[ir.Node], view: seg.View) -> Any:
        estimate = sum(self.fallback.node_cost(n, view.constants) for n in nodes)
        spec = seg.describe(list(nodes), view, opsets=self.opsets,
                            context=[self.level, self.threads],
                            build=lambda key: key not in self._specs and key not in self.cache)
        if spec.why_untimed:
            log.debug("segment %s estimated: %s", spec.op_types, spec.why_untimed)
            return Price(estimate, UNTIMED_ERROR * estimate, None)
        if spec.model is not None:
            self._specs[spec.key] = spec          # built now: the view may not hold later
        return (spec, estimate)

    def settle(self, tickets: Sequence[Any]) -> list[Price]:
        todo: dict[str, seg.SegmentSpec] = {}
        for t in tickets:
            if isinstance(t, tuple) and t[0].key not in self.cache and t[0].key not in todo:
                spec = self._specs.get(t[0].key)
                if spec is not None and spec.model is not None:
                    todo[t[0].key] = spec
        if todo:
            self._measure(list(todo.values()))
        out = []
        for t in tickets:
            if not isinstance(t, tuple):
                self.estimated += 1
                out.append(t)
                continue
            spec, estimate = t
            entry = self.cache.get(spec.key)
            if entry is None:                       # it failed to run alone: estimated
                self.estimated += 1
                out.append(Price(estimate, UNTIMED_ERROR * estimate, None))
                continue
            if spec.key not in todo:
                self.cached += 1
            # the standard error of a median of n samples is about IQR / sqrt(n)
            error = entry.spread * entry.seconds / math.sqrt(max(entry.samples, 1))
            cold = spec.weight_bytes * self.cold_penalty(spec.weight_bytes)
            out.append(Price(entry.seconds + cold, error, spec.key))
        return out

    def node_cost(self, node: ir.Node, constants: set[int] | None = None) -> float:
        """One node alone (as a segment of its own)."""
        graph = node.graph
        if constants is None:
            constants = constant_values(graph)[0] if graph is not None else set()
        view = seg.View(graph, constants)
        return self.settle([self.ticket([node], view)])[0].seconds

    def save(self) -> None:
        """Write new measurements into the cache file (merged, under a lock)."""
        self.cache.save()

    # ------------------------------------------------------------------ checking

    def remeasure(self, keys: Iterable[str]) -> dict[str, tuple[float, float]]:
        """Measure these entries again now (the guard found predictions using them wrong);
        returns key -> (old seconds, new seconds) for those that could be measured."""
        specs = [self._specs[k] for k in keys if k in self._specs]
        old = {s.key: self.cache.get(s.key) for s in specs}
        self.cache.invalidate([s.key for s in specs])
        if specs:
            self._measure(specs)
            self.remeasured += len(specs)
        out = {}
        for s in specs:
            new = self.cache.get(s.key)
            if new is not None and old[s.key] is not None:
                out[s.key] = (old[s.key].seconds, new.seconds)
        return out

    def spec_for(self, graph: ir.Graph, keys: set[str]) -> None:
        """Build the timing models of `graph`'s segments whose key is in `keys` (entries read
        from disk have none until asked), so that `remeasure` can time them."""
        consts = constant_values(graph)[0]
        view = seg.View(graph, consts)
        for nodes in self.segments(graph, view):
            spec = seg.describe(nodes, view, opsets=self.opsets,
                                context=[self.level, self.threads],
                                build=lambda key: key in keys)
            if spec.model is not None:
                self._specs[spec.key] = spec

    # ------------------------------------------------------------------ measuring

    def _session(self, model: onnx.ModelProto, optimized_path: str | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if optimized_path is not None:
            opts.optimized_model_filepath = optimized_path
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "weights.bin")
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[self.level])
        opts.intra_op_num_threads = self.threads if threads is None else threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 4          # failures are caught and said in the log
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])

    def _bound(self, model: onnx.ModelProto, feed_spec: dict, *, inspect: bool = False,
               threads: int | None = None) -> tuple[Any, Any, list, list]:
        """A session with its inputs and outputs bound to numpy buffers allocated once (no
        allocation or copy while timing; the buffers can be warmed as the model would), and,
        with `inspect`, the layout reorders onnxruntime put at the model's inputs and outputs
        (see `_glue`)."""
        import tempfile

        reorders: list = []
        if inspect:
            with tempfile.TemporaryDirectory(prefix="legato-seg-") as tmp:
                path = f"{tmp}/optimized.onnx"
                sess = self._session(model, path, threads)
                try:
                    reorders = _boundary_reorders(onnx.load(path, load_external_data=False),
                                                  model)
                except Exception as err:  # noqa: BLE001 (no reorder correction then)
                    log.debug("cannot read the optimized segment: %s", err)
        else:
            sess = self._session(model, threads=threads)
        binding = sess.io_binding()
        rng = np.random.default_rng(1)
        arrays = []
        for name, (shape, dtype) in feed_spec.items():
            dtype = np.dtype(dtype)
            if np.issubdtype(dtype, np.floating):
                arr = rng.standard_normal(shape).astype(dtype)
            else:
                arr = np.ones(shape, dtype=dtype)
            arr = np.ascontiguousarray(arr)
            arrays.append(arr)
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        outs = sess.run(None, {n: a for n, a in zip(feed_spec, arrays)})
        for meta, value in zip(sess.get_outputs(), outs):
            arr = np.ascontiguousarray(np.empty_like(value))
            arrays.append(arr)
            binding.bind_output(meta.name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        # one bound run here, where a failure is caught: a segment fed made-up integers (the
        # shape input of an Expand, the limits of a Range) can compute other shapes than the
        # model declares, and float8 outputs come back as uint8; such a segment is estimated
        sess.run_with_iobinding(binding)
        return sess, binding, arrays, reorders

    def _glue(self, reorders: list) -> tuple[Any, Any, list] | None:
        """A model of the layout reorders a segment timed alone pays at its edges and the
        model around it does not (onnxruntime's NCHWc convolutions and pools keep their
        blocked layout from one to the next): each boundary tensor reordered in and out once,
        so half its time is one reorder per edge."""
        if not reorders:
            return None
        from onnx import TensorProto, helper

        nodes, inputs, outputs, feed = [], [], [], {}
        for i, (shape, channels_last) in enumerate(reorders):
            x, y = f"z{i}", f"w{i}"
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, list(shape)))
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
            channels = shape[-1] if channels_last else shape[1]
            nodes += [helper.make_node("ReorderInput", [x], [f"b{i}"], domain=_NCHWC,
                                       channels_last=channels_last),
                      helper.make_node("ReorderOutput", [f"b{i}"], [y], domain=_NCHWC,
                                       channels=channels, channels_last=channels_last)]
            feed[x] = (tuple(shape), "<f4")
        model = helper.make_model(helper.make_graph(nodes, "glue", inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 17),
                                                 helper.make_opsetid(_NCHWC, 1)])
        model.ir_version = 8
        try:
            sess, binding, arrays, _ = self._bound(model, feed)
        except Exception as err:  # noqa: BLE001 (no correction then)
            log.debug("cannot time the reorders %s: %s", reorders, err)
            return None
        return sess, binding, arrays

    def _references(self):
        """Two tiny models, one Neg node and a chain of REF_CHAIN: timed in every round, they
        give the fixed cost of a session run (which a whole model pays once, not per segment)
        apart from the cost of a node (which every node pays, in a model as alone)."""
        if self._empty is None:
            from onnx import TensorProto, helper

            refs = []
            for n in (1, REF_CHAIN):
                names = ["x", *(f"v{i}" for i in range(n))]
                nodes = [helper.make_node("Neg", [names[i]], [names[i + 1]]) for i in range(n)]
                model = helper.make_model(
                    helper.make_graph(nodes, "ref", [helper.make_tensor_value_info(
                        "x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info(
                            names[-1], TensorProto.FLOAT, [1])]),
                    opset_imports=[helper.make_opsetid("", 17)])
                model.ir_version = 8
                refs.append(self._bound(model, {"x": ((1,), "<f4")})[:3])
            self._empty = refs
        return self._empty

    def cold_penalty(self, weight_bytes: int) -> float:
        """Seconds per byte of constant input (weights) that a segment with `weight_bytes` of
        them pays in the model beyond what it pays timed alone, where its weights stay in the
        caches between runs: in the model, the rest of it (`traffic` bytes) streams through
        the caches in between.

        Measured once per machine section, traffic and weight size (a power of two from 64 KiB
        to 16 MiB): a [1,K]x[K,N] MatMul with that many bytes of weights timed hot, and right
        after reading `traffic` bytes (then one reference run, so that onnxruntime's own code
        is warm again, as between two nodes), in interleaved rounds; the difference over its
        weight bytes, never below 0. Cached like a segment."""
        if not self.traffic or weight_bytes <= 0:
            return 0.0
        size = 2 ** min(24, max(16, round(math.log2(weight_bytes))))
        hit = self._penalty.get(size)
        if hit is not None:
            return hit
        key = f"cold-penalty:{self.traffic}:{size}"
        entry = self.cache.get(key)
        if entry is None:
            entry = self._probe_penalty(size)
            self.cache.put(key, entry)
        self._penalty[size] = entry.seconds
        return entry.seconds

    def wake_surplus(self) -> float:
        """With several intra-op threads, what a parallel kernel run alone pays on top of what
        it pays between other nodes of a model (its workers, asleep between two lone runs, are
        woken; in a model the node before has just used them): a [1,512]x[512,512] MatMul
        timed alone, less its time per node in a chain of 16 and a session run's fixed cost.
        0 with one thread. Measured once per machine section, cached like a segment."""
        if self.threads <= 1:
            return 0.0
        if self._wake is None:
            entry = self.cache.get("wake-surplus")
            if entry is None:
                entry = self._probe_wake()
                self.cache.put("wake-surplus", entry)
            self._wake = entry.seconds
        return self._wake

    def _probe_wake(self) -> Entry:
        from onnx import TensorProto, helper, numpy_helper

        k = 512
        weight = numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((k, k)).astype(np.float32) / k, "w")
        runs = []
        for n in (1, 16):
            names = ["x", *(f"v{i}" for i in range(n))]
            model = helper.make_model(
                helper.make_graph([helper.make_node("MatMul", [names[i], "w"], [names[i + 1]])
                                   for i in range(n)], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT,
                                                                 [1, k])], [weight]),
                opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            runs.append(self._bound(model, {"x": ((1, k), "<f4")})[:3])
        refs = self._references()
        times: list[list[float]] = [[], [], []]
        for _ in range(3):
            for sess, binding, _ in runs:
                sess.run_with_iobinding(binding)
        for _ in range(max(self.rounds, 15) * 4):
            for i, (sess, binding, _) in enumerate([*runs, refs[0]]):
                t0 = time.perf_counter()
                sess.run_with_iobinding(binding)
                times[i].append(time.perf_counter() - t0)
        alone, chain, ref = (statistics.median(t) for t in times)
        per_node = (chain - alone) / 15
        surplus = max(alone - per_node - ref, 0.0)
        return Entry(surplus, 0.0, len(times[0]), time.time())

    def _probe_penalty(self, size: int) -> Entry:
        from onnx import TensorProto, helper, numpy_helper

        k = 256
        n = size // (4 * k)
        weight = numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) / k, "w")
        model = helper.make_model(
            helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [weight]),
            opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        # the bound buffers must outlive the binding (onnxruntime reads and writes them)
        # one thread: the caches are what is measured here, not waking a thread pool (a
        # worker asleep through the read below takes longer to wake: wake_surplus's part)
        sess, binding, buffers, _ = self._bound(model, {"x": ((1, k), "<f4")}, threads=1)
        ref_sess, ref_bind, _ = self._references()[0]
        evict = np.ones(self.traffic // 8, dtype=np.int64)
        hot, cold = [], []
        for _ in range(3):
            sess.run_with_iobinding(binding)
        for _ in range(max(self.rounds, 15)):
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            hot.append(time.perf_counter() - t0)
            int(evict.sum())
            ref_sess.run_with_iobinding(ref_bind)
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            cold.append(time.perf_counter() - t0)
        del buffers
        extra = [c - h for c, h in zip(cold, hot)]
        med = statistics.median(extra)
        q = statistics.quantiles(extra, n=4)
        return Entry(max(med, 0.0) / size, abs(q[2] - q[0]) / max(abs(med), 1e-9), len(extra),
                     time.time())

    def _measure(self, specs: list[seg.SegmentSpec]) -> None:
        """Time `specs` together in interleaved rounds; store each as a cache entry. Specs
        whose spread is too wide are measured again, up to `retries` times."""
        start = time.perf_counter()
        best: dict[str, Entry] = {}
        pending = list(specs)
        for attempt in range(1 + self.retries):
            results = self._rounds(pending)
            again = []
            for spec in pending:
                entry = results.get(spec.key)
                if entry is None:
                    continue
                kept = best.get(spec.key)
                if kept is None or entry.spread < kept.spread:
                    best[spec.key] = entry
                wide = (entry.spread > self.max_spread
                        and entry.spread * entry.seconds > 2e-6)
                if wide and attempt < self.retries:
                    again.append(spec)
            if not again:
                break
            pending = again
        for spec in specs:
            entry = best.get(spec.key)
            if entry is not None:
                self.cache.put(spec.key, entry)
                self._specs[spec.key] = spec
                self.measured += 1
        self.measure_s += time.perf_counter() - start

    def _rounds(self, specs: list[seg.SegmentSpec]) -> dict[str, Entry]:
        sessions = []
        for spec in specs:
            inspect = self.level == "all" and any(op in _NCHWC_OPS for op in spec.op_types)
            try:
                sess, binding, arrays, reorders = self._bound(spec.model, spec.feed,
                                                              inspect=inspect)
            except Exception as err:  # noqa: BLE001 (a segment that cannot run is estimated)
                log.debug("segment %s %s cannot be timed alone: %s", spec.key, spec.op_types, err)
                continue
            sessions.append((spec, (sess, binding, arrays), self._glue(reorders)))
        if not sessions:
            return {}
        refs = self._references()
        runs = [(spec.key, timed) for spec, timed, _ in sessions]
        runs += [("glue:" + spec.key, glue) for spec, _, glue in sessions if glue is not None]
        # warm-up: first runs pay for lazy initialisation and prepacking
        for _, (sess, binding, _) in runs:
            sess.run_with_iobinding(binding)
            sess.run_with_iobinding(binding)
        reps = {}
        for key, (sess, binding, _) in runs:
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            one = time.perf_counter() - t0
            reps[key] = max(1, min(64, int(2e-4 / max(one, 1e-7))))
        samples: dict[str, list[float]] = {key: [] for key, _ in runs}
        zero: list[list[float]] = [[], []]
        for _ in range(self.rounds):
            for k, (r_sess, r_bind, _) in enumerate(refs):
                t0 = time.perf_counter()
                r_sess.run_with_iobinding(r_bind)
                zero[k].append(time.perf_counter() - t0)
            for key, (sess, binding, arrays) in runs:
                n = reps[key]
                # hot whatever else shares the round (the segments before it evicted its
                # weights): one untimed run first; cold_penalty prices the model's context
                sess.run_with_iobinding(binding)
                t0 = time.perf_counter()
                for _ in range(n):
                    sess.run_with_iobinding(binding)
                samples[key].append((time.perf_counter() - t0) / n)
        one, chain = statistics.median(zero[0]), statistics.median(zero[1])
        node = max(chain - one, 0.0) / (REF_CHAIN - 1)
        base = one - node                      # a session run's fixed cost alone
        self.run_overhead_s, self.node_overhead_s = base, node
        now = time.time()
        out = {}
        for spec, _, glue in sessions:
            times = samples[spec.key]
            if glue is not None:              # the edge reorders it paid alone, taken off
                edge = max(statistics.median(samples["glue:" + spec.key]) - base, 0.0) / 2
                times = [t - edge for t in times]
            med = statistics.median(times)
            q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0,
                                                                           max(times)]
            cost = max(med - base, 1e-7)
            wake = self.wake_surplus()
            if wake and cost > 2 * wake:        # a kernel big enough to be run in parallel
                cost -= wake
            out[spec.key] = Entry(cost, (q[2] - q[0]) / cost, len(times), now)
        return out


_NCHWC = "com.microsoft.nchwc"
_NCHWC_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                        "Resize", "Upsample"})


def _boundary_reorders(optimized: onnx.ModelProto, original: onnx.ModelProto
                       ) -> list[tuple[tuple[int, ...], int]]:
    """The NCHWc reorders onnxruntime placed on the segment model's own inputs and outputs:
    (shape, channels_last) each."""
    shapes = {}
    for vi in list(original.graph.input) + list(original.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = tuple(dims)
    inputs = {i.name for i in optimized.graph.input}
    outputs = {o.name for o in optimized.graph.output}
    out = []
    for node in optimized.graph.node:
        if node.domain != _NCHWC:
            continue
        last = next((a.i for a in node.attribute if a.name == "channels_last"), 0)
        if node.op_type == "ReorderInput" and node.input[0] in inputs:
            shape = shapes.get(node.input[0])
        elif node.op_type == "ReorderOutput" and node.output[0] in outputs:
            shape = shapes.get(node.output[0])
        else:
            continue
        if shape and len(shape) == 4 and all(d > 0 for d in shape):
            out.append((shape, int(last)))
    return out


def constant_values(graph: ir.Graph) -> tuple[set[int], set[int]]:
    """(ids of constant values, ids of nodes computed from constants only), in one pass over
    the graph in topological order: linear in its size."""
    from legato.core.rewrite._matcher import NOT_FOLDABLE

    const_values: set[int] = {id(v) for v in graph.initializers.values()}
    out: set[int] = set()
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type in NOT_FOLDABLE:
            continue
        ins = [v for v in node.inputs if v is not None]
        if node.op_type == "Constant" or (ins and all(id(v) in const_values for v in ins)):
            if not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for a in node.attributes.values()):
                out.add(id(node))
                const_values.update(id(v) for v in node.outputs)
    return const_values, out


def foldable(graph: ir.Graph) -> set[int]:
    """ids of the nodes computed from constants only (folded before the model runs)."""
    return constant_values(graph)[1]


def graph_price(graph: ir.Graph, model: CostModel) -> tuple[float, float, list[str]]:
    """(seconds, uncertainty in seconds, cache keys used) of the whole graph: the sum over its
    segments; nodes computed from constants only are folded and cost nothing."""
    consts = constant_values(graph)[0]
    view = seg.View(graph, consts)
    parts = model.segments(graph, view)
    prices = model.settle([model.ticket(p, view) for p in parts])
    total = sum(p.seconds for p in prices)
    error = math.sqrt(sum(p.error_s ** 2 for p in prices))
    return total, error, [p.key for p in prices if p.key]


def graph_cost(graph: ir.Graph, model: CostModel) -> float:
    """Predicted seconds of the whole graph (`graph_price`'s first part)."""
    return graph_price(graph, model)[0]
