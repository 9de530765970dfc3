"""Pipeline profiles of PyTorch models: a `LayerProfile` (layer DAG with per-layer costs) from
stock torch (forward hooks, torch.fx and autograd), no patched torch.

    prof = profile_pipeline(model, torch.randn(64, 3, 224, 224),
                            loss_fn=lambda out: F.cross_entropy(out, labels), optimizer=opt)
    prof.save("resnet50.profile.json")

Layers are the children of an `nn.Sequential`, or the module calls of an FX trace of any other
model, with parameter-free calls folded in or made merge nodes
([Note: folding parameter-free ops] in legato/adapters/_pipeline_graph.py). Each layer is then
timed on its own, on the input it received in a real forward pass of the example batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from typing import Any, Callable, Iterator

import torch
import torch.fx

from legato.adapters._pipeline_graph import (
    BACKWARD_MODES,
    Op,
    calibrate_times,
    check_counts,
    first_line,
    group_ops,
    layer_node,
    time_layer,
    time_loss,
)
from legato.adapters.torch._pipeline_split import Traced, map_tensors, parameter_users, tensors_of
from legato.core.errors import ConfigError
from legato.core.pipeline.profile import LayerProfile

__all__ = ["profile_pipeline"]

SOURCE = "legato torch profiler"


@dataclasses.dataclass
class _Layer:
    """A profile node before it is timed: how to run it alone, and what it ran on."""

    id: str
    desc: str
    run: Callable[[list], list]
    inputs: list  # captured values, one per input slot of `run`
    kinds: list[str]  # per slot: "grad" (another node's activation), "const", "live"
    params: list[torch.nn.Parameter]  # trainable parameters it reads (weight-grad targets)
    outputs: list  # captured values that leave the node
    produces_model_output: bool = False


def profile_pipeline(model: torch.nn.Module, example_inputs: Any, *,
                     loss_fn: Callable[[Any], torch.Tensor] | None = None,
                     optimizer: torch.optim.Optimizer | None = None, warmup: int = 2,
                     repeats: int = 5, split_backward: bool = True,
                     calibrate: bool = True, capture: str = "auto") -> LayerProfile:
    """Profile `model` for pipeline planning: its layer DAG and each layer's training costs.

    Layers: the children of an `nn.Sequential` (a chain; ids are the child names), else the
    nodes of the model's captured graph (`capture`: "auto" is `torch.fx.symbolic_trace`, or
    `torch.export` where FX cannot trace; [Note: captures] in `_pipeline_split.py`): every
    module call is a layer (id: its qualified name, `name#2` for a second call of the same
    module; exported, every operation reading a module's weights); a parameter-free function
    or method call is folded into the layer whose output it reads, unless it reads two or more
    layers' outputs or a layer's and a model input (add, cat: a skip connection's merge point),
    which makes it a node of its own (id: the node name). Model inputs are not nodes;
    `meta["inputs"]` lists their bytes and the nodes that read them; `meta["capture"]` says
    how the graph was captured (give the trainer the same `capture`).

    Measured per layer, on the layer's own input from a real forward pass of `example_inputs`
    (in training mode), as medians of `repeats` runs after `warmup` runs, with
    `time.perf_counter` (and `torch.cuda.synchronize` around each span on CUDA): forward time
    with autograd recording; backward time of `torch.autograd.grad` of the layer's outputs
    (upstream gradient of ones) with respect to its activation inputs and its trainable
    parameters together; with `split_backward`, the same with respect to the inputs only
    (`backward_input_s`) and to the parameters only (`backward_weight_s`), each measured on its
    own (so the two may add up to a little more than `backward_s`). Inputs that are model
    inputs get no input gradient, as in training. The loss's forward and backward times (taken
    on the model's output) are added to the last node that produces the output.

    Args:
        model: the model, on the device to profile on.
        example_inputs: one minibatch: a tensor, or a tuple of the positional arguments.
        loss_fn: `loss_fn(output) -> scalar tensor` (bind targets with a lambda); default: the
            sum of every floating-point tensor in the output.
        optimizer: if given, each layer's optimizer-state bytes are the real bytes of the state
            (tensors with at least one dimension; step counters are not counted) that a deep
            copy of it holds after one step with zero gradients, and its `update_s` the median
            time of a step of that optimizer's class and hyperparameters over copies of the
            layer's parameters; else 0.
        warmup: untimed runs per layer and measurement.
        repeats: timed runs per layer and measurement (the median is kept).
        split_backward: also measure input-gradient and weight-gradient time separately.
        calibrate: then time whole training passes of the unchanged model (forward with the
            loss, then `loss.backward()`, gradients accumulating as over a step's
            microbatches) and scale every layer's forward times, and every backward time, so
            that they add up to the measured totals ([Note: calibration]); the scales are in
            `meta["calibration"]`.

    Returns:
        A `LayerProfile`; times in seconds and sizes in bytes for one minibatch of the example's
        batch size. The model (training flags, parameters, buffers, gradients), the optimizer
        and torch's random state are left as they were.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module; pass the "
                          "nn.Module to profile")
    check_counts(warmup, repeats)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(output) -> "
                          "scalar tensor, or None for the sum of the outputs")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer is a {type(optimizer).__name__}, not a "
                          "torch.optim.Optimizer; pass the model's optimizer, or None")
    args = _as_args(example_inputs)
    device = _device_of(model, args)
    sync = _sync_for(device)
    name = type(model).__name__
    with _preserved(model, device):
        if _is_plain_sequential(model):
            layers, edges, output, inputs_meta = _sequential_layers(model, args)
            same_stage, graph, how = [], "sequential", "sequential"
        else:
            layers, edges, output, inputs_meta, same_stage, how = _fx_layers(model, args,
                                                                              capture)
            graph = "fx"
        tied = _shared_parameters(model, layers)
        owned = _owned_parameter_bytes(layers)
        state, updates = (_optimizer_state_bytes(optimizer, layers, warmup, repeats)
                          if optimizer is not None else ({}, {}))
        modes = BACKWARD_MODES if split_backward else ("full",)
        nodes = []
        for layer in layers:
            try:
                fwd, bwd = time_layer(_layer_step(layer, sync), modes, warmup=warmup,
                                      repeats=repeats)
            except Exception as err:
                raise ConfigError(f"layer {layer.id!r} ({layer.desc}) failed when run on its "
                                  f"recorded input: {first_line(err)}") from err
            nodes.append([layer, fwd, bwd])
        loss_meta = _time_loss(loss_fn, output, sync, warmup, repeats)
        calibration = (_whole_model_s(model, args, loss_fn, sync, warmup, repeats)
                       if calibrate else None)
    # The loss runs on the last stage: its time goes to the last node producing the output.
    sinks = [entry for entry in nodes if entry[0].produces_model_output]
    if sinks:
        entry = sinks[-1]
        entry[1] += loss_meta["loss_forward_s"]
        entry[2] = {m: b + loss_meta["loss_backward_s"] if m != "weight" else b
                    for m, b in entry[2].items()}
        loss_meta["loss_added_to"] = entry[0].id
    if calibration is not None:
        fwds, bwds, loss_meta["calibration"] = calibrate_times(
            [e[1] for e in nodes], [e[2] for e in nodes], calibration,
            "eager forward with the loss, then loss.backward()")
        for entry, f, b in zip(nodes, fwds, bwds):
            entry[1], entry[2] = f, b
    profile_nodes = tuple(
        dataclasses.replace(
            layer_node(layer.id, layer.desc, fwd, bwd,
                       [_nbytes(t) for v in layer.outputs for t in _tensors(v)],
                       owned.get(layer.id, 0), state.get(layer.id, 0),
                       split_backward=split_backward),
            update_s=updates.get(layer.id, 0.0))
        for layer, fwd, bwd in nodes)
    first = next(t for a in args for t in _tensors(a))
    meta = {"model": name, "source": SOURCE, "framework": "torch",
            "framework_version": torch.__version__, "device": str(device), "capture": how,
            "batch_size": int(first.shape[0]) if first.dim() else 1, "graph": graph,
            "warmup": warmup, "repeats": repeats, "split_backward": split_backward,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "inputs": inputs_meta, **loss_meta}
    if same_stage:
        meta["same_stage"] = same_stage
    if tied:
        meta["tied"] = tied
    return LayerProfile(profile_nodes, tuple(edges), meta)


# -- values --------------------------------------------------------------------------------------
_tensors, _map = tensors_of, map_tensors


def _clone(value: Any) -> Any:
    return _map(value, lambda t: t.detach().clone())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_args(example_inputs: Any) -> tuple:
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        example_inputs,)
    if not any(_tensors(a) for a in args):
        kinds = [type(a).__name__ for a in args]
        raise ConfigError(f"example_inputs holds no tensor (got {kinds}); pass one minibatch "
                          "as a tensor, or a tuple of the model's positional arguments")
    return args


def _device_of(model: torch.nn.Module, args: tuple) -> torch.device:
    for p in model.parameters():
        return p.device
    return next(t for a in args for t in _tensors(a)).device


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _trainable(params: Iterator[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _desc(module: torch.nn.Module) -> str:
    line = repr(module).splitlines()[0] if repr(module) else ""
    return type(module).__name__ if not line or line.endswith("(") else line


def _shapes(args: tuple) -> list:
    return [list(t.shape) for a in args for t in _tensors(a)]


def _run_failed(model: torch.nn.Module, args: tuple, err: Exception) -> ConfigError:
    return ConfigError(f"running {type(model).__name__} on example_inputs (tensor shapes "
                       f"{_shapes(args)}) failed: {first_line(err)}; pass example_inputs the "
                       "model accepts: one minibatch as a tensor, or a tuple of its positional "
                       "arguments, on the model's device")


@contextlib.contextmanager
def _preserved(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Training mode on for the duration; flags, buffers and random state restored after."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [device.index if device.index is not None else torch.cuda.current_device()
               ] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, flag in flags:
            m.training = flag


# -- layers of an nn.Sequential -------------------------------------------------------------------
def _is_plain_sequential(model: torch.nn.Module) -> bool:
    return (isinstance(model, torch.nn.Sequential)
            and type(model).forward is torch.nn.Sequential.forward)


def _sequential_layers(model: torch.nn.Sequential, args: tuple):
    entries = [(n, m) for n, m in model._modules.items() if m is not None]
    if not entries:
        raise ConfigError(f"{type(model).__name__} is an empty nn.Sequential: there are no "
                          "layers to profile; add its layers")
    if len(args) != 1:
        raise ConfigError(f"an nn.Sequential takes one input, but example_inputs has "
                          f"{len(args)} positional arguments; pass one tensor")
    calls: list[tuple[int, Any]] = []
    distinct = {id(m): m for _, m in entries}
    handles = [m.register_forward_hook(
        lambda mod, _args, out: calls.append((id(mod), _clone(out))))
        for m in distinct.values()]
    try:
        with torch.no_grad():
            model(*args)
    except Exception as err:
        raise _run_failed(model, args, err) from err
    finally:
        for h in handles:
            h.remove()
    if [c[0] for c in calls] != [id(m) for _, m in entries]:
        raise ConfigError(f"{type(model).__name__}: its children were not called once each in "
                          "order during forward; profile it as a traced model by wrapping it "
                          "(torch.fx) or make each child appear once in the nn.Sequential")
    layers = []
    for i, (child_name, child) in enumerate(entries):
        layers.append(_Layer(
            id=child_name, desc=_desc(child), run=lambda vals, m=child: [m(*vals)],
            inputs=[_clone(args[0]) if i == 0 else calls[i - 1][1]],
            kinds=["const" if i == 0 else "grad"], params=_trainable(child.parameters()),
            outputs=[calls[i][1]], produces_model_output=i == len(entries) - 1))
    edges = [(entries[i][0], entries[i + 1][0]) for i in range(len(entries) - 1)]
    inputs_meta = [{"name": "input", "bytes": sum(_nbytes(t) for t in _tensors(args[0])),
                    "readers": [entries[0][0]]}]
    return layers, edges, calls[-1][1], inputs_meta


def _shared_parameters(model: torch.nn.Module, layers: list[_Layer]) -> list[dict]:
    """Layers sharing a trainable parameter (a tied embedding and head, a module called
    twice), as `meta["tied"]` entries: {"nodes", "parameter" (its name in the model),
    "bytes"}."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{"nodes": [layer for layer, _ in uses], "parameter": names.get(id(p), uses[0][1]),
             "bytes": _nbytes(p)}
            for p, uses in parameter_users((layer.id, [("?", p) for p in layer.params])
                                           for layer in layers)]


# -- layers of an FX trace ------------------------------------------------------------------------
def _fx_layers(model: torch.nn.Module, args: tuple, capture: str):
    # the splitter's capture too
    traced = Traced(model, args, purpose="profile", clone=True, capture=capture)
    same_stage = traced.same_stage()
    gm, values, groups, edges, group_of = (traced.gm, traced.values, traced.groups,
                                           traced.edges, traced.group_of)
    trainable_attr, output, placeholders = (traced.trainable_attr, traced.output_value,
                                            traced.placeholders)
    layers = []
    for g in groups:
        members = set(g.members)
        ext: list[torch.fx.Node] = []
        params: list[torch.nn.Parameter] = []
        for n in g.members:
            if n.op == "call_module":
                params.extend(gm.get_submodule(n.target).parameters())
            for a in n.all_input_nodes:
                if a not in members and a not in ext:
                    ext.append(a)
                if trainable_attr(a):
                    params.append(values[a])
        kinds = ["live" if a.op == "get_attr" else
                 "grad" if a.op not in ("placeholder",) and group_of.get(a) is not None
                 else "const" for a in ext]
        layers.append(_Layer(
            id=g.id, desc=_group_desc(gm, [n for n in g.members]), run=_fx_runner(gm, g, ext),
            inputs=[values[a] for a in ext], kinds=kinds, params=_trainable(iter(params)),
            outputs=[values[n] for n in g.outputs],
            produces_model_output=g.produces_model_output))
    inputs_meta = []
    for p in placeholders:
        readers = [lay.id for lay, g in zip(layers, groups)
                   if any(p in n.all_input_nodes for n in g.members)]
        inputs_meta.append({"name": p.name, "readers": readers,
                            "bytes": sum(_nbytes(t) for t in _tensors(values.get(p)))})
    return layers, edges, output, inputs_meta, same_stage, traced.capture


def _fx_runner(gm: torch.fx.GraphModule, group, ext: list) -> Callable[[list], list]:
    """Run a group's FX nodes on values for its external inputs; return its outputs."""

    def run(vals: list) -> list:
        env = dict(zip(ext, vals))
        for n in group.members:
            a = torch.fx.node.map_arg(n.args, env.__getitem__)
            kw = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "call_module":
                env[n] = gm.get_submodule(n.target)(*a, **kw)
            elif n.op == "call_function":
                env[n] = n.target(*a, **kw)
            else:  # call_method
                env[n] = getattr(a[0], n.target)(*a[1:], **kw)
        return [env[n] for n in group.outputs]

    return run


def _group_desc(gm: torch.fx.GraphModule, members: list) -> str:
    def name(n: torch.fx.Node) -> str:
        if n.op == "call_module":
            return _desc(gm.get_submodule(n.target))
        if n.op == "call_method":
            return f".{n.target}"
        return getattr(n.target, "__name__", str(n.target))

    head, folded = name(members[0]), [name(n) for n in members[1:]]
    if not folded:
        return head
    shown = ", ".join(folded[:6]) + (", ..." if len(folded) > 6 else "")
    return f"{head} + {shown}"


# -- measurements ---------------------------------------------------------------------------------
def _owned_parameter_bytes(layers: list[_Layer]) -> dict[str, int]:
    """Trainable parameter bytes per layer; a shared parameter counts once, at its first user."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for layer in layers:
        total = 0
        for p in layer.params:
            if id(p) not in seen:
                seen.add(id(p))
                total += _nbytes(p)
        out[layer.id] = total
    return out


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer, layers: list[_Layer],
                           warmup: int, repeats: int) -> tuple[dict[str, int], dict[str, float]]:
    """Per layer, the bytes of the state a deep copy of `optimizer` holds after one step, and
    the time of one step over the layer's parameters."""
    owner: dict[int, str] = {}
    for layer in layers:
        for p in layer.params:
            owner.setdefault(id(p), layer.id)
    originals = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        clone = copy.deepcopy(optimizer)
    except Exception as err:
        raise ConfigError(f"cannot deep-copy the {type(optimizer).__name__} to measure its "
                          f"state ({first_line(err)}); pass optimizer=None to record 0 "
                          "optimizer-state bytes") from err
    copies = [p for g in clone.param_groups for p in g["params"]]
    for p in copies:
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    try:
        clone.step()
    except Exception as err:
        raise ConfigError(f"one step of a copy of the {type(optimizer).__name__} failed "
                          f"({first_line(err)}); pass optimizer=None to record 0 "
                          "optimizer-state bytes") from err
    out: dict[str, int] = {}
    for orig, cp in zip(originals, copies):
        layer_id = owner.get(id(orig))
        if layer_id is None:
            continue
        state = clone.state.get(cp, {})
        out[layer_id] = out.get(layer_id, 0) + sum(
            _nbytes(t) for t in _tensors(list(state.values())) if t.dim() > 0)
    return out, _update_times(clone, originals, copies, owner, warmup, repeats)


def _update_times(clone: torch.optim.Optimizer, originals: list, copies: list,
                  owner: dict[int, str], warmup: int, repeats: int) -> dict[str, float]:
    """Per layer, the median time of one step of the optimizer over the layer's parameters
    (copies, with the hyperparameters of their group); what the runtime spends per update."""
    group_of = {id(p): g for g in clone.param_groups for p in g["params"]}
    by_layer: dict[str, list] = {}
    for orig, cp in zip(originals, copies):
        if owner.get(id(orig)) is not None and cp.grad is not None:
            by_layer.setdefault(owner[id(orig)], []).append(cp)
    out: dict[str, float] = {}
    for layer_id, params in by_layer.items():
        hyper = {k: v for k, v in group_of[id(params[0])].items() if k != "params"}
        opt = type(clone)([{"params": params, **hyper}])
        times = []
        for r in range(max(1, warmup) + repeats):
            t0 = time.perf_counter()
            opt.step()
            if r >= max(1, warmup):
                times.append(time.perf_counter() - t0)
        out[layer_id] = statistics.median(times)
    return out


def _layer_step(layer: _Layer, sync: Callable[[], None]) -> Callable[[str], tuple[float, float]]:
    params = layer.params

    def step(mode: str) -> tuple[float, float]:
        fed, leaves = [], []
        for value, kind in zip(layer.inputs, layer.kinds):
            if kind == "live":
                fed.append(value)
                continue

            def fresh(t: torch.Tensor, kind: str = kind) -> torch.Tensor:
                c = t.detach().clone()
                if kind == "grad" and (c.is_floating_point() or c.is_complex()):
                    leaves.append(c.requires_grad_(True))
                    return c.clone()  # the layer may write into its input in place
                return c

            fed.append(_map(value, fresh))
        with torch.enable_grad():
            sync()
            t0 = time.perf_counter()
            outs = layer.run(fed)
            sync()
            t1 = time.perf_counter()
            targets = {"full": leaves + params, "input": leaves, "weight": params}[mode]
            heads = [t for t in _tensors(outs) if t.requires_grad]
            if not heads or not targets:
                return t1 - t0, 0.0
            grads = [torch.ones_like(t) for t in heads]
            sync()
            t2 = time.perf_counter()
            torch.autograd.grad(heads, targets, grads, allow_unused=True)
            sync()
            t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    return step


def _sum_loss(output: Any) -> torch.Tensor:
    parts = [t.sum() for t in _tensors(output) if t.is_floating_point() or t.is_complex()]
    if not parts:
        raise ConfigError("the model's output holds no floating-point tensor to sum as the "
                          "default loss; pass loss_fn(output) -> scalar tensor")
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total.real if total.is_complex() else total


def _whole_model_s(model: torch.nn.Module, args: tuple, loss_fn: Callable | None,
                   sync: Callable[[], None], warmup: int, repeats: int) -> tuple[float, float]:
    """Median forward (with the loss) and backward time of whole training passes
    ([Note: calibration] in legato/adapters/_pipeline_graph.py). The user's gradients are set
    aside and put back (buffers and random state are restored by the caller)."""
    fn = loss_fn if loss_fn is not None else _sum_loss
    params = _trainable(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    times_f, times_b = [], []
    try:
        for r in range(warmup + repeats):
            with torch.enable_grad():
                sync()
                t0 = time.perf_counter()
                loss = fn(model(*args))
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
            if r >= warmup:
                times_f.append(t1 - t0)
                times_b.append(t2 - t1)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return statistics.median(times_f), statistics.median(times_b)


def _time_loss(loss_fn: Callable | None, output: Any, sync: Callable[[], None], warmup: int,
               repeats: int) -> dict:
    fn = loss_fn if loss_fn is not None else _sum_loss
    label = "sum of outputs" if loss_fn is None else getattr(loss_fn, "__name__", "loss_fn")

    def step(_mode: str) -> tuple[float, float]:
        fed = _map(output, lambda t: t.detach().clone().requires_grad_(
            t.is_floating_point() or t.is_complex()))
        leaves = [t for t in _tensors(fed) if t.requires_grad]
        with torch.enable_grad():
            sync()
            t0 = time.perf_counter()
            loss = fn(fed)
            sync()
            t1 = time.perf_counter()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = (f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor)
                       else type(loss).__name__)
                raise ConfigError(f"loss_fn returned {got}; it must return a scalar tensor "
                                  "(reduce with .mean() or .sum())")
            if not loss.requires_grad or not leaves:
                return t1 - t0, 0.0
            sync()
            t2 = time.perf_counter()
            torch.autograd.grad(loss, leaves, allow_unused=True)
            sync()
            t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    return time_loss(step, label, "scalar tensor, taking the model's output as its one argument",
                     warmup=warmup, repeats=repeats)
