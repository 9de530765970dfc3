"""Whole-model measurements with onnxruntime: A/B timing in interleaved rounds, and output
comparison on random inputs. `optimize` uses them to return a rewritten model only when it is
measured faster and computes the same outputs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import onnx

__all__ = ["ab_time", "compare_outputs", "random_feed", "session"]

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
          onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
          onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_}


def session(model: onnx.ModelProto | bytes, *, level: str = "all", threads: int = 1):
    """An onnxruntime CPU session with the given optimization level and intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # idle sessions' spinning threads steal cores from the one being timed (A/B skew of up to
    # 3x measured with three copies of one model at 2 threads); spin off, copies agree to 1%
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def random_feed(model: onnx.ModelProto, *, seed: int = 0, dynamic_dim: int = 1
                ) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer (dynamic dims -> 1)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dynamic_dim for d in t.shape.dim]
        dtype = _NUMPY.get(t.elem_type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has element type {t.elem_type}, which the "
                             "random inputs do not cover; pass inputs explicitly")
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feed[inp.name] = rng.random(shape) < 0.5
        else:
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed


def compare_outputs(a: Any, b: Any, feeds: list[dict[str, np.ndarray]], *, rtol: float = 1e-4,
                    atol: float = 1e-5) -> dict[str, Any]:
    """Run two sessions on the same inputs: the largest absolute and relative differences,
    and whether every output agrees within atol + rtol * |reference|."""
    max_abs = max_rel = 0.0
    equal = True
    for feed in feeds:
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape:
                return {"max_abs": float("inf"), "max_rel": float("inf"), "equal": False,
                        "why": f"output shapes differ: {x.shape} vs {y.shape}"}
            if x.size == 0:
                continue
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            max_abs = max(max_abs, float(diff.max()))
            rel = diff / np.maximum(np.abs(x.astype(np.float64)), 1e-12)
            max_rel = max(max_rel, float(rel.max()))
            equal &= bool(np.all(diff <= atol + rtol * np.abs(x)))
    return {"max_abs": max_abs, "max_rel": max_rel, "equal": equal, "rtol": rtol, "atol": atol}


def ab_time(sessions: dict[str, Any], feed: dict[str, np.ndarray], *, rounds: int = 7,
            min_round_s: float = 0.05, warmup: int = 3) -> dict[str, dict[str, Any]]:
    """Time each session in interleaved rounds (A B A B ...), so that drift affects all alike.

    A round runs one session repeatedly for at least `min_round_s` (the same count for every
    session, fixed after warm-up) and records the mean time per run; the result per session
    is the median and minimum over rounds."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    first = next(iter(sessions.values()))
    t0 = time.perf_counter()
    first.run(None, feed)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(min_round_s / one))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                sess.run(None, feed)
            times[name].append((time.perf_counter() - t0) / reps)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "times": ts,
                   "runs_per_round": reps} for name, ts in times.items()}
