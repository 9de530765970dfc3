"""Time ONNX models side by side under onnxruntime (CPU) and compare their outputs.

- `session`: an InferenceSession on CPUExecutionProvider with pinned thread counts and a named
  graph optimization level ("disabled", "basic", "extended", "all").
- `ab_time`: times several models on the same inputs in interleaved rounds (A B C A B C ...), so
  drift on a noisy machine (frequency, other tenants, page cache) hits every model alike.
  Each round runs `runs_per_round` inferences of one model back to back and records their mean;
  the result per model is the median and minimum over rounds, and every round's time.
- `compare_outputs`: max absolute and max relative error of a new model against a reference,
  and whether every output is within rtol 1e-4, atol 1e-5 (float32), numpy's
  |new - ref| <= atol + rtol * |ref|. Outputs are matched by position and must agree in count
  and shape.
- `baselines`: what existing tools make of a model: onnxsim (`onnxsim.simplify`) and
  onnxoptimizer (`onnxoptimizer.optimize` with its fuse-and-elimination passes, its default).
  A tool that raises or fails its own check is recorded with the reason in `.failures`.

A model is an `onnx.ModelProto`, serialized bytes, or a path to an .onnx file.

[Note: spinning] onnxruntime's intra-op worker threads busy-wait ("spin") after each run by
default. With several sessions alive, as in an A/B comparison, the idle sessions' spinning
workers compete for the cores with the session being timed: on this 2-core VM, three copies of
one model timed at threads=2 gave medians from 6.5 to 12.9 ms (ResNet-50, batch 1) with
spinning, and 3.99-4.02 ms without. So `session` turns spinning off unless asked
(`spinning=True`); at threads=1 there are no workers and it makes no difference.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

Model = Union[onnx.ModelProto, bytes, str, os.PathLike]

LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
RTOL = 1e-4  # float32 tolerance of compare_outputs
ATOL = 1e-5


def _model_arg(model: Model) -> str | bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    raise TypeError(f"model is a {type(model).__name__}; pass an onnx.ModelProto, bytes or a path")


def session(model: Model, *, level: str = "all", threads: int = 1,
            optimized_model_path: str | os.PathLike | None = None,
            denormal_as_zero: bool = False, spinning: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads and one inter-op thread.

    Args:
        model: ModelProto, serialized bytes or .onnx path.
        level: graph optimization level: "disabled", "basic", "extended" or "all".
        threads: intra_op_num_threads (>= 1).
        optimized_model_path: where onnxruntime saves the graph after its own optimizations.
        denormal_as_zero: set session.set_denormal_as_zero (flush denormals in kernels).
        spinning: let idle intra-op workers busy-wait (onnxruntime's default; off here, see
            [Note: spinning]).
    Returns:
        The InferenceSession.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is unknown; known: {', '.join(LEVELS)}")
    if threads < 1:
        raise ValueError(f"threads={threads} is invalid; pass threads >= 1")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    if optimized_model_path is not None:
        opts.optimized_model_filepath = os.fspath(optimized_model_path)
    if denormal_as_zero:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(_model_arg(model), opts, providers=["CPUExecutionProvider"])


def _feed(sess: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise KeyError(f"inputs lack {missing}; the model takes {names}, given {list(inputs)}")
    return {n: inputs[n] for n in names}


def _calibrate(sess, feed, target_round_s: float) -> int:
    start = time.perf_counter()
    sess.run(None, feed)
    one_s = max(time.perf_counter() - start, 1e-6)
    return max(1, min(1000, round(target_round_s / one_s)))


def ab_time(models: dict[str, Model], inputs: dict[str, np.ndarray], *, level: str = "all",
            threads: int = 1, rounds: int = 7, runs_per_round: int | None = None,
            warmup: int = 3, target_round_s: float = 0.05,
            spinning: bool = False) -> dict[str, dict]:
    """Time models on the same inputs in interleaved rounds (A B C A B C ...).

    Args:
        models: name -> model; every model takes (a subset of) `inputs`.
        inputs: input name -> array.
        level, threads, spinning: as for `session` (all sessions stay alive throughout).
        rounds: timed rounds; each runs every model once, in the dict's order.
        runs_per_round: inferences per model per round; None picks, per model, about
            target_round_s worth (from one run after warm-up), between 1 and 1000.
        warmup: untimed inferences per model before the first round.
    Returns:
        name -> {"median_s", "min_s", "times": per-round seconds per inference, "runs_per_round"}.
    """
    if rounds < 1 or warmup < 0 or (runs_per_round is not None and runs_per_round < 1):
        raise ValueError(f"rounds={rounds}, warmup={warmup}, runs_per_round={runs_per_round}: "
                         "pass rounds >= 1, warmup >= 0 and runs_per_round >= 1 (or None)")
    sessions = {name: session(m, level=level, threads=threads, spinning=spinning)
                for name, m in models.items()}
    feeds = {name: _feed(s, inputs) for name, s in sessions.items()}
    runs = {}
    for name, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feeds[name])
        runs[name] = runs_per_round or _calibrate(sess, feeds[name], target_round_s)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            run, feed, n = sess.run, feeds[name], runs[name]
            start = time.perf_counter()
            for _ in range(n):
                run(None, feed)
            times[name].append((time.perf_counter() - start) / n)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "times": t,
                   "runs_per_round": runs[name]} for name, t in times.items()}


def run(model: Model, inputs: dict[str, np.ndarray], *, level: str = "all",
        threads: int = 1) -> list[np.ndarray]:
    """One inference: the outputs in graph order."""
    sess = session(model, level=level, threads=threads)
    return sess.run(None, _feed(sess, inputs))


def compare_outputs(ref_model: Model, new_model: Model, inputs: dict[str, np.ndarray],
                    level: str = "all", threads: int = 1, *, rtol: float = RTOL,
                    atol: float = ATOL) -> dict:
    """Max abs/rel error of new_model's outputs against ref_model's (both run under ORT).

    max_rel is max |new - ref| / |ref| over elements with |ref| > atol (0 if there are none).
    equal_within is True when every output has the reference's shape and
    |new - ref| <= atol + rtol * |ref| everywhere (NaN only where the reference has NaN).
    Returns:
        {"max_abs", "max_rel", "equal_within", "rtol", "atol", "reason"}; reason says what
        differs ("" when equal within tolerance).
    """
    ref = run(ref_model, inputs, level=level, threads=threads)
    new = run(new_model, inputs, level=level, threads=threads)
    result = {"max_abs": 0.0, "max_rel": 0.0, "equal_within": True, "rtol": rtol, "atol": atol,
              "reason": ""}
    if len(ref) != len(new):
        return result | {"max_abs": float("inf"), "max_rel": float("inf"), "equal_within": False,
                         "reason": f"{len(new)} outputs, reference has {len(ref)}"}
    for i, (r, n) in enumerate(zip(ref, new)):
        if r.shape != n.shape:
            return result | {"max_abs": float("inf"), "max_rel": float("inf"),
                             "equal_within": False,
                             "reason": f"output {i} has shape {n.shape}, reference {r.shape}"}
        r64, n64 = r.astype(np.float64), n.astype(np.float64)
        nan_r, nan_n = np.isnan(r64), np.isnan(n64)
        if (nan_n & ~nan_r).any():
            result |= {"max_abs": float("inf"), "max_rel": float("inf"), "equal_within": False,
                       "reason": f"output {i} has NaN where the reference has none"}
            continue
        ok = ~(nan_r | nan_n)
        diff = np.abs(n64 - r64)[ok]
        mag = np.abs(r64)[ok]
        if diff.size:
            result["max_abs"] = max(result["max_abs"], float(diff.max()))
            big = mag > atol
            if big.any():
                result["max_rel"] = max(result["max_rel"], float((diff[big] / mag[big]).max()))
            bad = diff > atol + rtol * mag
            if bad.any() and result["equal_within"]:
                j = int(np.argmax(bad))
                result["equal_within"] = False
                result["reason"] = (f"output {i}: {int(bad.sum())} of {bad.size} elements outside "
                                    f"rtol={rtol}, atol={atol} (first: new "
                                    f"{n64[ok][j]:.6g} vs ref {r64[ok][j]:.6g})")
        if (nan_r & ~nan_n).any() and result["equal_within"]:
            result["equal_within"] = False
            result["reason"] = f"output {i} lacks NaN where the reference has one"
    return result


class Baselines(dict):
    """name -> optimized ModelProto for each tool that succeeded; `.failures`: name -> reason;
    `.seconds`: name -> time the tool took."""

    def __init__(self):
        super().__init__()
        self.failures: dict[str, str] = {}
        self.seconds: dict[str, float] = {}


def _onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, check_ok = onnxsim.simplify(model)
    if not check_ok:
        raise RuntimeError("onnxsim's own output check failed (simplified model differs)")
    return simplified


def _onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, onnxoptimizer.get_fuse_and_elimination_passes())


BASELINE_TOOLS = {"onnxsim": _onnxsim, "onnxoptimizer": _onnxoptimizer}


def baselines(model: onnx.ModelProto) -> Baselines:
    """Run each tool in BASELINE_TOOLS on a copy of `model`; failures are recorded, not raised.

    Returns:
        A Baselines dict: name -> ModelProto (passes onnx.checker), with .failures and .seconds.
    """
    out = Baselines()
    for name, tool in BASELINE_TOOLS.items():
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        start = time.perf_counter()
        try:
            optimized = tool(copy)
            onnx.checker.check_model(optimized)
        except Exception as exc:  # noqa: BLE001 - any tool failure is a result to report
            out.failures[name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            log.warning("baseline %s failed: %s", name, out.failures[name])
        else:
            out[name] = optimized
        out.seconds[name] = time.perf_counter() - start
    return out


def load(model: Model) -> onnx.ModelProto:
    """A ModelProto from any Model form."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(Path(model)))
