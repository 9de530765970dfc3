"""The user's ONNX model in and out of the rewriter: `prepare` makes the working onnx-ir model
the search rewrites, `finish` turns the best graph back into a model valid for the input's IR
version, and `check_output_path` refuses an output path that could harm before any work starts.

What `prepare` records and `finish` restores: the IR version, the opset imports (custom domains
too), model-local functions, metadata, doc strings and producer; the graph inputs in their order
with their symbolic dimensions; the graph outputs' names, order and types; `value_info` of the
values that still exist; subgraphs (`If`, `Loop`, `Scan`) as they were.

[Note: initializers that are also graph inputs]
- IR < 4: every initializer must also be a graph input, and onnxruntime treats them all as
  constants. The working model drops them from its inputs (rules may fold them); `finish` lists
  every initializer of the result as an input again, the new folded ones included and the ones
  gone left out.
- IR >= 4: an initializer that is also a graph input is a default the caller may override at
  run time (onnxruntime's `get_overridable_initializers`). A rule that folds it as a constant
  would change what the model computes when it is overridden, so `prepare` hides its value: the
  search sees a plain graph input, which no `constant` precondition accepts and which the cost
  model and constant folding treat as data. `finish` puts the value back, so it stays an
  overridable input. With `freeze_initializer_inputs=True` the caller declares them constants:
  rules may fold them and the result no longer lists them as inputs (a note says so).

[Note: models over 2 GB]
A serialized ModelProto cannot exceed 2 GB, so neither `onnx.checker.check_model(proto)` nor an
onnxruntime session from bytes can take such a model. A file is therefore read with onnx-ir
(external data memory-mapped, never copied into a protobuf), checked and timed by path, and the
rewritten model is written with external data into a folder beside the output, checked and
timed by path there, then moved into place. The output's data file is named after the output
and never one of the input's data files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import onnx
import onnx_ir as ir
from onnx import external_data_helper

from legato.core.errors import ConfigError

__all__ = ["EXTERNAL_DATA_THRESHOLD_BYTES", "ORIGINAL_NODE", "PROTOBUF_LIMIT_BYTES", "Finished",
           "RewriteError", "Prepared", "check_output_path", "data_name_for", "describe_inputs",
           "finish", "move_into_place", "parse_input_shape", "prepare", "save_finished",
           "workdir_beside", "write_original", "write_proto"]

PROTOBUF_LIMIT_BYTES = 2**31
# a rewritten model whose tensors and structure come to this much is written with external data
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**26
# node.meta key marking the nodes of the user's graph (constant folding leaves those alone)
ORIGINAL_NODE = "legato.rewrite.original"
_TENSOR_EXTERNAL_BYTES = 1024          # tensors at least this large go to the data file
_COPY_CHUNK_BYTES = 64 * 2**20
# tensors over 1 MiB start at 64 KiB offsets in a data file written here: onnxruntime can then
# memory-map them instead of copying (a session of a 2 GB model shares the page cache)
_ALIGN_BYTES = 65536


class RewriteError(ConfigError):
    """A model that cannot be rewritten as given (malformed, unreadable), or an output path
    that cannot or must not be written; the message says why and what to do."""


@dataclasses.dataclass
class Prepared:
    """The working model and what `finish` needs to give the result the user's form."""

    model: ir.Model                       # the search rewrites (a clone of) this
    original: onnx.ModelProto             # the user's model (a file's external data not loaded)
    path: Path | None                     # the user's file, when given one
    external: bool                        # the user's model keeps tensors in external data
    input_shapes: dict[str, tuple[int, ...]]
    hidden: dict[str, Any]                # IR >= 4 overridable initializers, by name
    frozen: list[str]                     # initializer inputs declared constant by the caller
    notes: list[str]
    # tensors from this size go to the output's data file (the input's smallest external one)
    external_min_bytes: int = _TENSOR_EXTERNAL_BYTES

    @property
    def ir_version(self) -> int:
        return self.original.ir_version

    def runnable(self) -> onnx.ModelProto | str:
        """What `measure.session` loads for the original: the proto, or the file's path."""
        return str(self.path) if self.path is not None else self.original


@dataclasses.dataclass
class Finished:
    """A rewritten model valid for its IR version, in memory or written with external data."""

    proto: onnx.ModelProto                # tensors inline, or in `data_name` beside `path`
    path: Path | None = None
    data_name: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    ir_version_change: tuple[int, int] | None = None

    def runnable(self) -> onnx.ModelProto | str:
        return str(self.path) if self.path is not None else self.proto

    def check(self) -> None:
        """onnx's checker, by path when the model lives on disk (over 2 GB it must)."""
        onnx.checker.check_model(self.runnable())


# ---------------------------------------------------------------------------- reading

def prepare(model: onnx.ModelProto | str | os.PathLike, *,
            input_shapes: Mapping[str, Sequence[int]] | None = None,
            freeze_initializer_inputs: bool = False) -> Prepared:
    """The working onnx-ir model for `model` (a ModelProto or the path of an .onnx file).

    Args:
        model: the user's model; not modified. A path is read with its external data
            memory-mapped, so models over 2 GB work.
        input_shapes: static shapes by input name for the inputs with symbolic dimensions (the
            search and the timing use them; the output keeps the symbolic dimensions).
        freeze_initializer_inputs: treat initializers that are also graph inputs (IR >= 4,
            overridable) as constants; the output then no longer lists them as inputs.
    Raises:
        RewriteError: an unreadable or invalid model, or input shapes that do not fit it.
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        original = _load_header(path)
        _refuse_sparse(original)
        _check(str(path))
        working = ir.load(path)
    elif isinstance(model, onnx.ModelProto):
        path, original = None, model
        unloaded = [t.name for t in _tensors(model)
                    if external_data_helper.uses_external_data(t)]
        if unloaded:
            raise RewriteError(
                f"the model's tensor {unloaded[0]!r} refers to external data that is not loaded "
                f"({len(unloaded)} such tensors); load it with onnx.load(path) (which loads "
                "external data), or call optimize_file(path, ...), which reads it from disk")
        size = _proto_bytes(model)
        if size >= PROTOBUF_LIMIT_BYTES:
            raise RewriteError(
                f"the model is {size / 2**30:.2f} GiB, over protobuf's 2 GiB limit, so it cannot "
                "be checked or run from memory; call legato.core.rewrite.optimize_file(src, "
                "dst) (or `legato rewrite`), which keeps its weights in external data files")
        _refuse_sparse(original)
        _check(model)
        working = ir.serde.deserialize_model(model)
    else:
        raise RewriteError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    external = [external_data_helper.ExternalDataInfo(t).length or 0
                for t in _tensors(original) if external_data_helper.uses_external_data(t)]
    prepared = Prepared(working, original, path, bool(external), {}, {}, [], [],
                        min(external, default=_TENSOR_EXTERNAL_BYTES))
    for node in working.graph:
        node.meta[ORIGINAL_NODE] = True
    _split_initializer_inputs(prepared, freeze_initializer_inputs)
    _apply_input_shapes(prepared, dict(input_shapes or {}))
    return prepared


def _load_header(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise RewriteError(f"{path} does not exist")
    if not path.is_file():
        raise RewriteError(f"{path} is not a regular file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 (any parse failure is the file's fault)
        first = str(err).splitlines()[0] if str(err) else ""
        raise RewriteError(f"{path} is not an ONNX model ({type(err).__name__}: {first})"
                           ) from err


def _check(model: onnx.ModelProto | str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise RewriteError(f"the model is not valid ONNX: {str(err).splitlines()[0]}") from err
    except (OSError, ValueError) as err:         # a missing or short external data file
        raise RewriteError(f"the model cannot be read: {type(err).__name__}: {err}") from err


def _proto_bytes(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 (a protobuf that cannot even size itself is too large)
        return PROTOBUF_LIMIT_BYTES


def _refuse_sparse(model: onnx.ModelProto) -> None:
    if len(model.graph.sparse_initializer):
        raise RewriteError(
            f"the model has {len(model.graph.sparse_initializer)} sparse initializers, which "
            "onnx-ir (the rewriter's graph library) cannot carry; convert them to dense "
            "initializers first")


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor in the model: initializers and tensor attributes, in subgraphs and
    model-local functions too."""
    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from in_graph(sub)

    def in_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        yield from in_nodes(g.node)

    yield from in_graph(model.graph)
    for f in model.functions:
        yield from in_nodes(f.node)


def _split_initializer_inputs(prepared: Prepared, freeze: bool) -> None:
    """See [Note: initializers that are also graph inputs]."""
    graph = prepared.model.graph
    both = [v for v in graph.inputs if v.name in graph.initializers]
    if not both:
        return
    if prepared.ir_version < 4 or freeze:
        keep = [v for v in graph.inputs if v.name not in graph.initializers]
        graph.inputs.clear()
        graph.inputs.extend(keep)
        if prepared.ir_version >= 4:
            prepared.frozen = [v.name for v in both]
            prepared.notes.append(
                f"{len(both)} initializers that were also graph inputs (overridable at run "
                "time in IR >= 4) were treated as constants on request; the output no longer "
                "lists them as inputs")
        return
    for value in both:
        tensor = prepared.hidden[value.name] = value.const_value
        del graph.initializers[value.name]
        value.const_value = None
        if value.shape is None:                     # the input's declared type may be bare
            value.shape = ir.Shape(tensor.shape)
        if value.dtype is None:
            value.dtype = tensor.dtype
    prepared.notes.append(
        f"{len(both)} initializers are also graph inputs, which IR version "
        f"{prepared.ir_version} makes overridable at run time; rules treat them as inputs, not "
        "constants, and they stay inputs (freeze_initializer_inputs=True, or "
        "--freeze-initializer-inputs, lets rules fold them)")


def _true_inputs(prepared: Prepared) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in prepared.original.graph.initializer}
    return [vi for vi in prepared.original.graph.input if vi.name not in inits]


def describe_inputs(model: onnx.ModelProto) -> str:
    """'x [N, 3, 224, 224] (float), ...' for the inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    parts = [f"{vi.name} {_type_text(vi.type)}" for vi in model.graph.input
             if vi.name not in inits]
    return ", ".join(parts) or "(none)"


def _type_text(tp: onnx.TypeProto) -> str:
    kind = tp.WhichOneof("value")
    if kind != "tensor_type":
        return f"({kind or 'no type'})"
    t = tp.tensor_type
    dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "?"
    if not t.HasField("shape"):
        return f"[rank unknown] ({dtype})"
    return "[" + ", ".join(str(d) for d in _dims(t)) + f"] ({dtype})"


def _dims(t: onnx.TypeProto.Tensor) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in t.shape.dim]


def _apply_input_shapes(prepared: Prepared, shapes: dict[str, Sequence[int]]) -> None:
    """Give the working model's inputs the static shapes asked for (validated against the
    model), and clear the other values' shapes so that shape inference derives them anew."""
    inputs = {vi.name: vi for vi in _true_inputs(prepared)}
    listing = describe_inputs(prepared.original)
    for name, dims in shapes.items():
        if name not in inputs:
            raise RewriteError(f"a shape is given for {name!r}, but the model has no input "
                               f"of that name; its inputs are: {listing}")
        dims = tuple(dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise RewriteError(f"the shape {list(dims)} for input {name!r} must be positive "
                               "integers, e.g. 1x3x224x224")
        t = inputs[name].type
        if t.WhichOneof("value") != "tensor_type":
            raise RewriteError(f"input {name!r} is a {t.WhichOneof('value')}, not a tensor; "
                               "input_shapes applies to tensor inputs only")
        if t.tensor_type.HasField("shape"):
            have = _dims(t.tensor_type)
            if len(have) != len(dims):
                raise RewriteError(
                    f"the shape {'x'.join(map(str, dims))} for input {name!r} has rank "
                    f"{len(dims)}, but the model's input is {have} (rank {len(have)}); the "
                    f"model's inputs are: {listing}")
            clash = [(i, h, d) for i, (h, d) in enumerate(zip(have, dims))
                     if isinstance(h, int) and h != d]
            if clash:
                i, h, d = clash[0]
                raise RewriteError(
                    f"the shape {'x'.join(map(str, dims))} for input {name!r} gives dimension "
                    f"{i} as {d}, but the model fixes it to {h} ({have})")
        prepared.input_shapes[name] = dims
    if prepared.input_shapes:
        graph = prepared.model.graph
        for value in graph.inputs:
            if value.name in prepared.input_shapes:
                value.shape = ir.Shape(prepared.input_shapes[value.name])
        for node in graph:
            for out in node.outputs:
                out.shape = None           # re-derived from the static input shapes
    open_dims = [f"{name} {_type_text(vi.type)}" for name, vi in inputs.items()
                 if name not in prepared.input_shapes
                 and vi.type.WhichOneof("value") == "tensor_type"
                 and any(not isinstance(d, int) for d in _dims(vi.type.tensor_type))]
    if open_dims:
        prepared.notes.append(
            "inputs with symbolic dimensions: " + ", ".join(open_dims) + "; their nodes get "
            "analytic cost estimates and the A/B timing sets those dimensions to 1; give the "
            "shapes to time with as input_shapes (legato rewrite --input-shape NAME=1x3x224x224)")


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """'data_0=1x3x224x224' -> ('data_0', (1, 3, 224, 224)); 'x=' is a scalar."""
    name, sep, dims = spec.rpartition("=")
    if not sep or not name:
        raise RewriteError(f"--input-shape {spec!r}: expected NAME=DIMS, e.g. "
                           "data_0=1x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims.strip() else ()
    except ValueError:
        raise RewriteError(f"--input-shape {spec!r}: the dimensions must be integers "
                           "separated by 'x', e.g. 1x3x224x224") from None
    if any(d < 1 for d in shape):
        raise RewriteError(f"--input-shape {spec!r}: dimensions must be at least 1")
    return name, shape


# ---------------------------------------------------------------------------- writing

def finish(prepared: Prepared, best: ir.Model, *, workdir: str | os.PathLike | None = None,
           name: str = "model.onnx", data_name: str | None = None,
           external_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES) -> Finished:
    """`best` (the search's result, modified here) as a model valid for the input's IR version,
    checked with onnx's checker; the IR version is raised to the lowest one valid for the
    opsets only if the input's cannot hold the result (the returned notes say so).

    Without `workdir` the result is in memory. With it, the result is written there as `name`
    with external data in `data_name` when the input had external data or the result reaches
    `external_threshold_bytes`, else kept in memory.
    Raises:
        onnx.checker.ValidationError (or ValueError, OSError) when the result is not valid.
    """
    graph = best.graph
    for value in graph.inputs:                       # overridable initializers come back
        if value.name in prepared.hidden:
            value.const_value = prepared.hidden[value.name]
            graph.register_initializer(value)
    on_disk = workdir is not None and (
        prepared.external or _model_bytes(best, prepared) >= external_threshold_bytes)
    if on_disk:
        data_name = data_name or f"{name}.data"
        ir.external_data.unload_from_model(
            best, workdir, data_name, alignment=_ALIGN_BYTES,
            size_threshold_bytes=min(prepared.external_min_bytes, _TENSOR_EXTERNAL_BYTES))
    else:
        ir.external_data.load_to_model(best)
    proto = ir.serde.serialize_model(best)
    done = Finished(proto, Path(workdir) / name if on_disk else None,
                    data_name if on_disk else None)
    _restore(proto, prepared, prepared.ir_version)
    try:
        _save_and_check(done)
    except onnx.checker.ValidationError as err:
        lowest = onnx.helper.find_min_ir_version_for(list(proto.opset_import),
                                                     ignore_unknown=True)
        if lowest <= prepared.ir_version:
            raise
        _restore(proto, prepared, lowest)
        _save_and_check(done)
        done.ir_version_change = (prepared.ir_version, lowest)
        done.notes.append(
            f"the rewritten model is not valid at IR version {prepared.ir_version} "
            f"({str(err).splitlines()[0]}); it was raised to {lowest}, the lowest version "
            "valid for its opsets")
    return done


def _save_and_check(done: Finished) -> None:
    if done.path is not None:
        onnx.save(done.proto, str(done.path))
    done.check()


def save_finished(done: Finished) -> None:
    """Write `done.proto` again where it lives (after its metadata changed)."""
    if done.path is not None:
        onnx.save(done.proto, str(done.path))


def _model_bytes(model: ir.Model, prepared: Prepared) -> int:
    """The size the model would have as one protobuf: its tensors plus the rest."""
    tensors = sum(v.const_value.nbytes for g in model.graphs()
                  for v in g.initializers.values() if v.const_value is not None)
    rest = _proto_bytes(prepared.original) if prepared.path is None else (
        prepared.path.stat().st_size)
    return tensors + min(rest, PROTOBUF_LIMIT_BYTES)


def _restore(proto: onnx.ModelProto, prepared: Prepared, ir_version: int) -> None:
    """Give the serialized result the user's model's form (see the module docstring)."""
    orig = prepared.original
    proto.ir_version = ir_version
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if orig.HasField(field):
            setattr(proto, field, getattr(orig, field))
        else:
            proto.ClearField(field)
    for field in ("opset_import", "metadata_props", "functions", "training_info"):
        del getattr(proto, field)[:]
        getattr(proto, field).extend(getattr(orig, field))
    g, og = proto.graph, orig.graph
    g.name, g.doc_string = og.name, og.doc_string
    del g.metadata_props[:]
    g.metadata_props.extend(og.metadata_props)
    del g.input[:]
    g.input.extend(_inputs(g, og, prepared, ir_version))
    out_types = {vi.name: vi for vi in og.output}
    names = [vi.name for vi in g.output]
    if names != [vi.name for vi in og.output]:
        raise onnx.checker.ValidationError(
            f"the rewritten graph's outputs {names} are not the original's "
            f"{[vi.name for vi in og.output]}")
    del g.output[:]
    g.output.extend(out_types[n] for n in names)
    _restore_value_info(g, og)
    _restore_subgraphs(g, og, _defined(g))


def _inputs(g: onnx.GraphProto, og: onnx.GraphProto, prepared: Prepared,
            ir_version: int) -> list[onnx.ValueInfoProto]:
    """The result's graph inputs: the original's, in their order and with their types, less
    the initializer inputs that are gone or are constants now; in IR < 4 every initializer
    (new folded ones appended)."""
    have = {t.name for t in g.initializer}
    orig_inits = {t.name for t in og.initializer}
    inputs = []
    for vi in og.input:
        if vi.name in orig_inits:
            if vi.name not in have:
                continue                             # folded away or no longer used
            if ir_version >= 4 and (vi.name in prepared.frozen or prepared.ir_version < 4):
                continue        # constants (frozen, or IR < 4 raised): not overridable inputs
        inputs.append(vi)
    if ir_version < 4:
        listed = {vi.name for vi in inputs}
        inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in g.initializer if t.name not in listed]
    return inputs


def _restore_value_info(g: onnx.GraphProto, og: onnx.GraphProto) -> None:
    """value_info: the original's entries for the values that still exist, with their types
    (symbolic dimensions included); none for new values (shapes inferred under static input
    shapes would not hold for others)."""
    defined = _defined(g)
    kept = [vi for vi in og.value_info if vi.name in defined]
    del g.value_info[:]
    g.value_info.extend(kept)


def _defined(g: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    names |= {o for n in g.node for o in n.output}
    return names


def _free_names(g: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from outer scopes."""
    defined = _defined(g)
    used: set[str] = set()
    for n in g.node:
        used.update(i for i in n.input if i)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _free_names(sub)
    return used - defined


def _restore_subgraphs(g: onnx.GraphProto, og: onnx.GraphProto, visible: set[str]) -> None:
    """Control-flow nodes are never rewritten: give them back their original subgraphs
    (value_info and all) where every outer name those read still exists; otherwise (a value
    they read was rewritten and renamed) keep the serialized body, with the original value_info."""
    originals = {tuple(n.output): n for n in og.node}
    for node in g.node:
        onode = originals.get(tuple(node.output))
        if onode is None or onode.op_type != node.op_type or onode.domain != node.domain:
            continue
        oattrs = {a.name: a for a in onode.attribute}
        for a in node.attribute:
            oa = oattrs.get(a.name)
            if oa is None or a.type != oa.type or a.type not in (
                    onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                continue
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            osubs = [oa.g] if oa.type == onnx.AttributeProto.GRAPH else list(oa.graphs)
            for sub, osub in zip(subs, osubs):
                whole = (_free_names(osub) <= visible and not any(
                    external_data_helper.uses_external_data(t) for t in osub.initializer))
                if whole:
                    sub.CopyFrom(osub)
                else:
                    _restore_value_info(sub, osub)
                    _restore_subgraphs(sub, osub, visible | _defined(sub))


# ---------------------------------------------------------------------------- files

def check_output_path(dst: str | os.PathLike, *, src: str | os.PathLike | None = None,
                      overwrite: bool = False) -> Path:
    """The path to write the output model to (`dst` with symlinks resolved), or RewriteError
    if writing there could harm or cannot work: not a regular file (a device node, FIFO,
    socket or folder), the input itself without `overwrite` (also through a symlink or hard
    link), one of the input's external data files, or a folder that cannot be written or
    created. Nothing is created."""
    given = Path(dst)
    if str(dst).endswith(os.sep) or given.is_dir():
        raise RewriteError(f"-o {dst} is a folder; give the output file's name, e.g. "
                           f"{given / 'model.onnx'}")
    target = Path(os.path.realpath(given))
    via = f" (through the symlink {given})" if given.is_symlink() else ""
    if target.exists():
        mode = target.stat().st_mode
        if not stat.S_ISREG(mode):
            raise RewriteError(
                f"-o {dst}{via} is {_kind(mode)}, not a regular file; legato writes the model "
                "to a new file and renames it into place, which would replace it; give the "
                "path of a regular file")
    if src is not None:
        source = Path(src)
        if target.exists() and source.exists() and os.path.samefile(target, source):
            if not overwrite:
                raise RewriteError(f"-o {dst}{via} is the input model; pass --overwrite to "
                                   "replace it")
        for data in _data_files(source):
            if target.exists() and data.exists() and os.path.samefile(target, data):
                raise RewriteError(f"-o {dst}{via} is the input model's external data file "
                                   f"{data.name}; writing there would destroy the input")
    _check_writable(target, dst)
    return target


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _check_writable(target: Path, given: Any) -> None:
    """A file can be created in the target's folder, or the folder can be made: tried for real
    (a temporary file, removed at once), since permission bits do not tell for root or for
    read-only file systems."""
    folder = target.parent
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RewriteError(f"cannot create the folder {folder} for -o {given}: {probe} is a "
                           "file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".legato-write-test-", dir=probe)
    except OSError as err:
        what = "write to" if probe == folder else f"create {folder} in"
        raise RewriteError(f"cannot {what} {probe} for -o {given} ({type(err).__name__}: "
                           f"{err.strerror or err}); choose another output path") from None
    os.close(fd)
    os.unlink(tmp)


def _data_files(src: Path) -> list[Path]:
    """The external data files the model at `src` refers to."""
    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception:  # noqa: BLE001 (not a model: no data files)
        return []
    return _data_files_of(proto, src.parent)


def _data_files_of(proto: onnx.ModelProto, base: Path) -> list[Path]:
    files = []
    for t in _tensors(proto):
        if external_data_helper.uses_external_data(t):
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location:
                files.append(base / location)
    return sorted(set(files))


def data_name_for(target: Path, prepared: Prepared) -> str:
    """The output's external data file name: `<output name>.data`, or a numbered variant if
    that is one of the input's data files (which is never overwritten)."""
    taken = set()
    if prepared.path is not None:
        taken = {os.path.realpath(p) for p in _data_files_of(prepared.original,
                                                             prepared.path.parent)}
    k, name = 0, f"{target.name}.data"
    while os.path.realpath(target.parent / name) in taken:
        k += 1
        name = f"{target.name}.{k}.data"
    return name


def workdir_beside(target: Path) -> str:
    """A temporary folder beside the output (same file system: files move in by rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{target.name}.legato-", dir=target.parent)


def move_into_place(done: Finished, target: Path) -> None:
    """Rename the written result (data file first) onto the output path."""
    if done.data_name is not None:
        os.replace(done.path.parent / done.data_name, target.parent / done.data_name)
    os.replace(done.path, target)


def write_original(prepared: Prepared, target: Path, workdir: str) -> bool:
    """Write the user's model unchanged to `target` (its external data copied into a data file
    named after the target); False when `target` is the input file itself (nothing to do)."""
    if prepared.path is None:
        raise ValueError("write_original needs a model read from a file")
    if target.exists() and os.path.samefile(target, prepared.path):
        return False
    if not prepared.external:
        tmp = Path(workdir) / target.name
        shutil.copyfile(prepared.path, tmp)
        os.replace(tmp, target)
        return True
    data_name = data_name_for(target, prepared)
    proto = onnx.ModelProto()
    proto.CopyFrom(prepared.original)
    _copy_external_data(proto, prepared.path.parent, Path(workdir) / data_name, data_name)
    onnx.save(proto, str(Path(workdir) / target.name))
    move_into_place(Finished(proto, Path(workdir) / target.name, data_name), target)
    return True


def _copy_external_data(proto: onnx.ModelProto, base: Path, data_path: Path,
                        data_name: str) -> None:
    """Stream every external tensor's bytes into one new data file and point the tensors at it
    (the input's data files are only read)."""
    offset = 0
    with open(data_path, "wb") as out:
        for t in _tensors(proto):
            if not external_data_helper.uses_external_data(t):
                continue
            info = external_data_helper.ExternalDataInfo(t)
            start = info.offset or 0
            with open(base / info.location, "rb") as f:
                f.seek(start)
                length = info.length if info.length else os.fstat(f.fileno()).st_size - start
                left = length
                while left:
                    chunk = f.read(min(left, _COPY_CHUNK_BYTES))
                    if not chunk:
                        raise RewriteError(f"the external data of {t.name!r} in "
                                           f"{base / info.location} is shorter than its "
                                           "recorded length")
                    out.write(chunk)
                    left -= len(chunk)
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", length)):
                t.external_data.add(key=key, value=str(value))
            offset += length


def write_proto(proto: onnx.ModelProto, target: Path, workdir: str) -> None:
    """Write a model that fits one protobuf to `target`, by rename from `workdir`."""
    tmp = Path(workdir) / target.name
    tmp.write_bytes(proto.SerializeToString())
    os.replace(tmp, target)
