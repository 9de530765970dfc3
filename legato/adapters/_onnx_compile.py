"""Framework-free part of the graph-compile adapters (`legato.adapters.<framework>.compile`):
their options, tidying an exported ONNX model, `optimize` with its report, the onnxruntime
session that runs the result, the check against the framework's own outputs, and the record
of what each compile did.

Each adapter exports its framework's graph to ONNX, hands it to `compile_onnx`, and runs the
returned `OnnxRunner` on numpy arrays; when anything on that path fails it runs the framework's
own graph instead and says why (`CompileRecord.reason`).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from legato._extras import require

require("onnx", "onnx_ir", "onnxruntime",
        what="legato's compile backends (torch.compile(backend='legato'), optimize_function, "
             "optimize_block)")

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnx_ir.passes.common as ir_passes  # noqa: E402

from legato.core.errors import ConfigError, LegatoError
from legato.core.rewrite import Report, optimize

__all__ = ["ADAPTER_OPTIONS", "CompileRecord", "History", "OnnxRunner", "check_options",
           "compile_onnx", "compare", "first_line", "optimize_option_names", "tidy"]

logger = logging.getLogger(__name__)

# adapter options and their defaults; every other option goes to `optimize`
ADAPTER_OPTIONS: dict[str, Any] = {
    "optimize": True,   # run the rewrite search (False: run the exported model as it is)
    "check": True,      # compare onnxruntime's outputs with the framework's once, at compile
}
_ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def optimize_option_names() -> tuple[str, ...]:
    """The keyword arguments of `legato.core.rewrite.optimize` an adapter passes through."""
    params = inspect.signature(optimize).parameters.values()
    return tuple(p.name for p in params
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "progress")


def _default(name: str) -> Any:
    return inspect.signature(optimize).parameters[name].default


def check_options(options: Mapping[str, Any] | None, *,
                  extra: Mapping[str, Any] | None = None, where: str) -> dict[str, Any]:
    """Validate compile options: adapter options (with their defaults filled in), `extra`
    adapter-specific ones, and `optimize`'s keyword arguments; unknown names raise ConfigError
    listing the known ones."""
    options = dict(options or {})
    known = {**ADAPTER_OPTIONS, **(extra or {})}
    passthrough = optimize_option_names()
    unknown = sorted(k for k in options if k not in known and k not in passthrough)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; known: adapter options "
                          f"{sorted(known)} and optimize() options {sorted(passthrough)}")
    for name in ("optimize", "check"):
        if name in options and not isinstance(options[name], bool):
            raise ConfigError(f"{where}: option {name}={options[name]!r} must be True or False")
    for name in ("budget", "rounds", "threads"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"{where}: option {name}={value!r} is invalid; pass an int >= 1")
    level = options.get("level")
    if level is not None and level not in _ORT_LEVELS:
        raise ConfigError(f"{where}: option level={level!r} is invalid; use one of "
                          f"{sorted(_ORT_LEVELS)}")
    return {**known, **options}


def first_line(err: BaseException) -> str:
    """`Type: first line of the message` (legato's own errors without the type), for one-line
    reasons."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if type(err) is LegatoError else f"{type(err).__name__}: {line}".rstrip(": ")


@dataclasses.dataclass
class CompileRecord:
    """What one graph compile did: where the graph runs and why, and the rewrite report."""

    name: str
    runs_on: str                 # "onnxruntime", or the framework ("torch", "tensorflow", ...)
    reason: str
    report: Report | None = None
    export_s: float = 0.0
    optimize_s: float = 0.0
    model: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        """The rewritten model (not the exported one) is what runs."""
        return self.report is not None and self.report.accepted and self.runs_on == "onnxruntime"


class History:
    """The most recent compile records of one adapter (bounded)."""

    def __init__(self, maxlen: int = 64) -> None:
        self._records: collections.deque[CompileRecord] = collections.deque(maxlen=maxlen)
        self._count = 0

    def next_name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def add(self, record: CompileRecord) -> CompileRecord:
        self._records.append(record)
        return record

    def records(self) -> list[CompileRecord]:
        return list(self._records)

    def reports(self) -> list[Report]:
        return [r.report for r in self._records if r.report is not None]

    def clear(self) -> None:
        self._records.clear()


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights listed as graph inputs become plain initializers (constants the rules can
    match), and duplicate nodes are merged (MXNet emits one Flatten per Dense on the same
    input, which hides that the Gemms share it)."""
    m = ir.serde.deserialize_model(model)
    ir_passes.RemoveInitializersFromInputsPass()(m)
    ir_passes.CommonSubexpressionEliminationPass()(m)
    return ir.serde.serialize_model(m)


class OnnxRunner:
    """An onnxruntime CPU session of one model, run on numpy arrays in graph-input order."""

    def __init__(self, model: onnx.ModelProto, *, threads: int = 1, level: str = "all") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[level])
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # the same settings optimize() measured under; spinning threads would steal cores from
        # the framework around the graph between calls
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.model = model
        self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) != len(self.input_names):
            raise ConfigError(f"the compiled graph takes {len(self.input_names)} inputs "
                              f"({self.input_names}); got {len(arrays)}")
        feed = {n: np.ascontiguousarray(a) for n, a in zip(self.input_names, arrays)}
        return self.session.run(self.output_names, feed)


def compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], *, rtol: float,
            atol: float) -> str | None:
    """None when every output agrees within atol + rtol * |expected|, else why not."""
    if len(expected) != len(got):
        return f"{len(got)} outputs from onnxruntime, {len(expected)} from the framework"
    for i, (e, g) in enumerate(zip(expected, got)):
        e, g = np.asarray(e), np.asarray(g)
        if e.shape != g.shape:
            return f"output {i} has shape {g.shape} in onnxruntime, {e.shape} in the framework"
        if e.size and not np.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
            err = float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64))))
            return (f"output {i} differs from the framework's by up to {err:.3g} "
                    f"(rtol={rtol}, atol={atol})")
    return None


def compile_onnx(model: onnx.ModelProto, options: Mapping[str, Any], record: CompileRecord,
                 *, reference: Callable[[], Sequence[np.ndarray]] | None = None,
                 example: Sequence[np.ndarray] | None = None) -> OnnxRunner:
    """Tidy and (unless options["optimize"] is False) optimize `model`, load it in
    onnxruntime, and (if options["check"]) compare its outputs on `example` with
    `reference()`, the framework's own. Fills `record`; raises on any failure, for the caller
    to fall back on the framework with `record.reason`."""
    passthrough = {k: v for k, v in options.items() if k in optimize_option_names()}
    threads = passthrough.get("threads", _default("threads"))
    level = passthrough.get("level", _default("level"))
    undefined = sorted({n.op_type for n in model.graph.node
                        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)})
    if undefined:   # tf2onnx keeps going past ops it cannot convert
        raise LegatoError(f"the exported graph has operators ONNX does not define: "
                           f"{', '.join(undefined)}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise LegatoError(f"the exported graph is not valid ONNX: "
                           f"{str(err).strip().splitlines()[0]}") from err
    model = tidy(model)
    if options.get("optimize", True):
        start = time.perf_counter()
        try:
            model, record.report = optimize(model, **passthrough)
            record.reason = record.report.reason
        except Exception as err:  # noqa: BLE001 (the exported model still runs)
            record.reason = f"optimize failed ({first_line(err)}); the exported model runs"
            logger.warning("[%s] %s", record.name, record.reason)
        record.optimize_s = time.perf_counter() - start
    else:
        record.reason = "optimize=False: the exported model runs as it is"
    runner = OnnxRunner(model, threads=threads, level=level)
    if options.get("check", True) and reference is not None and example is not None:
        why = compare(reference(), runner.run(example),
                      rtol=passthrough.get("rtol", _default("rtol")),
                      atol=passthrough.get("atol", _default("atol")))
        if why is not None:
            raise LegatoError(f"onnxruntime disagrees with the framework: {why}")
    record.model = model
    record.runs_on = "onnxruntime"
    return runner
