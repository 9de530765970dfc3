"""Splitting a torch model into pipeline stages by a plan, with the profiler's layer ids.

An `nn.Sequential` splits by child names: each stage is a run of consecutive children. Any other
model is captured as a graph ([Note: captures]), its nodes grouped into layers exactly as
`profile_pipeline` groups them (`group_ops`, so a plan made from a profile names the same ids),
and cut into one `GraphModule` per stage.

[Note: captures]
- "fx": `torch.fx.symbolic_trace`: module calls stay nodes (an nn.Linear is one layer, named by
  its path). Multi-layer RNNs are traced layer by layer (`RNNLayers`). A forward with Python
  control flow on values (`assert t <= block_size`, `if x.shape[0] > 1:`) is traced again with
  every node's value computed on the example ("fx-example"), so each branch goes the example's
  way; ints read off shapes stay graph values, and a cut may not send one.
- "export": `torch.export.export(strict=False)`, as `torch.distributed.pipelining` captures:
  an ATen graph specialized to the example (asserts, shape branches and loops over a traced
  length go the example's way; sizes are constants, so no int crosses a layer), with the
  model's own parameters and each node's module path; the operation that reads a module's
  weights is named by the module. The graph keeps the training or eval mode the model was in.
- "auto" (default): fx, and export where FX cannot trace at all (a loop over
  `range(x.size(1))`). The profile records which ran (`meta["capture"]`); give the splitter
  the same choice, or the layer ids differ.

Every stage module but the last takes the values that cross the cut before it as positional
arguments (stage 0: the model's own arguments) and returns a tuple of the tensors that cross
the cut after it; the last returns the model's output. [Note: values crossing a cut] A value
made at stage a and read at stage b > a + 1 is passed through every stage between (the IR only
sends to the next stage); a model input read after stage 0 is passed on the same way. Only
tensors can cross: a cut that leaves an int, a shape or a list between stages is an error
naming the node.

A trainable parameter used by several stages (a tied embedding and output head, a module
called twice) is a `Tie`: every stage holding it keeps its own copy, and the runtimes sum the
copies' gradients between those stages before the update, as Megatron-LM does for its
embeddings, so the copies stay equal ([Note: tied weights] in pipeline.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import re
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from legato.adapters._pipeline_graph import Op, first_line, group_ops
from legato.core.errors import ConfigError

__all__ = ["ModelSplit", "TensorSpec", "Tie", "as_args", "chunk", "layer_ids", "split_model"]

_CALLS = ("call_module", "call_function", "call_method")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor crossing a cut, for one microbatch: its FX node (or child) name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def differentiable(self) -> bool:
        """Whether a gradient comes back for it (floating point or complex)."""
        return self.dtype.is_floating_point or self.dtype.is_complex


@dataclasses.dataclass(frozen=True)
class Tie:
    """A trainable parameter used by several stages: its name in the model (the first stage's
    name for it), the stages using it, and its name inside each of those stage modules."""

    name: str
    stages: tuple[int, ...]
    names: tuple[str, ...]

    def parameter_in(self, modules: dict[int, nn.Module] | list[nn.Module], stage: int
                     ) -> nn.Parameter:
        return modules[stage].get_parameter(self.names[self.stages.index(stage)])


@dataclasses.dataclass
class ModelSplit:
    """A model cut into stages.

    Attributes:
        kind: "sequential" or "fx".
        nodes: per stage, its layer ids in forward order.
        modules: per stage, its module (sharing parameters with the model).
        boundaries: boundaries[s] = the tensors stage s hands to stage s + 1 (one microbatch).
        inputs: the specs of the model's tensor arguments for one microbatch.
        ties: trainable parameters used by more than one stage.
    """

    kind: str
    nodes: list[tuple[str, ...]]
    modules: list[nn.Module]
    boundaries: list[tuple[TensorSpec, ...]]
    inputs: tuple[TensorSpec, ...]
    ties: tuple[Tie, ...] = ()


# -- values -------------------------------------------------------------------------------------
def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    return []


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def as_args(inputs: Any, what: str = "inputs") -> tuple:
    """The model's positional arguments: a tensor becomes a 1-tuple."""
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not tensors_of(args):
        raise ConfigError(f"{what} holds no tensor (got {[type(a).__name__ for a in args]}); "
                          "pass a tensor, or a tuple of the model's positional arguments")
    return args


def chunk(value: Any, parts: int, what: str) -> list[Any]:
    """`value` cut into `parts` equal microbatches along dim 0 of every tensor in it."""
    for t in tensors_of(value):
        if t.dim() == 0 or t.shape[0] % parts:
            size = "a scalar" if t.dim() == 0 else f"batch size {t.shape[0]}"
            raise ConfigError(f"{what} has a tensor of shape {list(t.shape)} ({size}), which "
                              f"does not split into microbatches={parts} equal parts along "
                              f"dim 0; pass a batch size that is a multiple of {parts}, or "
                              "change microbatches")
    if parts == 1:
        return [value]
    return [map_tensors(value, lambda t, i=i: torch.tensor_split(t, parts, dim=0)[i])
            for i in range(parts)]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """No grad; buffers (BatchNorm statistics) and torch's random state restored after."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b in model.buffers() if b.is_cuda}
                     | {p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def is_plain_sequential(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


# -- layer ids ----------------------------------------------------------------------------------
class RNNLayers(nn.Module):
    """A multi-layer `nn.LSTM`/`nn.GRU`/`nn.RNN` as a stack of one-layer ones that share its
    parameters (the same `Parameter` objects: the model trains as before), so that each layer
    is a layer of the pipeline. Outputs, final states and gradients are bit-identical on CPU;
    with `dropout > 0` the masks between layers are drawn by `F.dropout` instead of inside the
    fused kernel."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.dropout = float(rnn.dropout)
        dirs = 2 if rnn.bidirectional else 1
        width = (getattr(rnn, "proj_size", 0) or rnn.hidden_size) * dirs
        self.dirs, self.lstm = dirs, isinstance(rnn, nn.LSTM)   # static: FX sees no tuples
        first = next(rnn.parameters())
        self.layers = nn.ModuleList()
        for layer in range(rnn.num_layers):
            kw: dict[str, Any] = dict(
                input_size=rnn.input_size if layer == 0 else width,
                hidden_size=rnn.hidden_size, num_layers=1, bias=rnn.bias,
                batch_first=rnn.batch_first, bidirectional=rnn.bidirectional,
                device=first.device, dtype=first.dtype)
            if isinstance(rnn, nn.LSTM):
                kw["proj_size"] = rnn.proj_size
            if type(rnn) is nn.RNN:
                kw["nonlinearity"] = rnn.nonlinearity
            one = type(rnn)(**kw)
            for name in list(one._flat_weights_names):
                # _parameters, not getattr: under FX tracing getattr yields a Proxy
                setattr(one, name, rnn._parameters[name.replace("_l0", f"_l{layer}")])
            self.layers.append(one)

    def forward(self, x: Any, hx: Any = None) -> Any:
        hs, cs = [], []
        for k, layer in enumerate(self.layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, True)
            if hx is None:
                x, state = layer(x)
            elif isinstance(hx, tuple):
                x, state = layer(x, tuple(h[k * self.dirs:(k + 1) * self.dirs] for h in hx))
            else:
                x, state = layer(x, hx[k * self.dirs:(k + 1) * self.dirs])
            if self.lstm:
                h_k, c_k = state
                hs.append(h_k)
                cs.append(c_k)
            else:
                hs.append(state)
        h = torch.cat(hs, 0)
        return (x, (h, torch.cat(cs, 0))) if cs else (x, h)


def _stacked_rnn(m: nn.Module) -> bool:
    return type(m) in (nn.LSTM, nn.GRU, nn.RNN) and m.num_layers > 1


class _ConcreteProxy(torch.fx.Proxy):
    """A proxy whose truth value is its value on the example (see `_Tracer`)."""

    def __bool__(self) -> bool:
        value = self.tracer.values.get(self.node, _UNKNOWN)
        if value is _UNKNOWN:
            return super().__bool__()
        if isinstance(value, torch.Tensor):
            # a branch on data (`if x.sum() > 0:`): another batch may go the other way
            raise torch.fx.proxy.TraceError(
                f"forward branches on a tensor's value ({self.node.name}), which differs "
                "from batch to batch: no trace can follow it (use torch.where, or move the "
                "branch out of forward)")
        return bool(value)


_UNKNOWN = object()


class _Tracer(torch.fx.Tracer):
    """FX's tracer, except that a multi-layer RNN is traced as `RNNLayers` (its layers become
    `<path>.layers.<k>`) and, given `example` arguments, every node's value on them is computed
    as the graph is built, so that Python control flow on values (`assert t <= block_size`,
    `if x.shape[0] > 1:`) takes the branch the example takes: the graph is specialized to the
    example's shapes, as torch.export specializes to its example. The model is not changed."""

    def __init__(self, example: tuple | None = None) -> None:
        super().__init__()
        self.extra: dict[str, nn.Module] = {}
        self.unrolled: list[torch.fx.Node] = []       # nodes made while tracing RNNLayers
        self.example = example
        self.values: dict[torch.fx.Node, Any] = {}
        self._placeholders = 0
        # buffers as graph values: nanoGPT's mask slice `self.bias[:, :, :T, :T]` indexes a
        # buffer with a traced T, which a plain tensor refuses
        self.proxy_buffer_attributes = example is not None

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ConcreteProxy(node, self) if self.example is not None else super().proxy(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example is not None:
            from torch.fx._symbolic_trace import _maybe_revert_all_patches

            with _maybe_revert_all_patches():        # run the real ops, not the tracer's
                self.values[p.node] = self._value(p.node)
        return p

    def _value(self, n: torch.fx.Node) -> Any:
        val = lambda a: torch.fx.node.map_arg(a, lambda m: self.values[m])  # noqa: E731
        if n.op == "placeholder":
            i = self._placeholders
            self._placeholders += 1
            return self.example[i] if i < len(self.example) else (n.args[0] if n.args else None)
        if n.op == "get_attr":
            owner, _, attr = n.target.rpartition(".")
            return getattr(self.root.get_submodule(owner) if owner else self.root, attr)
        args, kwargs = val(n.args), val(n.kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            module = self.extra.get(n.target) or self.root.get_submodule(n.target)
            return module(*args, **kwargs)
        return None

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if _stacked_rnn(m):
            path = super().path_of_module(m)
            stacked = RNNLayers(m)
            for k, one in enumerate(stacked.layers):
                self.extra[f"{path}.layers.{k}"] = one
            before = set(self.graph.nodes)
            out = stacked.forward(*args, **kwargs)
            self.unrolled += [n for n in self.graph.nodes if n not in before]
            return out
        return super().call_module(m, forward, args, kwargs)

    def path_of_module(self, mod: nn.Module) -> str:
        for path, m in self.extra.items():
            if m is mod:
                return path
        return super().path_of_module(mod)


CAPTURES = ("auto", "fx", "export")


def _trace(model: nn.Module, args: tuple, capture: str = "auto"
           ) -> tuple[torch.fx.GraphModule, str]:
    """The graph of `model` on `args` and how it was captured ([Note: captures]):
    "fx": `torch.fx.symbolic_trace`, multi-layer RNNs traced layer by layer, and a model whose
    forward branches or asserts on values traced again on the example (`_Tracer`, "fx-example");
    "export": `torch.export.export(strict=False)`; "auto": fx, else export."""
    if capture not in CAPTURES:
        raise ConfigError(f"capture={capture!r} is unknown; use one of {list(CAPTURES)}")
    if capture == "export":
        return _export(model, args), "export"
    try:
        rnn = any(_stacked_rnn(m) for m in model.modules())
        try:
            if not rnn:
                return torch.fx.symbolic_trace(model), "fx"
            return _graph_module(model, _Tracer()), "fx"
        except torch.fx.proxy.TraceError:
            with preserved(model):
                return _graph_module(model, _Tracer(example=args)), "fx-example"
    except Exception as fx_err:
        if capture == "fx":
            raise
        try:
            return _export(model, args), "export"
        except Exception as export_err:
            raise ConfigError(
                f"{type(model).__name__} is not an nn.Sequential and torch.fx cannot trace it "
                f"({first_line(fx_err)}), nor torch.export ({first_line(export_err)}); wrap "
                "its layers in an nn.Sequential, or make its forward FX-traceable (no Python "
                "control flow on tensor values; see 'Limitations of Symbolic Tracing' in the "
                "torch.fx docs and torch.export's programming model)") from export_err


def _export(model: nn.Module, args: tuple) -> torch.fx.GraphModule:
    """`torch.export.export(model, args, strict=False).module()`: an ATen graph specialized to
    the example's shapes (asserts and shape branches go the example's way, sizes become
    constants), parameters the model's own (get_attr by qualified name), module paths in each
    node's `nn_module_stack`. A multi-layer RNN is exported as `RNNLayers` (put in its place
    for the export, then put back), so each of its layers is a layer; export's input guard is
    dropped (the splitter runs the graph on microbatches of the example). The graph keeps the
    mode the model was in (dropout and BatchNorm as in training, or as in eval): export it in
    the mode it will run in."""
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError("capture='export' takes the model's positional arguments as "
                          f"tensors (got {[type(a).__name__ for a in args]}); pass tensors, or "
                          "capture='fx'")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and _stacked_rnn(child):
                swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            parent._modules[name] = RNNLayers(child)
        with preserved(model), warnings.catch_warnings():
            # RNNLayers' one-layer RNNs refresh their _flat_weights list in forward
            warnings.filterwarnings("ignore", message=r".*_flat_weights.*were assigned during "
                                    "export")
            exported = torch.export.export(model, args, strict=False)
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child
    gm = exported.module()
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards") and not n.users:
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()   # e.g. an RNN's final states nobody reads (not in-place ops)
    gm.recompile()
    return gm


def _graph_module(model: nn.Module, tracer: _Tracer) -> torch.fx.GraphModule:
    graph = tracer.trace(model)
    # final states nobody reads (`out, _ = self.lstm(x)`) would join every layer's state into
    # one node and send them all down the pipeline: drop them
    for n in reversed(tracer.unrolled):
        if not n.users and n.op == "call_function":
            graph.erase_node(n)
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            root[n.target] = tracer.extra.get(n.target) or model.get_submodule(n.target)
        elif n.op == "get_attr":
            owner, _, attr = n.target.rpartition(".")
            root[n.target] = getattr(model.get_submodule(owner) if owner else model, attr)
    gm = torch.fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.train(model.training)
    return gm


def _layer_name(n: torch.fx.Node, module_op: bool = False) -> str:
    """A layer's id: a module call's qualified name (`blocks.0.attn.proj`); a function or
    method call inside a module is named by that module's path and the operation
    (`blocks.0.attn.view`: FX's own names, `view_10`, say nothing of where it is), except that
    an exported module's own weighted operation (`module_op`: aten.linear of an nn.Linear) is
    named by the module, as a module call is; one in the model's own forward keeps its name."""
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return n.name
    path = next(reversed(stack.values()))[0] if isinstance(stack, dict) else ""
    if path and module_op:
        return path
    return f"{path}.{re.sub(r'_[0-9]+$', '', n.name)}" if path else n.name


class Traced:
    """The one FX capture of a model that both the profiler and the splitter use: the trace,
    every node's value from one run of the example (no grad; buffers and random state
    restored), and the layer groups (`group_ops`), so that a plan made from a profile names the
    layers the splitter cuts.

    Args:
        model: the module to trace.
        args: the example's positional arguments.
        purpose: "profile" or "split" (for the messages).
        clone: keep copies of the values (the profiler reruns layers on them later).
        capture: "auto", "fx" or "export" ([Note: captures]); `self.capture` says which ran
            ("fx", "fx-example" or "export").
    """

    def __init__(self, model: nn.Module, args: tuple, *, purpose: str = "split",
                 clone: bool = False, capture: str = "auto") -> None:
        cls = type(model).__name__
        try:
            self.gm, self.capture = _trace(model, args, capture)
        except ConfigError:
            raise
        except Exception as err:
            if capture == "export":
                raise ConfigError(f"torch.export cannot capture {cls} ({first_line(err)}); "
                                  "see torch.export's programming model, or use "
                                  "capture='fx'") from err
            raise ConfigError(
                f"{cls} is not an nn.Sequential and torch.fx cannot trace it "
                f"({first_line(err)}); wrap its layers in an nn.Sequential, or make its forward "
                "FX-traceable (no Python control flow on tensor values; see 'Limitations of "
                "Symbolic Tracing' in the torch.fx docs)") from err
        values: dict[torch.fx.Node, Any] = {}
        keep = (lambda v: map_tensors(v, lambda t: t.detach().clone())) if clone else (
            lambda v: v)

        class _Capture(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                values[n] = out if n.op == "get_attr" else keep(out)
                return out

        try:
            with preserved(model):
                self.output_value = _Capture(self.gm).run(*args)
        except Exception as err:
            raise _run_failed(model, args, err) from err
        self.values = values

        ops: list[Op] = []
        outputs: list[torch.fx.Node] = []
        self.placeholders: list[torch.fx.Node] = []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.placeholders.append(n)
            elif n.op == "output":
                outputs = list(n.all_input_nodes)
                self.output = n
            elif n.op in _CALLS:
                ins = n.all_input_nodes
                ops.append(Op(
                    key=n, name=_layer_name(n, self.capture == "export" and any(
                        map(self.trainable_attr, ins))),
                    is_layer=n.op == "call_module", has_params=any(map(self.trainable_attr, ins)),
                    inputs=tuple(a for a in ins if a.op not in ("placeholder", "get_attr")),
                    reads_model_input=any(a.op == "placeholder" for a in ins),
                    yields_tensor=bool(tensors_of(values[n]))))
        self.groups, self.edges, self.group_of = group_ops(ops, outputs)
        if not self.groups:
            raise ConfigError(f"{cls} has no layers: its traced forward calls no module and "
                              f"computes nothing from its inputs; there is nothing to {purpose}")
        self.ids = [g.id for g in self.groups]

    def same_stage(self) -> list[dict]:
        """Layers the runtime can only run in one stage: a non-tensor value (an int from
        `x.size()`, a shape) flowing from one layer to another. The planner cuts nowhere
        between them (`LayerProfile.meta["same_stage"]`)."""
        out: list[dict] = []
        seen: set[tuple[str, str]] = set()
        for n in self.gm.graph.nodes:
            dst = self.group_of.get(n)
            if n.op not in _CALLS or dst is None:
                continue
            for a in n.all_input_nodes:
                src = self.group_of.get(a)
                if src is None or src == dst or (src, dst) in seen:
                    continue
                value = self.values.get(a)
                if not isinstance(value, torch.Tensor):
                    seen.add((src, dst))
                    out.append({"nodes": [src, dst],
                                "why": f"{a.name} (of type {type(value).__name__}, not a tensor) "
                                       f"flows from {src} to {dst}"})
        return out

    def trainable_attr(self, n: torch.fx.Node) -> bool:
        """Whether `n` reads a trainable parameter directly (`get_attr`)."""
        v = self.values.get(n)
        return n.op == "get_attr" and isinstance(v, nn.Parameter) and v.requires_grad


def layer_ids(model: nn.Module, example_inputs: Any, *, capture: str = "auto") -> list[str]:
    """The layer ids a plan names for `model`, in forward order (as `profile_pipeline` gives).

    Args:
        model: an nn.Sequential (ids: child names) or a module torch.fx or torch.export can
            capture.
        example_inputs: one (micro)batch: a tensor or a tuple of positional arguments.
        capture: "auto", "fx" or "export" ([Note: captures]); the profiler's and the
            splitter's must agree.
    """
    if is_plain_sequential(model):
        return [n for n, m in model._modules.items() if m is not None]
    return Traced(model, as_args(example_inputs, "example_inputs"), capture=capture).ids


def _run_failed(model: nn.Module, args: tuple, err: Exception) -> ConfigError:
    shapes = [list(t.shape) for t in tensors_of(args)]
    return ConfigError(f"running {type(model).__name__} on one microbatch of example_inputs "
                       f"(tensor shapes {shapes}) failed: {first_line(err)}; pass "
                       "example_inputs the model accepts (one minibatch, as step() gets it)")


# -- plans --------------------------------------------------------------------------------------
def resolve_stages(ids: list[str], stages: Sequence, model_name: str) -> list[tuple[str, ...]]:
    """Stage node lists from node ids or layer counts; unknown, missing or repeated ids are
    errors naming the layer."""
    if not stages:
        raise ConfigError("the plan has no stages; pass one list of layer ids (or one layer "
                          "count) per stage")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in stages):
        if any(c < 1 for c in stages) or sum(stages) != len(ids):
            raise ConfigError(f"layer counts {list(stages)} must be >= 1 each and add up to the "
                              f"{len(ids)} layers of {model_name} ({ids[:8]}"
                              f"{'...' if len(ids) > 8 else ''})")
        out, k = [], 0
        for c in stages:
            out.append(tuple(ids[k:k + c]))
            k += c
        return out
    known = set(ids)
    seen: dict[str, int] = {}
    out = []
    for s, nodes in enumerate(stages):
        if isinstance(nodes, (str, int)) or not nodes:
            raise ConfigError(f"stage {s} of the plan is {nodes!r}; give each stage a non-empty "
                              "list of layer ids (or every stage a layer count)")
        for n in nodes:
            n = str(n)
            if n not in known:
                close = difflib.get_close_matches(n, ids, n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ConfigError(
                    f"stage {s} names layer {n!r}, which {model_name} does not have{hint} "
                    f"Its layers are {ids[:12]}{'...' if len(ids) > 12 else ''}: the child "
                    "names of an nn.Sequential, else the FX node ids profile_pipeline gives")
            if n in seen:
                raise ConfigError(f"layer {n!r} is in stage {seen[n]} and again in stage {s}; "
                                  "put each layer in exactly one stage")
            seen[n] = s
        out.append(tuple(str(n) for n in nodes))
    missing = [n for n in ids if n not in seen]
    if missing:
        i = ids.index(missing[0])
        where = seen.get(ids[i - 1]) if i > 0 else 0
        raise ConfigError(f"layer {missing[0]!r} of {model_name} is in no stage"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                          f"every layer must be in exactly one stage: add it to stage {where}")
    return out


# -- splitting ------------------------------------------------------------------------------------
class _SequentialStage(nn.Sequential):
    """Consecutive children of an nn.Sequential, under their own names; returns a 1-tuple
    unless it is the last stage."""

    def __init__(self, children: "collections.OrderedDict[str, nn.Module]", last: bool) -> None:
        super().__init__(children)
        self._last = last

    def forward(self, x):
        for m in self:
            x = m(x)
        return x if self._last else (x,)


def split_model(model: nn.Module, stages: Sequence, example_inputs: Any, *,
                microbatches: int = 1, capture: str = "auto") -> ModelSplit:
    """Cut `model` into pipeline stages.

    Args:
        model: an `nn.Sequential` (layer ids: child names) or an FX-traceable module (layer
            ids: `profile_pipeline`'s node ids).
        stages: per stage, its layer ids (a list of str), or per stage a layer count.
        example_inputs: one minibatch as the training step gets it (a tensor or a tuple of
            positional arguments); cut into `microbatches` parts, one of which is run (without
            gradients; buffers and random state are restored) to find the tensors that cross
            each cut.
        microbatches: how many microbatches a minibatch is cut into.
        capture: how a module other than an nn.Sequential is captured: "auto" (torch.fx, else
            torch.export), "fx" or "export" ([Note: captures]); use the profiler's.
    Returns:
        A `ModelSplit` whose modules share parameters with `model`.
    Raises:
        ConfigError: an unknown, missing or repeated layer; a stage that reads a later stage's
            output; a non-tensor value crossing a cut; a model that does not trace or does not
            run on the example. (Parameters shared by stages are `ModelSplit.ties`.)
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    args = as_args(example_inputs, "example_inputs")
    micro = chunk(args, microbatches, "example_inputs")[0]
    name = type(model).__name__
    if is_plain_sequential(model):
        entries = [(n, m) for n, m in model._modules.items() if m is not None]
        if not entries:
            raise ConfigError(f"{name} is an empty nn.Sequential; there is nothing to split")
        if len(micro) != 1:
            raise ConfigError(f"an nn.Sequential takes one input but example_inputs has "
                              f"{len(micro)} positional arguments; pass one tensor")
        ids = [n for n, _ in entries]
        nodes = resolve_stages(ids, stages, name)
        flat = [n for ns in nodes for n in ns]
        if flat != ids:
            k = next(k for k, (a, b) in enumerate(zip(flat, ids)) if a != b)
            s = next(s for s, ns in enumerate(nodes) if flat[k] in ns)
            raise ConfigError(f"stage {s} is not a run of consecutive layers in model order: "
                              f"layer {flat[k]!r} comes where the model has {ids[k]!r}; give "
                              f"each stage consecutive children, in order (the model's order "
                              f"is {ids[:12]}{'...' if len(ids) > 12 else ''})")
        children = dict(entries)
        modules: list[nn.Module] = [
            _SequentialStage(collections.OrderedDict((n, children[n]) for n in ns),
                             last=s == len(nodes) - 1) for s, ns in enumerate(nodes)]
        kind = "sequential"
    else:
        traced = Traced(model, micro, capture=capture)
        nodes = resolve_stages(traced.ids, stages, name)
        modules = _fx_stages(traced, nodes, name)
        kind = "fx"
    ties = shared_parameters(modules)
    boundaries = _probe(model, modules, nodes, micro, kind)
    inputs = tuple(TensorSpec(f"input {k}", tuple(t.shape), t.dtype)
                   for k, t in enumerate(tensors_of(micro)))
    return ModelSplit(kind, nodes, modules, boundaries, inputs, ties)


def _fx_stages(traced: Traced, nodes: list[tuple[str, ...]], model_name: str
               ) -> list[nn.Module]:
    gm, group_of = traced.gm, traced.group_of
    last = len(nodes) - 1
    stage_of_group = {n: s for s, ns in enumerate(nodes) for n in ns}
    order = list(gm.graph.nodes)
    stage: dict[torch.fx.Node, int] = {}
    for n in order:
        if n.op == "placeholder":
            stage[n] = 0
        elif n.op in _CALLS and group_of.get(n) is not None:
            stage[n] = stage_of_group[group_of[n]]

    def user_stage(u: torch.fx.Node) -> int:
        return last if u.op == "output" else stage[u]

    # ops in no layer (constants, shape reads): run where first used (see the module note)
    for n in reversed(order):
        if n.op in _CALLS and n not in stage:
            users = [user_stage(u) for u in n.users]
            ins = [stage[a] for a in n.all_input_nodes if a in stage]
            stage[n] = min(users) if users else max(ins, default=0)

    def label(n: torch.fx.Node) -> str:
        gid = group_of.get(n)
        return f"layer {gid!r}" if gid is not None else f"node {n.name!r}"

    for n in order:
        if n.op not in _CALLS:
            continue
        for a in n.all_input_nodes:
            if a in stage and stage[a] > stage[n]:
                raise ConfigError(
                    f"{label(n)} (stage {stage[n]}) reads the output of {label(a)}, which the "
                    f"plan puts in the later stage {stage[a]}; a stage can only use values of "
                    f"earlier stages: move {label(a)} to stage {stage[n]} or earlier, or "
                    f"{label(n)} to stage {stage[a]} or later")
    crossing: list[list[torch.fx.Node]] = []
    for s in range(last):
        cut = [n for n in order if n in stage and stage[n] <= s
               and any(user_stage(u) > s for u in n.users)]
        for n in cut:
            value = traced.values.get(n)
            if not isinstance(value, torch.Tensor):
                what = type(value).__name__
                readers = sorted({label(u) for u in n.users if user_stage(u) > s})
                raise ConfigError(
                    f"the cut after stage {s} would have to send {label(n)}, a {what}, to "
                    f"{', '.join(readers)}; only tensors can cross stages: put {label(n)} in "
                    f"the same stage as its readers (move the cut)")
        crossing.append(cut)
    modules: list[nn.Module] = []
    for s in range(last + 1):
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        if s == 0:
            for n in order:
                if n.op == "placeholder":
                    env[n] = g.node_copy(n)
        else:
            for n in crossing[s - 1]:
                env[n] = g.placeholder(n.name)
        for n in order:
            if n.op not in _CALLS or stage[n] != s:
                continue
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = g.node_copy(a)
            env[n] = g.node_copy(n, lambda x: env[x])
        if s < last:
            g.output(tuple(env[n] for n in crossing[s]))
        else:
            for a in traced.output.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = g.node_copy(a)
            g.output(torch.fx.node.map_arg(traced.output.args[0], lambda x: env[x]))
            info = getattr(gm.graph._codegen, "pytree_info", None)
            if info is not None and info.out_spec is not None:
                # an exported graph returns its outputs flat: give them the model's structure
                names = [n.name for n in g.nodes if n.op == "placeholder"]
                g.set_codegen(_PyTreeCodeGen(_PyTreeInfo(
                    names, pytree.tree_structure((tuple(names), {})), info.out_spec)))
        g.lint()
        modules.append(torch.fx.GraphModule(gm, g, class_name=f"{model_name}Stage{s}"))
    return modules


def parameter_users(units: Iterable[tuple[Any, Iterable[tuple[str, nn.Parameter]]]]
                    ) -> list[tuple[nn.Parameter, list[tuple[Any, str]]]]:
    """The trainable parameters more than one unit uses (stages, profile layers), in
    first-use order, each with its uses: (unit, the parameter's name there)."""
    found: dict[int, tuple[nn.Parameter, list[tuple[Any, str]]]] = {}
    for unit, named in units:
        for name, p in named:
            if not p.requires_grad:
                continue
            uses = found.setdefault(id(p), (p, []))[1]
            if all(u != unit for u, _ in uses):
                uses.append((unit, name))
    return [(p, uses) for p, uses in found.values() if len(uses) > 1]


def shared_parameters(modules: Sequence[nn.Module]) -> tuple[Tie, ...]:
    """The trainable parameters more than one stage module uses, in first-use order."""
    return tuple(Tie(uses[0][1], tuple(s for s, _ in uses), tuple(n for _, n in uses))
                 for _, uses in parameter_users(
                     (s, m.named_parameters()) for s, m in enumerate(modules)))


def _probe(model: nn.Module, modules: list[nn.Module], nodes: list[tuple[str, ...]],
           micro: tuple, kind: str) -> list[tuple[TensorSpec, ...]]:
    """Run the stages in turn on one microbatch; record what crosses each cut."""
    boundaries: list[tuple[TensorSpec, ...]] = []
    values: tuple = micro
    last = len(modules) - 1
    with preserved(model):
        for s, m in enumerate(modules):
            try:
                out = m(*values)
            except Exception as err:
                raise ConfigError(f"stage {s} (layers {nodes[s][0]}..{nodes[s][-1]}) failed on "
                                  f"its part of one microbatch of example_inputs: "
                                  f"{first_line(err)}") from err
            if s == last:
                break
            if kind == "sequential" and not isinstance(out[0], torch.Tensor):
                raise ConfigError(
                    f"layer {nodes[s][-1]!r}, the last of stage {s}, returns a "
                    f"{type(out[0]).__name__}; a cut between children of an nn.Sequential must "
                    "carry one tensor: move the cut, or trace the model with torch.fx (wrap it "
                    "in a module whose forward calls the children)")
            names = [n.name for n in _crossing_names(m)] if kind == "fx" else [nodes[s][-1]]
            boundaries.append(tuple(TensorSpec(names[k] if k < len(names) else str(k),
                                               tuple(t.shape), t.dtype)
                                    for k, t in enumerate(out)))
            values = tuple(out)
    return boundaries


def _crossing_names(m: nn.Module) -> list:
    out = next(n for n in m.graph.nodes if n.op == "output")
    return list(out.args[0])
