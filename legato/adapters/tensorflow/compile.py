"""TensorFlow functions and SavedModels through legato's graph rewriter: converted to ONNX
with tf2onnx (`from_function`; its `from_keras` fails on Keras 3, so a Keras model goes in as a
function), rewritten by `legato.core.rewrite.optimize`, and run in onnxruntime on CPU.

    fast = optimize_function(model, [tf.TensorSpec((8, 64), tf.float32, name="x")],
                             budget=50)
    y = fast(x)                      # tf.Tensor(s), structured like model(x)
    print(fast.report.explain())

    fast = optimize_saved_model("export/dir")          # the "serving_default" signature
    outputs = fast(x=...)                              # a dict, as the signature returns

Options: every keyword argument of `optimize` (budget, time_limit_s, rounds, threads, level,
rtol, atol, rules, ...), plus `optimize` (False: run the converted graph as it is), `check`
(compare with TensorFlow once, on random inputs; default True) and `opset` (17).

Inference only. When the conversion, onnxruntime or the check fails, the returned callable runs
the TensorFlow function itself and says why (`.runs_on == "tensorflow"`, `.reason`, one
warning); so it does when onnxruntime fails at a call.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from legato.adapters._compiled import CompiledWithFallback
from legato.core.errors import BackendUnavailable, ConfigError

__all__ = ["OptimizedFunction", "last_compiles", "last_reports", "optimize_function",
           "optimize_saved_model"]

logger = logging.getLogger(__name__)

_EXTRA = {"opset": 17}
_history: Any = None


def _onnx():
    """The framework-free compile helpers (onnx, onnxruntime, legato.core.rewrite)."""
    try:
        from legato.adapters import _onnx_compile
    except ImportError as err:
        raise BackendUnavailable(
            f"optimize_function needs onnx, onnxruntime and onnx-ir ({err}); install them "
            "with `pip install 'legato[onnx]'`") from err
    return _onnx_compile


def _records():
    global _history
    if _history is None:
        _history = _onnx().History()
    return _history


def last_compiles() -> list:
    """Records (`CompileRecord`) of the latest compiled functions, oldest first."""
    return _records().records()


def last_reports() -> list:
    """The rewrite `Report`s of the latest compiled functions, oldest first."""
    return _records().reports()


def _specs(input_signature: Any) -> list[tf.TensorSpec]:
    if isinstance(input_signature, tf.TensorSpec):
        input_signature = [input_signature]
    if not isinstance(input_signature, (list, tuple)) or not input_signature:
        raise ConfigError(f"input_signature={input_signature!r} is invalid; pass a list of "
                          "tf.TensorSpec, one per positional input, e.g. "
                          "[tf.TensorSpec((8, 64), tf.float32, name='x')]")
    bad = [i for i, s in enumerate(input_signature) if not isinstance(s, tf.TensorSpec)]
    if bad:
        raise ConfigError(f"input_signature[{bad[0]}] is a {type(input_signature[bad[0]]).__name__}"
                          "; every entry must be a tf.TensorSpec (nested structures are not "
                          "supported)")
    return list(input_signature)


def _example(spec: tf.TensorSpec, rng: np.random.Generator) -> np.ndarray:
    shape = [2 if d is None else d for d in spec.shape.as_list()] if spec.shape.rank is not None \
        else [2]
    dtype = spec.dtype.as_numpy_dtype
    if spec.dtype.is_floating:
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)        # zeros: valid indices for gathers and lookups


def optimize_function(fn: Callable[..., Any], input_signature: Sequence[tf.TensorSpec],
                      **options: Any) -> "OptimizedFunction":
    """Convert `fn` to ONNX with tf2onnx, optimize it and run it in onnxruntime.

    Args:
        fn: a tf.function, a Keras model or a Python function of tensors.
        input_signature: one tf.TensorSpec per positional input (None dims allowed).
        **options: see the module docstring.
    Returns:
        A callable with `fn`'s inputs and output structure (tf.Tensors), its `record`,
        `report`, `runs_on` and `reason`.
    """
    specs = _specs(input_signature)
    if not callable(fn):
        raise ConfigError(f"fn={fn!r} is not callable; pass a tf.function, a Keras model or a "
                          "function of tensors")
    opts = _onnx().check_options(options, extra=_EXTRA, where="optimize_function")
    return OptimizedFunction(fn, specs, opts)


def optimize_saved_model(path: str | os.PathLike, signature_key: str = "serving_default",
                         **options: Any) -> "OptimizedFunction":
    """Optimize one signature of a SavedModel: call the result with keyword arguments named
    after the signature's inputs (or positionally, in their sorted order); it returns the
    signature's output dict.

    Args:
        path: the SavedModel directory.
        signature_key: which signature ("serving_default").
        **options: see the module docstring.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"SavedModel path {str(path)!r} is not a directory")
    opts = _onnx().check_options(options, extra=_EXTRA, where="optimize_saved_model")
    loaded = tf.saved_model.load(str(path))
    if signature_key not in loaded.signatures:
        raise ConfigError(f"the SavedModel at {str(path)!r} has no signature "
                          f"{signature_key!r}; it has {sorted(loaded.signatures)}")
    signature = loaded.signatures[signature_key]
    kw_specs = signature.structured_input_signature[1]
    names = sorted(kw_specs)
    specs = [tf.TensorSpec(kw_specs[n].shape, kw_specs[n].dtype, name=n) for n in names]

    def call(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        return signature(**dict(zip(names, args)))

    return OptimizedFunction(call, specs, opts, keep=loaded)


class OptimizedFunction(CompiledWithFallback):
    """A TensorFlow function running in onnxruntime (or in TensorFlow after a fallback)."""

    framework, label = "tensorflow", "TensorFlow"
    _log = logger

    def __init__(self, fn: Callable[..., Any], specs: list[tf.TensorSpec],
                 options: dict[str, Any], *, keep: Any = None) -> None:
        helpers = _onnx()
        history = _records()
        self.record = history.add(helpers.CompileRecord(history.next_name("function"),
                                                        "tensorflow", ""))
        self.specs, self.options, self._keep = specs, options, keep
        self.names = [s.name or f"input_{i}" for i, s in enumerate(specs)]
        self.tf_function = fn if hasattr(fn, "get_concrete_function") else tf.function(fn)
        self.runner: Any = None
        self._structure: Any = None
        reason = self._build()
        if reason is not None:
            self._fall_back(reason)

    def _build(self) -> str | None:
        from legato._extras import require

        tf2onnx = require("tf2onnx", what="optimize_function and optimize_saved_model")

        helpers = _onnx()
        start = time.perf_counter()
        try:
            concrete = self.tf_function.get_concrete_function(*self.specs)
            self._structure = concrete.structured_outputs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, external = tf2onnx.convert.from_function(
                    self.tf_function, input_signature=self.specs, opset=self.options["opset"])
        except Exception as err:  # noqa: BLE001 (whatever tf2onnx raises: run in TensorFlow)
            return f"tf2onnx could not convert the function ({helpers.first_line(err)})"
        if external:
            return "tf2onnx stored weights outside the model (over 2 GB), which is not supported"
        self.record.export_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        example = [_example(s, rng) for s in self.specs]

        def reference() -> list[np.ndarray]:
            out = self.tf_function(*[tf.constant(a) for a in example])
            return [np.asarray(t) for t in tf.nest.flatten(out, expand_composites=True)]

        try:
            self.runner = helpers.compile_onnx(model, self.options, self.record,
                                               example=example, reference=reference)
        except Exception as err:  # noqa: BLE001
            return f"the converted graph cannot run in onnxruntime: {helpers.first_line(err)}"
        logger.info("[legato %s] runs in onnxruntime: %s", self.record.name, self.record.reason)
        return None

    def _arrays(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[np.ndarray]:
        if kwargs:
            unknown = sorted(set(kwargs) - set(self.names))
            if unknown:
                raise ConfigError(f"unknown input(s) {unknown}; the inputs are {self.names}")
            args = args + tuple(kwargs[n] for n in self.names[len(args):] if n in kwargs)
        if len(args) != len(self.specs):
            raise ConfigError(f"the function takes {len(self.specs)} input(s) {self.names}; "
                              f"got {len(args)}")
        arrays = []
        for name, spec, value in zip(self.names, self.specs, args):
            try:
                array = np.asarray(value.numpy() if hasattr(value, "numpy") else value,
                                   dtype=spec.dtype.as_numpy_dtype)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"input {name!r} cannot be read as {spec.dtype.name} "
                                  f"({err})") from err
            if not spec.shape.is_compatible_with(array.shape):
                raise ConfigError(f"input {name!r} has shape {array.shape}; the signature "
                                  f"says {spec.shape}")
            arrays.append(array)
        return arrays

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.runner is None:
            if kwargs:
                args = tuple(tf.constant(a) for a in self._arrays(args, kwargs))
            return self.tf_function(*args)
        arrays = self._arrays(args, kwargs)
        try:
            outs = self.runner.run(arrays)
        except Exception as err:  # noqa: BLE001 (never crash the user's model)
            self._fall_back(f"onnxruntime failed at a call ({_onnx().first_line(err)})")
            return self.tf_function(*[tf.constant(a) for a in arrays])
        return tf.nest.pack_sequence_as(self._structure, [tf.constant(o) for o in outs],
                                        expand_composites=True)
