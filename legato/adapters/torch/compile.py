"""`torch.compile(model, backend="legato")`: each graph dynamo captures is exported to ONNX
(the TorchScript exporter), rewritten by `legato.core.rewrite.optimize`, and run in
onnxruntime on CPU.

    fast = torch.compile(model.eval(), backend="legato", options={"budget": 50})
    with torch.inference_mode():
        y = fast(x)
    legato.adapters.torch.compile.last_reports()[-1].explain()

An installed legato is found by torch through its `torch_dynamo_backends` entry point, with no
import first; from a source tree on PYTHONPATH, `import legato.adapters.torch` registers it.

Options (`options={...}`, or module defaults from `configure(...)`): every keyword argument of
`optimize` (budget, time_limit_s, rounds, threads, level, rtol, atol, rules, ...), plus
`optimize` (False: run the exported graph as it is), `check` (compare with eager once, at
compile; default True) and `opset` (17). onnxruntime runs with `threads` intra-op threads (1
by default), the setting `optimize` measured under.

Inference only. A graph runs eagerly (the GraphModule itself), with one warning giving the
reason, when autograd is on and an input or parameter requires grad, when it runs in training
mode (dropout or batch norm with training=True) or writes to an input in place, when an input
is not a CPU tensor of a numpy dtype (dynamic shapes included), when the export, onnxruntime or
the compile-time check fails, or when onnxruntime fails at a call. `last_compiles()` keeps the
record of each graph, `last_reports()` the rewrite reports.

Parameters and buffers become ONNX initializers, which the rules need as constants
[Note: baked weights]: dynamo passes them as graph inputs, so the compiled graph checks at each
call that it got the same tensors at the same version (`Tensor._version`); after an in-place
update (an optimizer step, `load_state_dict`) it exports and optimizes again.
"""

from __future__ import annotations

import inspect
import io
import logging
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from legato.core.errors import BackendUnavailable, ConfigError

__all__ = ["BACKEND", "configure", "last_compiles", "last_reports", "legato_backend"]

logger = logging.getLogger(__name__)

BACKEND = "legato"
_EXTRA = {"opset": 17}
_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool}
_TRAINING_OPS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                 "feature_alpha_dropout", "batch_norm", "instance_norm"}
_lock = threading.Lock()
_defaults: dict[str, Any] = {}
_history: Any = None


def _onnx():
    """The framework-free compile helpers (onnx, onnxruntime, legato.core.rewrite)."""
    try:
        from legato.adapters import _onnx_compile
    except ImportError as err:
        raise BackendUnavailable(
            f"the legato torch.compile backend needs onnx, onnxruntime and onnx-ir ({err}); "
            "install them with `pip install 'legato[onnx]'`") from err
    return _onnx_compile


def _records():
    global _history
    with _lock:
        if _history is None:
            _history = _onnx().History()
        return _history


def configure(**options: Any) -> dict[str, Any]:
    """Set the default options of every later `torch.compile(..., backend="legato")` (those
    given in `options={...}` win); no arguments clears them.

    Returns:
        The previous defaults.
    """
    global _defaults
    _onnx().check_options(options, extra=_EXTRA, where="legato.adapters.torch.compile.configure")
    previous, _defaults = _defaults, dict(options)
    return previous


def last_compiles() -> list:
    """Records (`CompileRecord`) of the latest compiled graphs, oldest first: where each runs
    ("onnxruntime" or "torch"), why, the rewrite report and the model run."""
    return _records().records()


def last_reports() -> list:
    """The rewrite `Report`s of the latest compiled graphs, oldest first."""
    return _records().reports()


def legato_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                   options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """The dynamo backend: returns a callable running `gm` in onnxruntime, or `gm.forward`
    (with one warning) where it cannot.

    Args:
        gm: the graph dynamo captured.
        example_inputs: its inputs (parameters and buffers included).
        mode: torch.compile's mode; only "default" is meaningful here.
        options: torch.compile's options, over `configure`'s defaults (see the module doc).
    """
    if mode not in (None, "default"):
        raise ConfigError(f"torch.compile(backend='legato', mode={mode!r}): the legato backend "
                          "has no modes; leave mode out and pass options={...}")
    helpers = _onnx()
    opts = helpers.check_options({**_defaults, **(options or {})}, extra=_EXTRA,
                                 where="torch.compile(backend='legato')")
    history = _records()
    record = helpers.CompileRecord(history.next_name("graph"), "torch", "")
    history.add(record)
    return _OrtGraph(gm, list(example_inputs), opts, record).entry()


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _is_state(node: fx.Node, value: Any) -> bool:
    """A parameter or buffer of the user's module (which dynamo passes as an input)."""
    if isinstance(value, nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return isinstance(name, str) and "._buffers[" in name


def _training_flag(node: fx.Node) -> bool:
    target = node.target
    if getattr(target, "__name__", "") not in _TRAINING_OPS:
        return False
    try:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("training") is True


def _why_eager(gm: fx.GraphModule, example: list[Any]) -> str | None:
    """Why this graph cannot run in onnxruntime, or None."""
    names = [n.target for n in _placeholders(gm)]
    for name, value in zip(names, example):
        if not isinstance(value, torch.Tensor):
            return (f"input {name!r} is a {type(value).__name__} ({value!r}), not a tensor: "
                    "dynamic shapes are not supported; pass torch.compile(..., dynamic=False)")
        if value.device.type != "cpu":
            return (f"input {name!r} is on {value.device}; the legato backend runs onnxruntime "
                    "on CPU")
        if value.dtype not in _DTYPES or value.is_sparse or value.is_quantized:
            return f"input {name!r} has dtype {value.dtype} (layout {value.layout}), not numpy's"
    if torch.is_grad_enabled():
        nodes = _placeholders(gm)
        state = sum(1 for n, v in zip(nodes, example) if v.requires_grad and _is_state(n, v))
        state += sum(1 for p in gm.parameters() if p.requires_grad)
        inputs = [n.target for n, v in zip(nodes, example)
                  if v.requires_grad and not _is_state(n, v)]
        if state or inputs:
            what = " and ".join(([f"{state} parameter(s)"] if state else [])
                                + ([f"input(s) {inputs}"] if inputs else []))
            return (f"autograd is on and {what} require grad; the legato backend is "
                    "inference-only: call it under torch.no_grad() or torch.inference_mode()")
    placeholders = set(_placeholders(gm))
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if _training_flag(node):
            return (f"the graph runs {node.target.__name__} in training mode "
                    "(training=True); call model.eval() for the legato backend")
        op = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        inplace = (isinstance(op, str) and op.endswith("_") and not op.endswith("__")
                   or node.kwargs.get("inplace") is True)
        if inplace and node.args and node.args[0] in placeholders:
            return (f"the graph writes to its input {node.args[0].target!r} in place ({op}), "
                    "which ONNX cannot express")
    return None


class _Bound(nn.Module):
    """`gm` with its parameter and buffer inputs held as buffers, so that the exporter makes
    them initializers; the other inputs stay graph inputs."""

    def __init__(self, gm: fx.GraphModule, example: list[torch.Tensor], state: set[int]):
        super().__init__()
        self.gm = gm
        self.count = len(example)
        self.live = [i for i in range(len(example)) if i not in state]
        self.state = sorted(state)
        for i in self.state:
            self.register_buffer(f"state_{i}", example[i].detach())

    def forward(self, *live: torch.Tensor) -> Any:
        args: list[Any] = [None] * self.count
        for i, t in zip(self.live, live):
            args[i] = t
        for i in self.state:
            args[i] = getattr(self, f"state_{i}")
        return self.gm(*args)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _OrtGraph:
    """One compiled graph: the onnxruntime runner, or `gm` itself after a fallback."""

    def __init__(self, gm: fx.GraphModule, example: list[Any], options: dict[str, Any],
                 record: Any) -> None:
        self.gm, self.options, self.record = gm, options, record
        self.runner: Any = None
        self.state: list[tuple[int, torch.Tensor, int | None]] = []
        self.live: list[int] = []
        self.out_kind: type | None = None
        reason = _why_eager(gm, example)
        if reason is None:
            reason = self._build(example)
        if reason is not None:
            self._fall_back(reason)

    def entry(self) -> Callable[..., Any]:
        return self.gm.forward if self.runner is None else self

    def _fall_back(self, reason: str) -> None:
        self.runner = None
        self.record.runs_on, self.record.reason = "torch", reason
        logger.warning("[legato %s] runs eagerly in torch: %s", self.record.name, reason)

    def _build(self, example: list[torch.Tensor]) -> str | None:
        """Export, optimize, load and check; returns why not, or None."""
        helpers = _onnx()
        nodes = _placeholders(self.gm)
        state = {i for i, (n, v) in enumerate(zip(nodes, example)) if _is_state(n, v)}
        try:
            with torch.no_grad():
                eager = self.gm(*example)
        except Exception as err:  # noqa: BLE001
            return f"the graph failed eagerly on its example inputs ({helpers.first_line(err)})"
        flat = list(eager) if isinstance(eager, (tuple, list)) else [eager]
        if not all(isinstance(t, torch.Tensor) for t in flat):
            kinds = sorted({type(t).__name__ for t in flat if not isinstance(t, torch.Tensor)})
            return f"the graph returns non-tensor outputs ({', '.join(kinds)})"
        bound = _Bound(self.gm, example, state)
        live = [example[i] for i in bound.live]
        start = time.perf_counter()
        try:
            model = self._export(bound, live, [n.target for n in nodes], len(flat))
        except Exception as err:  # noqa: BLE001 (whatever the exporter raises: run eagerly)
            return f"the TorchScript ONNX exporter failed ({helpers.first_line(err)})"
        self.record.export_s = time.perf_counter() - start
        try:
            runner = helpers.compile_onnx(
                model, self.options, self.record, example=[_to_numpy(t) for t in live],
                reference=lambda: [_to_numpy(t) for t in flat])
        except Exception as err:  # noqa: BLE001
            return f"the exported graph cannot run in onnxruntime: {helpers.first_line(err)}"
        self.runner, self.live = runner, bound.live
        self.state = [(i, example[i], _version(example[i])) for i in bound.state]
        self.out_kind = type(eager) if isinstance(eager, (tuple, list)) else None
        logger.info("[legato %s] runs in onnxruntime: %s", self.record.name, self.record.reason)
        return None

    def _export(self, bound: _Bound, live: list[torch.Tensor], names: list[str],
                outputs: int) -> Any:
        import onnx

        buf = io.BytesIO()
        input_names = [str(names[i]) for i in bound.live]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(bound, tuple(live), buf, dynamo=False,
                              opset_version=self.options["opset"], input_names=input_names,
                              output_names=[f"output_{j}" for j in range(outputs)],
                              do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue())

    def _stale(self, args: tuple[Any, ...]) -> int | None:
        for i, t, version in self.state:
            a = args[i]
            if a is not t or (version is not None and _version(a) != version):
                return i
        return None

    def __call__(self, *args: Any) -> Any:
        if self.runner is None:
            return self.gm(*args)
        changed = self._stale(args)
        if changed is not None:
            logger.info("[legato %s] weight input %d changed since compile; exporting again",
                        self.record.name, changed)
            reason = self._build(list(args))
            if reason is not None:
                self._fall_back(reason)
                return self.gm(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                           for a in (args[i] for i in self.live)):
            return self.gm(*args)   # dynamo guards on this; never drop a graph autograd needs
        try:
            outs = self.runner.run([_to_numpy(args[i]) for i in self.live])
        except Exception as err:  # noqa: BLE001 (never crash the user's model)
            self._fall_back(f"onnxruntime failed at a call ({_onnx().first_line(err)})")
            return self.gm(*args)
        tensors = [torch.from_numpy(o) for o in outs]
        return tensors[0] if self.out_kind is None else self.out_kind(tensors)


def _register() -> None:
    """Make backend="legato" known to torch.compile. An installed legato declares it as a
    `torch_dynamo_backends` entry point, which torch loads by itself (registering here too
    would make torch's own load of the entry point fail as a duplicate); a source tree on
    PYTHONPATH has no entry point, so importing this module registers it."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.exc import InvalidBackend

    if any(ep.name == BACKEND for ep in entry_points(group="torch_dynamo_backends")):
        return
    try:
        lookup_backend(BACKEND)
    except InvalidBackend:
        torch._dynamo.register_backend(legato_backend, name=BACKEND)


_register()
