"""Pipeline profiles of MXNet Gluon models: a `LayerProfile` (a chain of the children of an
`nn.Sequential` or `nn.HybridSequential`, with per-layer costs) measured layer by layer.

    prof = profile_pipeline(net, nd.random.normal(shape=(64, 3, 32, 32)),
                            loss_fn=lambda out: loss(out, labels), optimizer=trainer)
    prof.save("net.profile.json")

Runs in .venv-mxnet (mxnet 1.9.1 needs numpy<1.24).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from typing import Any, Callable, Iterator

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from legato.adapters._pipeline_graph import (
    BACKWARD_MODES,
    calibrate_times,
    check_counts,
    first_line,
    layer_node,
    median_seconds,
    time_layer,
    time_loss,
)
from legato.core.errors import ConfigError
from legato.core.pipeline.profile import LayerProfile

__all__ = ["profile_pipeline"]

SOURCE = "legato mxnet profiler"


def profile_pipeline(net: gluon.Block, example_inputs: Any, *,
                     loss_fn: Callable[[Any], nd.NDArray] | None = None,
                     optimizer: mx.optimizer.Optimizer | gluon.Trainer | None = None,
                     warmup: int = 2, repeats: int = 5,
                     split_backward: bool = True, calibrate: bool = True) -> LayerProfile:
    """Profile a Gluon `nn.Sequential`/`nn.HybridSequential` for pipeline planning.

    Layers: the children, in order (a chain; ids are the child names, "0", "1", ...). Other
    blocks have no layer list to read and are refused. The model input is not a node;
    `meta["inputs"]` gives its bytes.

    Measured per child, on the child's own input from a real forward pass of `example_inputs`
    in training mode, as medians of `repeats` runs after `warmup` runs, with
    `time.perf_counter` and `mx.nd.waitall()` around each span: forward time under
    `autograd.record(train_mode=True)`; backward time of `autograd.grad` of the child's outputs
    (head gradient of ones) with respect to its input and its parameters (grad_req not "null");
    with `split_backward`, the same with respect to the input only and the parameters only,
    each measured on its own. The first child's input is the model input: no input gradient.
    The loss's times are added to the last child.

    Args:
        net: the block, initialized (deferred shapes are fine: an inference call on the
            example completes them first).
        example_inputs: one minibatch: an NDArray or numpy array (or a 1-tuple of one).
        loss_fn: `loss_fn(output) -> NDArray`, back-propagated with a head gradient of ones as
            `loss.backward()` does (bind labels with a lambda); default: the sum of the output.
        optimizer: an `mx.optimizer.Optimizer` or a `gluon.Trainer`; if given, each child's
            optimizer-state bytes are the bytes of the state arrays the optimizer creates for
            its parameters (`create_state_multi_precision`, on a shallow copy), and its
            `update_s` the median time of that optimizer's `update_multi_precision` over
            copies of the child's parameters with zero gradients; else 0.
        warmup: untimed runs per layer and measurement.
        repeats: timed runs per layer and measurement (the median is kept).
        split_backward: also measure input-gradient and weight-gradient time separately.
        calibrate: then time whole training passes of the net as it is (hybridized or not:
            the forward with the loss under `autograd.record`, then `loss.backward()`) and
            scale every child's forward times, and every backward time, to add up to them
            ([Note: calibration] in legato/adapters/_pipeline_graph.py); the scales are in
            `meta["calibration"]`. The parameters' gradients are put back as they were.

    Returns:
        A `LayerProfile`; times in seconds and sizes in bytes for one minibatch of the example's
        batch size. Parameters, BatchNorm statistics and gradients are left as they were.
    """
    if not isinstance(net, gluon.Block):
        raise ConfigError(f"net is a {type(net).__name__}, not a gluon.Block; pass the Gluon "
                          "nn.HybridSequential or nn.Sequential to profile")
    if not _is_plain_sequential(net):
        raise ConfigError(f"{type(net).__name__} is not a plain gluon nn.Sequential or "
                          "nn.HybridSequential, so it has no layer list to read; put its layers "
                          "in an nn.HybridSequential (net.add(layer1, layer2, ...)), whose "
                          "children form the pipeline's chain")
    check_counts(warmup, repeats)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(output) -> "
                          "NDArray, or None for the sum of the output")
    if isinstance(optimizer, gluon.Trainer):
        optimizer = optimizer.optimizer
    if optimizer is not None and not isinstance(optimizer, mx.optimizer.Optimizer):
        raise ConfigError(f"optimizer is a {type(optimizer).__name__}, not an "
                          "mx.optimizer.Optimizer or gluon.Trainer; pass the one used to "
                          "train, or None")
    children = list(net._children.items())
    if not children:
        raise ConfigError(f"{type(net).__name__} {net.name} is empty: there are no layers to "
                          "profile; add its layers")
    x = _as_input(example_inputs)
    try:  # completes deferred initialization; inference mode changes no statistics
        with autograd.predict_mode():
            net(x)
        nd.waitall()
    except Exception as err:
        raise _run_failed(net, x, err) from err
    with _preserved(net):
        captured = []
        h = x
        try:
            with autograd.train_mode():
                for _, child in children:
                    h = child(h)
                    captured.append(h)
            nd.waitall()
        except Exception as err:
            raise _run_failed(net, x, err) from err
        ctx = x.context
        params = {name: _trainable(child) for name, child in children}
        owned = _owned_bytes(params)
        state = _optimizer_state_bytes(optimizer, params, ctx) if optimizer is not None else {}
        modes = BACKWARD_MODES if split_backward else ("full",)
        nodes = []
        for i, (name, child) in enumerate(children):
            saved = x if i == 0 else captured[i - 1]
            step = _layer_step(child, saved, i > 0, [p.data(ctx) for p in params[name]])
            try:
                fwd, bwd = time_layer(step, modes, warmup=warmup, repeats=repeats)
            except Exception as err:
                raise ConfigError(f"layer {name!r} ({_desc(child)}) failed when run on its "
                                  f"recorded input: {first_line(err)}") from err
            nodes.append([name, child, fwd, bwd])
        loss_meta = _time_loss(loss_fn, captured[-1], warmup, repeats)
        updates = (_update_times(optimizer, params, ctx, warmup, repeats)
                   if optimizer is not None else {})
        calibration = _whole_model_s(net, x, loss_fn, warmup, repeats) if calibrate else None
    last = nodes[-1]
    last[2] += loss_meta["loss_forward_s"]
    last[3] = {m: b + loss_meta["loss_backward_s"] if m != "weight" else b
               for m, b in last[3].items()}
    loss_meta["loss_added_to"] = last[0]
    if calibration is not None:
        fwds, bwds, loss_meta["calibration"] = calibrate_times(
            [e[2] for e in nodes], [e[3] for e in nodes], calibration,
            "the net as given: forward with the loss under autograd.record, then "
            "loss.backward()")
        for entry, f, b in zip(nodes, fwds, bwds):
            entry[2], entry[3] = f, b
    profile_nodes = tuple(
        dataclasses.replace(
            layer_node(name, _desc(child), fwd, bwd, [_nbytes(a) for a in _arrays(captured[i])],
                       owned[name], state.get(name, 0), split_backward=split_backward),
            update_s=updates.get(name, 0.0))
        for i, (name, child, fwd, bwd) in enumerate(nodes))
    edges = tuple((children[i][0], children[i + 1][0]) for i in range(len(children) - 1))
    meta = {"model": type(net).__name__, "source": SOURCE, "framework": "mxnet",
            "framework_version": mx.__version__, "device": str(ctx),
            "batch_size": int(x.shape[0]) if x.ndim else 1, "graph": "sequential",
            "hybridized": bool(getattr(net, "_active", False)), "warmup": warmup,
            "repeats": repeats, "split_backward": split_backward,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "inputs": [{"name": "input", "bytes": _nbytes(x), "readers": [children[0][0]]}],
            **loss_meta}
    return LayerProfile(profile_nodes, edges, meta)


# -- values --------------------------------------------------------------------------------------
def _arrays(value: Any) -> list[nd.NDArray]:
    """The NDArrays in a value (nested lists and tuples), in order."""
    if isinstance(value, nd.NDArray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays(v)]
    return []


def _map(value: Any, fn: Callable[[nd.NDArray], Any]) -> Any:
    if isinstance(value, nd.NDArray):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _nbytes(a: nd.NDArray) -> int:
    return int(a.size) * np.dtype(a.dtype).itemsize


def _floating(a: nd.NDArray) -> bool:
    return np.issubdtype(np.dtype(a.dtype), np.floating)


def _desc(block: gluon.Block) -> str:
    line = repr(block).splitlines()[0] if repr(block) else ""
    return type(block).__name__ if not line or line.endswith("(") else line


def _is_plain_sequential(net: gluon.Block) -> bool:
    if isinstance(net, gluon.nn.HybridSequential):
        base = gluon.nn.HybridSequential
        return (type(net).hybrid_forward is base.hybrid_forward
                and type(net).forward is base.forward)
    if isinstance(net, gluon.nn.Sequential):
        return type(net).forward is gluon.nn.Sequential.forward
    return False


def _as_input(example_inputs: Any) -> nd.NDArray:
    x = example_inputs
    if isinstance(x, (tuple, list)):
        if len(x) != 1:
            raise ConfigError(f"a Gluon Sequential takes one input, but example_inputs has "
                              f"{len(x)}; pass one NDArray")
        x = x[0]
    if isinstance(x, np.ndarray):
        x = nd.array(x, dtype=x.dtype)
    if not isinstance(x, nd.NDArray):
        raise ConfigError(f"example_inputs is a {type(x).__name__}, not an NDArray; pass one "
                          "minibatch as an mx.nd.NDArray or numpy array")
    return x


def _run_failed(net: gluon.Block, x: nd.NDArray, err: Exception) -> ConfigError:
    hint = ("; call net.initialize() (with ctx=...) first" if "not been initialized" in str(err)
            else "; pass example_inputs the model accepts: one minibatch as an NDArray, on "
            "the parameters' context")
    return ConfigError(f"running {type(net).__name__} on example_inputs (shape "
                       f"{list(x.shape)}) failed: {first_line(err)}{hint}")


@contextlib.contextmanager
def _preserved(net: gluon.Block) -> Iterator[None]:
    """Every parameter's data (BatchNorm running statistics too) restored after."""
    saved = [(p, [d.copy() for d in p.list_data()]) for p in net.collect_params().values()
             if p._data is not None]
    try:
        yield
    finally:
        for p, copies in saved:
            for d, c in zip(p.list_data(), copies):
                c.copyto(d)
        nd.waitall()


def _trainable(block: gluon.Block) -> list[gluon.Parameter]:
    seen: set[int] = set()
    out = []
    for p in block.collect_params().values():
        if p.grad_req != "null" and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _param_bytes(p: gluon.Parameter) -> int:
    return int(np.prod(p.shape, dtype=np.int64)) * np.dtype(p.dtype).itemsize


# -- measurements ---------------------------------------------------------------------------------
def _owned_bytes(params: dict[str, list]) -> dict[str, int]:
    """Trainable bytes per child; a shared parameter counts at its first user."""
    seen: set[int] = set()
    out = {}
    for name, ps in params.items():
        mine = [p for p in ps if id(p) not in seen]
        seen.update(id(p) for p in mine)
        out[name] = sum(_param_bytes(p) for p in mine)
    return out


def _optimizer_state_bytes(optimizer: mx.optimizer.Optimizer, params: dict[str, list],
                           ctx: mx.Context) -> dict[str, int]:
    """Per child, the bytes of the state the optimizer creates for its own parameters."""
    probe = copy.copy(optimizer)
    seen: set[int] = set()
    out = {}
    index = 0
    for name, ps in params.items():
        total = 0
        for p in ps:
            if id(p) in seen:
                continue
            seen.add(id(p))
            try:
                state = probe.create_state_multi_precision(index, p.data(ctx))
            except Exception as err:
                raise ConfigError(f"the {type(optimizer).__name__} could not create its state "
                                  f"for {p.name} ({first_line(err)}); pass optimizer=None to "
                                  "record 0 optimizer-state bytes") from err
            index += 1
            total += sum(_nbytes(a) for a in _arrays(state))
        out[name] = total
    return out


def _layer_step(child: gluon.Block, saved: Any, input_grad: bool, weights: list
                ) -> Callable[[str], tuple[float, float]]:
    def step(mode: str) -> tuple[float, float]:
        leaves: list[nd.NDArray] = []

        def fresh(a: nd.NDArray) -> nd.NDArray:
            c = a.copy()
            if input_grad and _floating(c):
                c.attach_grad()
                leaves.append(c)
            return c

        inp = _map(saved, fresh)
        targets = {"full": leaves + weights, "input": leaves, "weight": weights}[mode]
        nd.waitall()
        t0 = time.perf_counter()
        with autograd.record(train_mode=True):
            out = child(inp)
        nd.waitall()
        t1 = time.perf_counter()
        heads = [a for a in _arrays(out) if _floating(a)]
        if not heads or not targets:
            return t1 - t0, 0.0
        head_grads = [nd.ones_like(a) for a in heads]
        nd.waitall()
        t2 = time.perf_counter()
        autograd.grad(heads, targets, head_grads=head_grads, retain_graph=False)
        nd.waitall()
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    return step


def _sum_loss(out: Any) -> nd.NDArray:
    parts = [a.sum() for a in _arrays(out) if _floating(a)]
    if not parts:
        raise ConfigError("the model's output holds no floating-point NDArray to sum as "
                          "the default loss; pass loss_fn(output) -> NDArray")
    return nd.add_n(*parts) if len(parts) > 1 else parts[0]


def _update_times(optimizer: mx.optimizer.Optimizer, params: dict[str, list], ctx: mx.Context,
                  warmup: int, repeats: int) -> dict[str, float]:
    """Per child, the median time of one `update_multi_precision` of the optimizer over copies
    of its own parameters (zero gradients), on a shallow copy with its own update counters
    (the user's optimizer counts nothing)."""
    probe = copy.copy(optimizer)
    probe._all_index_update_counts = {0: {}}
    probe._index_update_count = probe._all_index_update_counts[0]
    seen: set[int] = set()
    out: dict[str, float] = {}
    index = 1 << 30                    # indices of no real parameter: no lr_mult/wd_mult lookups
    for name, ps in params.items():
        mine = [p for p in ps if id(p) not in seen]
        seen.update(id(p) for p in mine)
        if not mine:
            continue
        try:
            work = []
            for p in mine:
                w = p.data(ctx).copy()
                work.append((index, w, nd.zeros_like(w),
                             probe.create_state_multi_precision(index, w)))
                index += 1

            def update(work=work) -> None:
                for i, w, g, st in work:
                    probe.update_multi_precision(i, w, g, st)

            out[name] = median_seconds(update, nd.waitall, warmup=warmup, repeats=repeats)
        except Exception as err:
            raise ConfigError(f"timing an update of the {type(optimizer).__name__} over layer "
                              f"{name!r}'s parameters failed ({first_line(err)}); pass "
                              "optimizer=None to record no update time") from err
    return out


def _whole_model_s(net: gluon.Block, x: nd.NDArray, loss_fn: Callable | None, warmup: int,
                   repeats: int) -> tuple[float, float]:
    """Median forward (with the loss) and backward seconds of whole training passes of the net;
    every parameter's gradient is put back afterwards (data is restored by the caller)."""
    fn = loss_fn if loss_fn is not None else _sum_loss
    trainable = [p for p in net.collect_params().values()
                 if p.grad_req != "null" and p._data is not None]
    saved = [[g.copy() for g in p.list_grad()] for p in trainable]
    fwd, bwd = [], []
    try:
        for r in range(warmup + repeats):
            nd.waitall()
            t0 = time.perf_counter()
            with autograd.record(train_mode=True):
                loss = fn(net(x))
            nd.waitall()
            t1 = time.perf_counter()
            loss.backward()
            nd.waitall()
            t2 = time.perf_counter()
            if r >= warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"timing whole training passes of the net failed ({first_line(err)}); "
                          "pass calibrate=False to keep the per-layer times") from err
    finally:
        for p, grads in zip(trainable, saved):
            for g, c in zip(p.list_grad(), grads):
                c.copyto(g)
        nd.waitall()
    return statistics.median(fwd), statistics.median(bwd)


def _time_loss(loss_fn: Callable | None, output: Any, warmup: int, repeats: int) -> dict:
    label = "sum of outputs" if loss_fn is None else getattr(loss_fn, "__name__", "loss_fn")
    fn = loss_fn if loss_fn is not None else _sum_loss

    def step(_mode: str) -> tuple[float, float]:
        leaves: list[nd.NDArray] = []

        def fresh(a: nd.NDArray) -> nd.NDArray:
            c = a.copy()
            if _floating(c):
                c.attach_grad()
                leaves.append(c)
            return c

        inp = _map(output, fresh)
        nd.waitall()
        t0 = time.perf_counter()
        with autograd.record(train_mode=True):
            loss = fn(inp)
        nd.waitall()
        t1 = time.perf_counter()
        if not isinstance(loss, nd.NDArray):
            raise ConfigError(f"loss_fn returned a {type(loss).__name__}; it must return an "
                              "NDArray (a scalar, or per-sample losses)")
        if not leaves:
            return t1 - t0, 0.0
        nd.waitall()
        t2 = time.perf_counter()
        autograd.grad(loss, leaves, head_grads=nd.ones_like(loss), retain_graph=False)
        nd.waitall()
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    return time_loss(step, label, "NDArray, taking the model's output as its one argument",
                     warmup=warmup, repeats=repeats)
