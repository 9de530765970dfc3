"""The onnx package's backend test corpus as cases for `optimize`, and the checks every result
must pass (issue 15, item 2). Shared by tests/core/rewrite/test_onnx_corpus.py and
benchmarks/rewrite_corpus.py.

The corpus is what the installed onnx package ships:
- `node`: the operator test cases, built in memory by
  `onnx.backend.test.case.node.collect_testcases()` (their folders are not in the wheel);
- `simple`: the model test cases of `onnx.backend.test.case.model.collect_testcases()` of kind
  "simple", and any `data/simple/<case>/model.onnx` on disk that they do not cover;
- `light`: `data/light/light_<name>.onnx`, CNNs whose weights are ConstantOfShape nodes, run
  the way onnx's runner does: one input `arange(n) / n` per model input, expected outputs
  `light_<name>_output_<i>.pb`;
- `real`: the model test cases of kind "real", whose data.json points at a light model: the
  same file, with the case's own rtol and atol (the result of `optimize` is shared);
- `pytorch-converted`, `pytorch-operator`: `data/<folder>/<case>/model.onnx` with
  `test_data_set_*/{input,output}_*.pb`.

`run(case)` calls `optimize` and classifies the outcome (refused, unchanged, not-kept,
accepted, or error: an exception other than RewriteError); `check(...)` returns the problems
found in a result (none: it is valid, has the original's interface and computes its outputs)
and notes on what could not be checked; `summarize(outcomes)` is the per-folder table.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

DATA = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
FOLDERS = ("node", "simple", "light", "real", "pytorch-converted", "pytorch-operator")
# `optimize` settings per folder: small, so that the corpus runs in about 3 minutes on 2 cores.
# The light CNNs need a few seconds to price their operators on an empty cost cache (the time
# limit counts from the search's start, so with 2 s most would stop before exploring a graph).
OPTIONS = {"default": {"budget": 3, "time_limit_s": 2.0, "rounds": 3},
           "light": {"budget": 2, "time_limit_s": 6.0, "rounds": 3}}
OPTIONS["real"] = OPTIONS["light"]          # the same files (their results are shared)
APPLIED_KEY = "legato.rewrite.applied"


@dataclasses.dataclass
class Case:
    """One model of the corpus with its test data."""

    folder: str
    name: str
    load: Callable[[], onnx.ModelProto]
    # [(inputs by name, expected outputs by position)], TensorProtos already numpy
    data: Callable[[onnx.ModelProto], list[tuple[dict[str, Any], list[Any]]]]
    rtol: float = 1e-3
    atol: float = 1e-7
    source: str = ""             # the file the model comes from; cases sharing it share a result

    @property
    def id(self) -> str:
        return f"{self.folder}/{self.name}"


# ---------------------------------------------------------------------------- the corpus

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnx's case generators warn (numpy overflows on purpose) and some print."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def _array(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return value


def _proto_value(path: str, tp: onnx.TypeProto) -> Any:
    """A test data file read as the graph's type says (onnx's runner `_load_proto`)."""
    raw = Path(path).read_bytes()
    kind = tp.WhichOneof("value")
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(raw)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(raw)
        return numpy_helper.to_optional(opt)
    if kind == "map_type":
        mp = onnx.MapProto()
        mp.ParseFromString(raw)
        return numpy_helper.to_dict(mp)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(raw)
    return numpy_helper.to_array(tensor)


def _folder_data(case_dir: Path) -> Callable[[onnx.ModelProto], list]:
    def data(model: onnx.ModelProto) -> list:
        sets = []
        for d in sorted(glob.glob(str(case_dir / "test_data_set_*"))):
            n_in = len(glob.glob(os.path.join(d, "input_*.pb")))
            n_out = len(glob.glob(os.path.join(d, "output_*.pb")))
            # onnx's runner pairs input_i with graph.input[i]
            inputs = [_proto_value(os.path.join(d, f"input_{i}.pb"), model.graph.input[i].type)
                      for i in range(n_in)]
            outputs = [_proto_value(os.path.join(d, f"output_{i}.pb"),
                                    model.graph.output[i].type) for i in range(n_out)]
            sets.append((_feed(model, inputs), outputs))
        return sets
    return data


def _dir_cases(folder: str) -> list[Case]:
    cases = []
    for d in sorted((DATA / folder).iterdir()) if (DATA / folder).is_dir() else []:
        path = d / "model.onnx"
        if path.exists():
            cases.append(Case(folder, d.name, functools.partial(onnx.load, str(path)),
                              _folder_data(d), source=str(path)))
    return cases


def _light_data(path: Path) -> Callable[[onnx.ModelProto], list]:
    """onnx's runner for light models: inputs `arange(n) / n`, outputs from the .pb files."""
    def data(model: onnx.ModelProto) -> list:
        from onnx.backend.test.runner import Runner

        inits = {t.name for t in model.graph.initializer}
        feed = {vi.name: Runner.generate_dummy_data(vi, seed=0, name=path.stem, random=False)
                for vi in model.graph.input if vi.name not in inits}
        outputs = []
        for i, vi in enumerate(model.graph.output):
            pb = path.with_name(f"{path.stem}_output_{i}.pb")
            if not pb.exists():
                return [(feed, [])]
            outputs.append(_proto_value(str(pb), vi.type))
        return [(feed, outputs)]
    return data


def _light_cases() -> list[Case]:
    return [Case("light", p.stem, functools.partial(onnx.load, str(p)), _light_data(p),
                 source=str(p))
            for p in sorted((DATA / "light").glob("light_*.onnx"))]


def _memory_case(folder: str, tc: Any) -> Case:
    model = tc.model
    sets = [(_feed(model, [_array(x) for x in ins]), [_array(y) for y in outs])
            for ins, outs in (tc.data_sets or [])]

    def load() -> onnx.ModelProto:               # a copy: a run must not see another's changes
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy

    return Case(folder, tc.name, load, lambda _m: sets, rtol=tc.rtol, atol=tc.atol,
                source=f"{folder}/{tc.name}")


def _model_cases() -> tuple[list[Case], list[Case]]:
    """(simple, real) from onnx's model test cases, plus simple folders on disk not covered."""
    from onnx.backend.test.case import model as model_cases

    with _quiet():
        tcs = model_cases.collect_testcases()
    simple = [_memory_case("simple", tc) for tc in tcs if tc.kind == "simple"]
    have = {c.name for c in simple}
    simple += [c for c in _dir_cases("simple") if c.name not in have]
    real = []
    for tc in tcs:
        if tc.kind != "real":
            continue
        path = DATA.parents[2].parent / tc.url if tc.url else None   # url is from site-packages
        if path is None or not path.exists():
            raise FileNotFoundError(f"the real case {tc.name} points at {tc.url}, which is not "
                                    "in this onnx installation")
        real.append(Case("real", tc.name, functools.partial(onnx.load, str(path)),
                         _light_data(path), rtol=tc.rtol, atol=tc.atol, source=str(path)))
    # real/<case>/data.json on disk names the same files
    for d in sorted((DATA / "real").glob("*/data.json")):
        meta = json.loads(d.read_text())
        if d.parent.name not in {c.name for c in real}:
            path = DATA.parents[2].parent / meta["url"]
            real.append(Case("real", d.parent.name, functools.partial(onnx.load, str(path)),
                             _light_data(path), rtol=meta.get("rtol", 1e-3),
                             atol=meta.get("atol", 1e-7), source=str(path)))
    return simple, real


def _node_cases() -> list[Case]:
    from onnx.backend.test.case import node as node_cases

    with _quiet():
        return [_memory_case("node", tc) for tc in node_cases.collect_testcases()]


@functools.lru_cache(maxsize=None)
def cases(folders: tuple[str, ...] = FOLDERS) -> list[Case]:
    """Every case of the given folders, in folder then name order (node: onnx's order)."""
    out: list[Case] = []
    simple, real = _model_cases() if {"simple", "real"} & set(folders) else ([], [])
    for folder in folders:
        if folder == "node":
            out += _node_cases()
        elif folder == "simple":
            out += simple
        elif folder == "real":
            out += real
        elif folder == "light":
            out += _light_cases()
        elif folder in FOLDERS:
            out += _dir_cases(folder)
        else:
            raise KeyError(f"unknown corpus folder {folder!r}; known: {', '.join(FOLDERS)}")
    return out


# ---------------------------------------------------------------------------- running models

def _feed(model: onnx.ModelProto, inputs: list[Any]) -> dict[str, Any]:
    """Inputs by name: test data is positional over graph.input (onnx's runner)."""
    names = [vi.name for vi in model.graph.input]
    return dict(zip(names, inputs))


def _run_ort(model: onnx.ModelProto, feed: dict[str, Any]) -> list[Any]:
    from legato.core.rewrite.measure import outputs, session

    sess = session(model, level="all", threads=1)
    known = {i.name for i in sess.get_inputs()}
    return outputs(sess, {k: v for k, v in feed.items() if k in known})


def _run_reference(model: onnx.ModelProto, feed: dict[str, Any]) -> list[Any]:
    from onnx.reference import ReferenceEvaluator

    with _quiet():
        return list(ReferenceEvaluator(model).run(None, feed))


RUNTIMES = {"onnxruntime": _run_ort, "reference": _run_reference}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def runtime_for(model: onnx.ModelProto, feed: dict[str, Any]
                ) -> tuple[str | None, list[Any] | None, list[str]]:
    """The first runtime that runs `model` on `feed`: (its name, the outputs, why the others
    could not), or (None, None, reasons)."""
    why = []
    for name, run in RUNTIMES.items():
        try:
            with _quiet():
                return name, run(model, feed), why
        except Exception as err:  # noqa: BLE001 (an operator the runtime lacks, ...)
            why.append(f"{name}: {_first_line(err)}")
    return None, None, why


# ---------------------------------------------------------------------------- comparing

def differences(got: list[Any], want: list[Any], rtol: float, atol: float) -> list[str]:
    """Where `got` and `want` (outputs by position) differ beyond atol + rtol * |want|; NaN
    equals NaN, strings and other objects compare exactly, sequences element by element."""
    if len(got) != len(want):
        return [f"{len(got)} outputs, expected {len(want)}"]
    found: list[str] = []
    for i, (g, w) in enumerate(zip(got, want)):
        _diff(g, w, f"output {i}", rtol, atol, found)
    return found


def _diff(g: Any, w: Any, where: str, rtol: float, atol: float, found: list[str]) -> None:
    if w is None or g is None:
        if not (g is None and w is None):
            found.append(f"{where}: {type(g).__name__} against {type(w).__name__}")
        return
    if isinstance(w, dict) or isinstance(g, dict):
        if not isinstance(g, dict) or not isinstance(w, dict) or g.keys() != w.keys():
            found.append(f"{where}: maps differ")
            return
        for k in w:
            _diff(g[k], w[k], f"{where}[{k!r}]", rtol, atol, found)
        return
    if isinstance(w, (list, tuple)) or isinstance(g, (list, tuple)):
        if not isinstance(g, (list, tuple)) or not isinstance(w, (list, tuple)) or len(
                g) != len(w):
            found.append(f"{where}: sequence of {len(g) if isinstance(g, (list, tuple)) else g!r}"
                         f" against {len(w) if isinstance(w, (list, tuple)) else w!r}")
            return
        for j, (a, b) in enumerate(zip(g, w)):
            _diff(a, b, f"{where}[{j}]", rtol, atol, found)
        return
    g, w = np.asarray(g), np.asarray(w)
    if g.shape != w.shape:
        found.append(f"{where}: shape {g.shape} against {w.shape}")
        return
    if g.dtype != w.dtype:
        found.append(f"{where}: dtype {g.dtype} against {w.dtype}")
        return
    if w.dtype.kind in "OSUbiu":                 # strings, bools and integers: exactly
        if not np.array_equal(g, w):
            bad = int(np.sum(g != w))
            found.append(f"{where}: {bad} of {w.size} values differ ({w.dtype})")
        return
    kind = np.complex128 if np.iscomplexobj(g) or np.iscomplexobj(w) else np.float64
    try:
        g64, w64 = g.astype(kind), w.astype(kind)
    except (TypeError, ValueError):
        if not np.array_equal(g, w):
            found.append(f"{where}: values differ ({w.dtype})")
        return
    same = (g64 == w64) | (np.isnan(g64) & np.isnan(w64))
    with np.errstate(invalid="ignore", over="ignore"):      # inf - inf where they differ
        err = np.where(same, 0.0, np.abs(g64 - w64))
    err = np.where(np.isnan(err), np.inf, err)
    bound = atol + rtol * np.where(np.isfinite(w64), np.abs(w64), 0.0)
    if np.any(err > bound):
        k = int(np.argmax(err - bound))
        found.append(f"{where}: {int(np.sum(err > bound))} of {w.size} values beyond "
                     f"rtol={rtol}, atol={atol} (largest error {float(err.flat[k]):.3g} where "
                     f"the original gives {w64.flat[k]})")


# ---------------------------------------------------------------------------- checking

@dataclasses.dataclass
class Outcome:
    """What `optimize` made of one case and what the checks found."""

    case: str
    status: str                 # refused, unchanged, not-kept, accepted, error
    reason: str = ""            # the refusal's message, or report.reason
    applied: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)   # failed checks
    notes: list[str] = dataclasses.field(default_factory=list)      # what was not checked
    seconds: float = 0.0
    where: str = ""             # for an error: the frames that raised it (`_frames`)
    known: str = ""             # set by the test: the known bug this failure is


def _true_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        with _quiet():
            onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:  # noqa: BLE001 (strict shape inference fails on some valid inputs)
        return False


def check(case: Case, original: onnx.ModelProto, original_bytes: bytes,
          result: onnx.ModelProto, report: Any) -> tuple[list[str], list[str]]:
    """(problems, notes) for `optimize`'s result on `case`; see the module docstring."""
    problems: list[str] = []
    notes: list[str] = []
    if original.SerializeToString() != original_bytes:
        problems.append("optimize modified the model it was given")
    if not report.accepted:
        if result is not original:
            problems.append("the rewrite was not accepted, but optimize returned another model "
                            "than the one it was given")
        return problems, notes
    # validity
    full = _passes_full_check(original)
    try:
        with _quiet():
            onnx.checker.check_model(result, full_check=full)
    except Exception as err:  # noqa: BLE001
        problems.append(f"the result fails onnx.checker.check_model(full_check={full}): "
                        f"{_first_line(err)}")
    # interface
    if [vi.SerializeToString() for vi in _true_inputs(result)] != [
            vi.SerializeToString() for vi in _true_inputs(original)]:
        problems.append(f"inputs changed: {[vi.name for vi in _true_inputs(original)]} -> "
                        f"{[vi.name for vi in _true_inputs(result)]}")
    if list(result.graph.output) != list(original.graph.output):
        problems.append(f"outputs changed: {[vi.name for vi in original.graph.output]} -> "
                        f"{[vi.name for vi in result.graph.output]}")
    if result.ir_version != original.ir_version and report.ir_version_change != (
            original.ir_version, result.ir_version):
        problems.append(f"IR version {original.ir_version} -> {result.ir_version}, and the "
                        f"report says {report.ir_version_change}")
    opsets = sorted((o.domain, o.version) for o in original.opset_import)
    if sorted((o.domain, o.version) for o in result.opset_import) != opsets:
        problems.append(f"opset imports changed: {opsets} -> "
                        f"{sorted((o.domain, o.version) for o in result.opset_import)}")
    meta = {p.key: p.value for p in result.metadata_props}
    if APPLIED_KEY not in meta:
        problems.append(f"accepted, but metadata_props has no {APPLIED_KEY}")
    elif json.loads(meta[APPLIED_KEY]) != list(report.applied):
        problems.append(f"{APPLIED_KEY} is {meta[APPLIED_KEY]}, the report says "
                        f"{report.applied}")
    # outputs: the original's and the result's on the case's test data (else random inputs)
    feeds = [feed for feed, _ in case.data(original)]
    if not feeds:
        from legato.core.rewrite.measure import random_feed

        try:
            feeds = [random_feed(original, seed=k) for k in range(2)]
            notes.append("no test data: compared on random inputs")
        except ValueError as err:
            notes.append(f"outputs not compared: no test data, and {err}")
    for k, feed in enumerate(feeds):
        name, want, why = runtime_for(original, feed)
        if name is None:
            notes.append(f"outputs not compared on data set {k}: neither runtime runs the "
                         f"original ({'; '.join(why)})")
            continue
        try:
            with _quiet():
                got = RUNTIMES[name](result, feed)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{name} runs the original but not the result: {_first_line(err)}")
            continue
        found = differences(got, want, case.rtol, case.atol)
        if found:
            with _quiet():
                again = RUNTIMES[name](original, feed)
            if differences(again, want, case.rtol, case.atol):
                # random operators (Bernoulli, RandomNormal, ...): no two runs agree
                notes.append(f"outputs not compared on data set {k}: two runs of the original "
                             f"under {name} differ (a random operator)")
                continue
        problems += [f"data set {k} ({name}): {d}" for d in found]
    return problems, notes


def round_trip(case: Case) -> tuple[list[str], list[str]]:
    """(problems, notes) for `modelio` alone: `prepare` then `finish` with no rewrite in
    between, checked as an accepted result would be. Few corpus models match a rule, so this is
    what tells whether `finish` would give back a valid, equal model for each of them (control
    flow, sequences, optionals, functions, IR 3 initializer inputs, ...)."""
    from legato.core.rewrite import modelio

    original = case.load()
    before = original.SerializeToString()
    try:
        prepared = modelio.prepare(original)
        done = modelio.finish(prepared, prepared.model.clone())
    except modelio.RewriteError as err:
        return [], [f"refused: {err}"]
    except Exception as err:  # noqa: BLE001
        return [f"prepare/finish raised {_first_line(err)} (at {_frames(err)})"], []
    done.proto.metadata_props.add(key=APPLIED_KEY, value="[]")
    report = _RoundTrip(ir_version_change=done.ir_version_change)
    return check(case, original, before, done.proto, report)


@dataclasses.dataclass
class _RoundTrip:
    """What `check` reads of a report, for `round_trip`."""

    accepted: bool = True
    applied: list[str] = dataclasses.field(default_factory=list)
    ir_version_change: tuple[int, int] | None = None


def options_for(case: Case) -> dict[str, Any]:
    return dict(OPTIONS.get(case.folder, OPTIONS["default"]))


def run(case: Case, optimize_kwargs: dict[str, Any] | None = None,
        shared: dict[str, tuple] | None = None) -> Outcome:
    """`optimize` on `case` (or the result shared with an earlier case of the same file), then
    `check`. Exceptions other than RewriteError are recorded as status "error". The options
    default to `options_for(case)`."""
    import time

    from legato.core.rewrite import optimize
    from legato.core.rewrite.modelio import RewriteError

    if optimize_kwargs is None:
        optimize_kwargs = options_for(case)
    t0 = time.perf_counter()
    if shared is not None and case.source in shared:
        original, original_bytes, result, report, err = shared[case.source]
    else:
        original = case.load()
        original_bytes = original.SerializeToString()
        result = report = err = None
        try:
            with _quiet():
                result, report = optimize(original, **optimize_kwargs)
        except Exception as exc:  # noqa: BLE001 (recorded, and a test fails on it)
            err = exc
        if shared is not None:
            shared[case.source] = (original, original_bytes, result, report, err)
    seconds = time.perf_counter() - t0
    if err is not None:
        if isinstance(err, RewriteError):
            return Outcome(case.id, "refused", str(err), seconds=seconds)
        where = _frames(err)
        return Outcome(case.id, "error", _first_line(err), where=where,
                       problems=[f"optimize raised {_first_line(err)} (at {where})"],
                       seconds=seconds)
    status = ("accepted" if report.accepted else "not-kept" if report.applied else "unchanged")
    reason = report.reason
    if status == "unchanged" and not report.explored and str(report.stop_reason).endswith(
            "time-limit"):
        # the search ran out of time pricing the input, before it looked for a match
        reason = (f"time limit reached before the first graph was explored "
                  f"({report.search_s:.1f} s; optimize said: {report.reason})")
    outcome = Outcome(case.id, status, reason, list(report.applied), seconds=seconds)
    outcome.problems, outcome.notes = check(case, original, original_bytes, result, report)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _frames(err: BaseException) -> str:
    """The innermost frames of legato (and what it called) that raised `err`, innermost last:
    'cost.py:565 graph_price > cost.py:238 settle > ...'."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    first = next((i for i, f in enumerate(frames) if "/legato/" in f.filename), 0)
    return " > ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[first:][-5:])


def reason_group(reason: str) -> str:
    """A reason with its numbers and quoted names blanked, to count alike reasons together."""
    text = re.sub(r"'[^']*'", "'…'", reason)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
    return text[:160]


def summarize(outcomes: list[Outcome], group: Callable[[str], str] | None = None) -> list[str]:
    """Per folder: counts by status (failed: a check failed; known: of those, a known bug),
    then the refusal, unchanged and guard reasons grouped, the failures, and what could not be
    checked."""
    group = group or reason_group
    head = ("models", "refused", "unchanged", "not kept", "accepted", "errors", "failed", "known")
    lines = [f"{'folder':<18} " + " ".join(f"{h:>9}" for h in head)]
    by_folder: dict[str, list] = collections.defaultdict(list)
    for o in outcomes:
        by_folder[o.case.split("/", 1)[0]].append(o)
    by_folder["all"] = list(outcomes)
    for folder, items in by_folder.items():
        c = collections.Counter(o.status for o in items)
        row = (len(items), c["refused"], c["unchanged"], c["not-kept"], c["accepted"],
               c["error"], sum(bool(o.problems) for o in items),
               sum(bool(o.problems and o.known) for o in items))
        lines.append(f"{folder:<18} " + " ".join(f"{n:>9}" for n in row))
    for status, title in (("refused", "refused (RewriteError)"),
                          ("unchanged", "unchanged"),
                          ("not-kept", "rewritten but not kept (the guard's reasons)"),
                          ("accepted", "rewritten and accepted")):
        items = [o for o in outcomes if o.status == status]
        if not items:
            continue
        lines.append(f"\n{title}:")
        reasons = collections.Counter(group(o.reason) for o in items)
        for reason, n in reasons.most_common():
            where = sorted({o.case.split("/", 1)[0] for o in items if group(o.reason) == reason})
            lines.append(f"  {n:>5}  {reason}  [{', '.join(where)}]")
        if status in ("accepted", "not-kept"):
            rules = collections.Counter(r for o in items for r in set(o.applied))
            lines.append("  rules applied: " + ", ".join(
                f"{r} ({n})" for r, n in rules.most_common()))
            lines.append("  models: " + ", ".join(o.case for o in items))
    known = collections.Counter(o.known for o in outcomes if o.problems and o.known)
    if known:
        lines.append("\nknown bugs (xfail in the test):")
        lines += [f"  {n:>5}  {what}" for what, n in known.most_common()]
    failed = [o for o in outcomes if o.problems and not o.known]
    if failed:
        lines.append(f"\nfailed checks ({len(failed)} models):")
        lines += [f"  {o.case} ({o.status}): " + " | ".join(p.splitlines()[0] for p in o.problems)
                  for o in failed]
    unchecked = [o for o in outcomes if o.notes]
    if unchecked:
        lines.append(f"\nnot fully checked ({len(unchecked)} models):")
        lines += [f"  {o.case}: " + " | ".join(o.notes) for o in unchecked]
    return lines
