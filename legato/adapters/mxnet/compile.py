"""MXNet Gluon blocks through legato's graph rewriter: a hybridized block is exported
(`block.export`, then `mx.onnx.export_model`) to ONNX, rewritten by
`legato.core.rewrite.optimize`, and run in onnxruntime on CPU.

    fast = optimize_block(net, nd.random.normal(shape=(8, 64)), budget=50)
    y = fast(x)                      # NDArray(s), as net(x) returns
    print(fast.report.explain())

Options: every keyword argument of `optimize` (budget, time_limit_s, rounds, threads, level,
rtol, atol, rules, ...), plus `optimize` (False: run the exported graph as it is) and `check`
(compare with MXNet once, on `example_inputs`; default True).

Inference only, with the weights the block has when `optimize_block` is called: after training
further, call it again. Input shapes are those of `example_inputs`. When the export, onnxruntime
or the check fails, the returned callable runs the block itself and says why
(`.runs_on == "mxnet"`, `.reason`, one warning); so it does when onnxruntime fails at a call.

mxnet 1.9.1's exporter predates onnx 1.15 [Note: mx2onnx and onnx 1.2x]: it reads
`onnx.mapping` (removed from onnx since), which is provided for the duration of the export from
`onnx.helper`'s dtype functions; and it stamps the model with the installed onnx's newest opset
while emitting its own newest translations (opset 13), so the model's opset is set back to 13.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import types
import warnings
from typing import Any, Iterator, Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon, nd

from legato.adapters._compiled import CompiledWithFallback
from legato.core.errors import BackendUnavailable, ConfigError

__all__ = ["OptimizedBlock", "last_compiles", "last_reports", "optimize_block"]

logger = logging.getLogger(__name__)

_history: Any = None


def _onnx():
    """The framework-free compile helpers (onnx, onnxruntime, legato.core.rewrite)."""
    try:
        from legato.adapters import _onnx_compile
    except ImportError as err:
        raise BackendUnavailable(
            f"optimize_block needs onnx, onnxruntime and onnx-ir in this environment ({err}); "
            "in .venv-mxnet they come from requirements/mxnet.txt (make setup)") from err
    return _onnx_compile


def _records():
    global _history
    if _history is None:
        _history = _onnx().History()
    return _history


def last_compiles() -> list:
    """Records (`CompileRecord`) of the latest optimized blocks, oldest first."""
    return _records().records()


def last_reports() -> list:
    """The rewrite `Report`s of the latest optimized blocks, oldest first."""
    return _records().reports()


def _as_inputs(example_inputs: Any) -> list[nd.NDArray]:
    items = list(example_inputs) if isinstance(example_inputs, (list, tuple)) \
        else [example_inputs]
    if not items:
        raise ConfigError("example_inputs is empty; pass the block's input NDArray(s)")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, nd.NDArray):
            out.append(item)
        elif isinstance(item, np.ndarray):
            out.append(nd.array(item, dtype=item.dtype))
        else:
            raise ConfigError(f"example_inputs[{i}] is a {type(item).__name__}; pass NDArrays "
                              "or numpy arrays, one per input of the block")
    return out


def _flatten(out: Any) -> tuple[list[nd.NDArray], bool]:
    """The block's outputs as a list, and whether it returned a sequence."""
    if isinstance(out, nd.NDArray):
        return [out], False
    if isinstance(out, (list, tuple)) and all(isinstance(o, nd.NDArray) for o in out):
        return list(out), True
    raise ConfigError(f"the block returned {type(out).__name__}; optimize_block handles an "
                      "NDArray or a flat list/tuple of NDArrays")


def optimize_block(block: gluon.HybridBlock, example_inputs: Any,
                   **options: Any) -> "OptimizedBlock":
    """Export a Gluon HybridBlock to ONNX, optimize it and run it in onnxruntime.

    Args:
        block: an initialized HybridBlock (hybridized here if it is not).
        example_inputs: an NDArray or numpy array, or a list of them, one per block input;
            their shapes and dtypes are the compiled graph's.
        **options: see the module docstring.
    Returns:
        A callable with the block's inputs and outputs (NDArrays), its `record`, `report`,
        `runs_on` and `reason`.
    """
    if not isinstance(block, gluon.HybridBlock):
        raise ConfigError(f"block is a {type(block).__name__}; optimize_block needs a "
                          "gluon.HybridBlock (HybridSequential, or a block with "
                          "hybrid_forward), which MXNet can export")
    inputs = _as_inputs(example_inputs)
    opts = _onnx().check_options(options, where="optimize_block")
    return OptimizedBlock(block, inputs, opts)


@contextlib.contextmanager
def _mx2onnx_compat() -> Iterator[None]:
    """`onnx.mapping` for mxnet's exporter, for the duration of the export (see the Note)."""
    import onnx
    from onnx import helper

    if hasattr(onnx, "mapping"):
        yield
        return
    mapping = types.ModuleType("onnx.mapping")
    to_np = {}
    for code in onnx.TensorProto.DataType.values():
        with contextlib.suppress(Exception):
            to_np[code] = helper.tensor_dtype_to_np_dtype(code)
    to_tensor = {}
    for dtype in set(to_np.values()):
        with contextlib.suppress(Exception):
            to_tensor[dtype] = helper.np_dtype_to_tensor_dtype(dtype)
    mapping.TENSOR_TYPE_TO_NP_TYPE = to_np
    mapping.NP_TYPE_TO_TENSOR_TYPE = to_tensor
    onnx.mapping = mapping
    sys.modules["onnx.mapping"] = mapping
    try:
        yield
    finally:
        del onnx.mapping
        sys.modules.pop("onnx.mapping", None)


def _export(block: gluon.HybridBlock, inputs: list[nd.NDArray],
            dynamic_batch: bool = False) -> Any:
    """The hybridized block (already run once) as an ONNX ModelProto; with `dynamic_batch`
    the inputs' first dimension is left free."""
    import onnx
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph

    with tempfile.TemporaryDirectory(prefix="legato-mx2onnx-") as tmp:
        prefix = os.path.join(tmp, "block")
        block.export(prefix, epoch=0)
        with _mx2onnx_compat(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = mx.onnx.export_model(
                f"{prefix}-symbol.json", f"{prefix}-0000.params",
                in_shapes=[tuple(x.shape) for x in inputs],
                in_types=[np.dtype(x.dtype) for x in inputs],
                onnx_file_path=os.path.join(tmp, "block.onnx"), dynamic=dynamic_batch,
                dynamic_input_shapes=[(None, *x.shape[1:]) for x in inputs]
                if dynamic_batch else None)
        model = onnx.load(path)
    translated = max(v for v in MXNetGraph.registry_ if v <= onnx.defs.onnx_opset_version())
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = min(opset.version, translated)
    return model


class OptimizedBlock(CompiledWithFallback):
    """A Gluon block running in onnxruntime (or in MXNet after a fallback)."""

    framework, label = "mxnet", "MXNet"
    _log = logger

    def __init__(self, block: gluon.HybridBlock, inputs: list[nd.NDArray],
                 options: dict[str, Any]) -> None:
        helpers = _onnx()
        history = _records()
        self.record = history.add(helpers.CompileRecord(history.next_name("block"), "mxnet", ""))
        self.block, self.options = block, options
        self.shapes = [tuple(x.shape) for x in inputs]
        self.dtypes = [np.dtype(x.dtype) for x in inputs]
        self.runner: Any = None
        self._sequence = False
        reason = self._build(inputs)
        if reason is not None:
            self._fall_back(reason)

    def _build(self, inputs: list[nd.NDArray]) -> str | None:
        helpers = _onnx()
        try:
            self.block.hybridize()
            outs, self._sequence = _flatten(self.block(*inputs))
            expected = [o.asnumpy() for o in outs]
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001
            return f"the block failed on example_inputs ({helpers.first_line(err)})"
        start = time.perf_counter()
        try:
            model = _export(self.block, inputs)
        except Exception as err:  # noqa: BLE001 (whatever mx2onnx raises: run in MXNet)
            return f"mx.onnx could not export the block ({helpers.first_line(err)})"
        self.record.export_s = time.perf_counter() - start
        try:
            self.runner = helpers.compile_onnx(model, self.options, self.record,
                                               example=[x.asnumpy() for x in inputs],
                                               reference=lambda: expected)
        except Exception as err:  # noqa: BLE001
            return f"the exported graph cannot run in onnxruntime: {helpers.first_line(err)}"
        logger.info("[legato %s] runs in onnxruntime: %s", self.record.name, self.record.reason)
        return None

    def _arrays(self, args: Sequence[Any]) -> list[np.ndarray]:
        if len(args) != len(self.shapes):
            raise ConfigError(f"the block was optimized for {len(self.shapes)} input(s); "
                              f"got {len(args)}")
        arrays = []
        for i, (value, shape, dtype) in enumerate(zip(args, self.shapes, self.dtypes)):
            array = value.asnumpy() if isinstance(value, nd.NDArray) else np.asarray(value)
            if array.shape != shape:
                raise ConfigError(f"input {i} has shape {array.shape}; the block was optimized "
                                  f"for {shape} (call optimize_block again for other shapes)")
            arrays.append(array.astype(dtype, copy=False))
        return arrays

    def __call__(self, *args: Any) -> Any:
        if self.runner is None:
            return self.block(*[a if isinstance(a, nd.NDArray) else nd.array(a) for a in args])
        arrays = self._arrays(args)
        try:
            outs = self.runner.run(arrays)
        except Exception as err:  # noqa: BLE001 (never crash the user's model)
            self._fall_back(f"onnxruntime failed at a call ({_onnx().first_line(err)})")
            return self.block(*[nd.array(a, dtype=a.dtype) for a in arrays])
        result = [nd.array(o, dtype=o.dtype) for o in outs]
        return result if self._sequence else result[0]
