"""Whole-model measurements with onnxruntime: A/B timing in interleaved rounds, and output
comparison on random inputs. `optimize` uses them to return a rewritten model only when it is
measured faster and computes the same outputs.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from legato.core.rewrite.modelio import RewriteError

__all__ = ["ab_time", "compare_outputs", "outputs", "random_feed", "runner", "session"]

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# onnxruntime's names of the float8 types, and ml_dtypes' names of them
_FLOAT8 = {"float8e4m3fn": "float8_e4m3fn", "float8e4m3fnuz": "float8_e4m3fnuz",
           "float8e5m2": "float8_e5m2", "float8e5m2fnuz": "float8_e5m2fnuz"}
# packed sub-byte types: onnxruntime takes them two (or four) values a byte
_UNSUPPORTED = {getattr(onnx.TensorProto, n) for n in
                ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2",
                 "FLOAT8E8M0") if hasattr(onnx.TensorProto, n)}


def session(model: onnx.ModelProto | bytes | str | os.PathLike, *, level: str = "all",
            threads: int = 1):
    """An onnxruntime CPU session with the given optimization level and intra-op threads;
    `model` may be a path (a model with external data, or over 2 GB, is loaded from its file)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # idle sessions' spinning threads steal cores from the one being timed (A/B skew of up to
    # 3x measured with three copies of one model at 2 threads); spin off, copies agree to 1%
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, (str, os.PathLike)):
        data = str(model)
    else:
        data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def random_feed(model: onnx.ModelProto, *, seed: int = 0, dynamic_dim: int = 1,
                shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Random inputs for every graph input that is not an initializer.

    Tensors of every element type onnxruntime takes: floats (float16, and bfloat16 and float8
    as ml_dtypes arrays) from a standard normal, integers in {0, 1} (safe as indices), bools,
    strings; a sequence input gets a list of two tensors, an optional one its element.
    Dimensions come from `shapes` (by input name), else the model's, symbolic ones
    `dynamic_dim`. Raises RewriteError (a ValueError) naming the input for types with no
    random form here (maps, sparse tensors, 4-bit and 2-bit types, float8e8m0): such a model
    cannot be compared or timed, so `optimize` refuses it."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    shapes = shapes or {}
    return {inp.name: _random_value(inp.name, inp.type, rng, dynamic_dim, shapes.get(inp.name))
            for inp in model.graph.input if inp.name not in inits}


def _random_value(name: str, tp: onnx.TypeProto, rng: np.random.Generator, dynamic_dim: int,
                  shape: Sequence[int] | None) -> Any:
    kind = tp.WhichOneof("value")
    if kind == "sequence_type":
        elem = tp.sequence_type.elem_type
        return [_random_value(name, elem, rng, dynamic_dim, shape) for _ in range(2)]
    if kind == "optional_type":
        return _random_value(name, tp.optional_type.elem_type, rng, dynamic_dim, shape)
    if kind != "tensor_type":
        raise RewriteError(f"input {name!r} is a {kind or 'value without a type'}, which the "
                           "random inputs do not cover (tensors, sequences and optionals only)")
    t = tp.tensor_type
    if shape is None:
        shape = [d.dim_value if d.HasField("dim_value") else dynamic_dim for d in t.shape.dim]
    shape = list(shape)
    if t.elem_type in _UNSUPPORTED:
        raise RewriteError(f"input {name!r} has element type "
                           f"{onnx.TensorProto.DataType.Name(t.elem_type)}, for which legato "
                           "makes no random inputs (onnxruntime takes it packed, two or four "
                           "values a byte); this model cannot be timed here")
    if t.elem_type == onnx.TensorProto.STRING:
        letters = np.array(list("abcdefgh"))
        words = ["".join(rng.choice(letters, 3)) for _ in range(int(np.prod(shape)))]
        return np.array(words, dtype=object).reshape(shape)
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    except (KeyError, ValueError):
        raise RewriteError(f"input {name!r} has element type {t.elem_type}, which the random "
                           "inputs do not cover") from None
    if dtype == np.bool_:
        value = rng.random(shape) < 0.5
    elif np.issubdtype(dtype, np.complexfloating):
        value = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    elif np.issubdtype(dtype, np.integer):
        value = rng.integers(0, 2, size=shape)
    else:
        value = rng.standard_normal(shape)          # float16/32/64, bfloat16, float8
    return np.asarray(value).astype(dtype)          # an array also for rank 0


def _ort_only(arr: Any) -> bool:
    """An ml_dtypes array (bfloat16, float8): onnxruntime takes it as an OrtValue only."""
    return isinstance(arr, np.ndarray) and arr.dtype.type.__module__.startswith("ml_dtypes")


def _ortvalue(arr: np.ndarray) -> Any:
    import onnxruntime as ort

    if _ort_only(arr):
        elem = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        raw = np.ascontiguousarray(arr).view(np.uint8 if arr.itemsize == 1 else np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))


def runner(sess: Any, feed: dict[str, Any]) -> Callable[[], list]:
    """A call that runs `sess` on `feed`: `sess.run` where numpy holds every input and output,
    else `run_with_ort_values` on OrtValues (bfloat16, float8), made once outside the call."""
    numpy_only = {"tensor(bfloat16)"} | {f"tensor({n})" for n in _FLOAT8}
    special_out = any(o.type in numpy_only for o in sess.get_outputs())
    if not special_out and not any(_ort_only(v) for v in feed.values()):
        return lambda: sess.run(None, feed)
    if not special_out:
        converted = {k: _ortvalue(v) if _ort_only(v) else v for k, v in feed.items()}
        return lambda: sess.run(None, converted)
    if any(not isinstance(v, np.ndarray) for v in feed.values()):
        raise ValueError("a model with bfloat16 or float8 outputs and sequence inputs cannot "
                         "be run here")
    ortvalues = {k: _ortvalue(v) for k, v in feed.items()}
    return lambda: sess.run_with_ort_values(None, ortvalues)


def outputs(sess: Any, feed: dict[str, Any]) -> list:
    """Run `sess` on `feed`; outputs as numpy arrays (bfloat16 and float8 as ml_dtypes
    arrays), sequences as lists, an empty optional as None."""
    return [_numpy(o) for o in runner(sess, feed)()]


def _numpy(value: Any) -> Any:
    if not hasattr(value, "data_type"):              # already numpy, a list or None
        return value
    kind = value.data_type()
    name = kind[len("tensor("):-1] if kind.startswith("tensor(") else ""
    if name == "bfloat16" or name in _FLOAT8:
        import ctypes

        import ml_dtypes

        dtype = np.dtype(getattr(ml_dtypes, _FLOAT8.get(name, "bfloat16")))
        raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
        return np.frombuffer(raw, dtype=dtype).reshape(value.shape()).copy()
    return value.numpy()


def _leaves(x: Any, y: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Pairs of tensors (or a mismatch) in two outputs that may be sequences or None."""
    if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
        if not isinstance(x, (list, tuple)) or not isinstance(y, (list, tuple)) or len(x) != len(y):
            yield path, x, y
            return
        for i, (a, b) in enumerate(zip(x, y)):
            yield from _leaves(a, b, f"{path}[{i}]")
        return
    yield path, x, y


def compare_outputs(a: Any, b: Any, feeds: list[dict[str, Any]], *, rtol: float = 1e-4,
                    atol: float = 1e-5) -> dict[str, Any]:
    """Run two sessions on the same inputs: the largest absolute and relative differences,
    and whether every output agrees within atol + rtol * |reference| (strings and other
    non-numeric outputs: exactly; sequences element by element)."""
    max_abs = max_rel = 0.0
    equal = True
    for feed in feeds:
        for i, (xo, yo) in enumerate(zip(outputs(a, feed), outputs(b, feed))):
            for where, x, y in _leaves(xo, yo, f"output {i}"):
                if x is None or y is None or isinstance(x, (list, tuple)) or isinstance(
                        y, (list, tuple)):
                    if not (x is None and y is None):
                        return {"max_abs": float("inf"), "max_rel": float("inf"),
                                "equal": False, "why": f"{where}: {type(x).__name__} vs "
                                                       f"{type(y).__name__}"}
                    continue
                x, y = np.asarray(x), np.asarray(y)
                if x.shape != y.shape:
                    return {"max_abs": float("inf"), "max_rel": float("inf"), "equal": False,
                            "why": f"output shapes differ: {x.shape} vs {y.shape}"}
                if x.size == 0:
                    continue
                if x.dtype == object or x.dtype.kind in "SU" or y.dtype.kind in "SUO":
                    if not np.array_equal(x, y):
                        return {"max_abs": float("inf"), "max_rel": float("inf"),
                                "equal": False, "why": f"{where}: values differ"}
                    continue
                kind = np.complex128 if np.iscomplexobj(x) or np.iscomplexobj(y) else np.float64
                x64, y64 = x.astype(kind), y.astype(kind)
                # equal infinities and NaN on both sides agree; NaN on one side is infinitely off
                agree = (x64 == y64) | (np.isnan(x64) & np.isnan(y64))
                diff = np.where(agree, 0.0, _nan_inf(np.abs(x64 - y64)))
                rel = np.where(agree, 0.0, _nan_inf(diff / np.maximum(np.abs(x64), 1e-12)))
                max_abs, max_rel = max(max_abs, float(diff.max())), max(max_rel, float(rel.max()))
                scale = np.where(np.isfinite(x64), np.abs(x64), 0.0)
                equal &= bool(np.all(diff <= atol + rtol * scale))
    return {"max_abs": max_abs, "max_rel": max_rel, "equal": equal, "rtol": rtol, "atol": atol}


def _nan_inf(a: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(a), np.inf, a)


def ab_time(sessions: dict[str, Any], feed: dict[str, np.ndarray], *, rounds: int = 7,
            min_round_s: float = 0.05, warmup: int = 3) -> dict[str, dict[str, Any]]:
    """Time each session in interleaved rounds (A B A B ...), so that drift affects all alike.

    A round runs one session repeatedly for at least `min_round_s` (the same count for every
    session, fixed after warm-up) and records the mean time per run; the result per session
    is the median and minimum over rounds."""
    calls = {name: runner(sess, feed) for name, sess in sessions.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    first = next(iter(calls.values()))
    t0 = time.perf_counter()
    first()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(min_round_s / one))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            times[name].append((time.perf_counter() - t0) / reps)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "times": ts,
                   "runs_per_round": reps} for name, ts in times.items()}
