"""Pipeline profiles of Keras 3 models on TensorFlow: a `LayerProfile` (layer DAG with per-layer
costs) read from the model's layer graph and measured eagerly layer by layer.

    prof = profile_pipeline(model, x_batch, loss_fn=lambda out: loss(y_batch, out),
                            optimizer=keras.optimizers.Adam())
    prof.save("model.profile.json")

Layers are the layers of a `keras.Sequential` (a chain), or the nodes of a functional model's
graph with raw Keras ops folded in or made merge nodes
([Note: folding parameter-free ops] in legato/adapters/_pipeline_graph.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from legato.adapters._pipeline_graph import (
    BACKWARD_MODES,
    Op,
    calibrate_times,
    check_counts,
    first_line,
    group_ops,
    layer_node,
    median_seconds,
    time_layer,
    time_loss,
)
from legato.core.errors import ConfigError
from legato.core.pipeline.profile import LayerProfile

__all__ = ["profile_pipeline"]

SOURCE = "legato tensorflow profiler"
_CONFIG_KEYS = ("units", "filters", "kernel_size", "strides", "pool_size", "rate",
                "activation", "output_dim", "num_heads")


@dataclasses.dataclass
class _Layer:
    """A profile node before it is timed: how to run it alone, and what it ran on."""

    id: str
    desc: str
    run: Callable[[list], list]
    inputs: list  # captured tensors, one per input slot of `run`
    grad: list[bool]  # per slot: another node's activation (gets an input gradient)
    variables: list  # trainable Keras variables it reads (weight-gradient targets)
    outputs: list  # captured tensors that leave the node
    produces_model_output: bool = False


def profile_pipeline(model: keras.Model, example_inputs: Any, *,
                     loss_fn: Callable[[Any], Any] | None = None,
                     optimizer: keras.optimizers.Optimizer | None = None, warmup: int = 2,
                     repeats: int = 5, split_backward: bool = True,
                     calibrate: bool = True) -> LayerProfile:
    """Profile a Keras model for pipeline planning: its layer DAG and each layer's costs.

    Layers: the layers of a `keras.Sequential` (a chain; ids are the layer names), or the
    nodes of a functional model (`keras.Model(inputs, outputs)`): every layer call is a node
    (id: the layer name, `name#2` for a second call of a shared layer); a raw Keras op
    (`keras.ops.*`, `a + b` on symbolic tensors) is folded into the node whose output it reads,
    unless it reads two or more nodes' outputs or a node's and a model input (a merge point),
    which makes it a node of its own. `InputLayer`s are not nodes (as model inputs are not in
    the other frameworks' profiles); `meta["inputs"]` lists their bytes and readers.
    Subclassed models have no layer graph to read and are refused.

    Measured per layer, eagerly, on the layer's own input from a real forward pass of
    `example_inputs` (layers called with `training=True`), as medians of `repeats` runs after
    `warmup` runs, with `time.perf_counter` (devices synchronized around each span on GPU):
    forward time under a `tf.GradientTape`; backward time of `tape.gradient` of the layer's
    outputs (upstream gradient of ones) with respect to its activation inputs and trainable
    variables; with `split_backward`, the same with respect to the inputs only and the variables
    only, each measured on its own. Inputs that are model inputs get no input gradient. The
    loss's times are added to the last node producing the model's output.

    Args:
        model: a built `keras.Sequential` or functional `keras.Model`.
        example_inputs: one minibatch: a tensor or array, or a list (or dict by input name) of
            them for a model with several inputs.
        loss_fn: `loss_fn(output) -> scalar` (bind targets with a lambda); default: the sum of
            every floating-point output.
        optimizer: if given, each layer's optimizer-state bytes are the bytes of the slot
            variables (at least one dimension; iteration counters and learning rates are not
            counted) that a fresh optimizer from its config creates when built on the layer's
            trainable variables, and its `update_s` the median time of that optimizer's
            `apply_gradients` on copies of the layer's variables, compiled with `tf.function`
            as `model.fit` runs it; else 0.
        warmup: untimed runs per layer and measurement.
        repeats: timed runs per layer and measurement (the median is kept).
        split_backward: also measure input-gradient and weight-gradient time separately.
        calibrate: then time whole training passes of the model as `model.fit` runs them
            (compiled with `tf.function`: the forward with the loss, and the forward with the
            loss and its gradient, the backward being their difference) and scale every
            layer's forward times, and every backward time, to add up to them ([Note:
            calibration] in legato/adapters/_pipeline_graph.py); the scales are in
            `meta["calibration"]`.

    Returns:
        A `LayerProfile`; times in seconds and sizes in bytes for one minibatch of the example's
        batch size. The model's variables (weights, BatchNormalization statistics, random seed
        states) and the optimizer are left as they were; an unbuilt model is built by one
        inference call on the example first.
    """
    if not isinstance(model, keras.Model):
        raise ConfigError(f"model is a {type(model).__name__}, not a Keras 3 keras.Model; pass a "
                          "keras.Sequential or a functional keras.Model (legacy tf_keras models "
                          "are not supported)")
    check_counts(warmup, repeats)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(output) -> "
                          "scalar, or None for the sum of the outputs")
    if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ConfigError(f"optimizer is a {type(optimizer).__name__}, not a "
                          "keras.optimizers.Optimizer; pass the model's optimizer, or None")
    sequential = isinstance(model, keras.Sequential)
    if not sequential and not hasattr(model, "_nodes_by_depth"):
        raise ConfigError(f"{type(model).__name__} is a subclassed keras.Model: its call() has "
                          "no layer graph to read; build it with keras.Sequential or the "
                          "functional API (keras.Model(inputs, outputs))")
    if sequential and not model.layers:
        raise ConfigError(f"{model.name} is an empty keras.Sequential: there are no layers to "
                          "profile; add its layers")
    args = _as_inputs(model, example_inputs, sequential)
    if not model.built:
        try:
            model(args[0] if sequential else args, training=False)
        except Exception as err:
            raise _run_failed(model, args, err) from err
    sync = _sync_for()
    with _preserved(model):
        if sequential:
            layers, edges, output, inputs_meta = _sequential_layers(model, args)
        else:
            layers, edges, output, inputs_meta = _functional_layers(model, args)
        owned, owned_vars = _owned_variables(layers)
        state = _optimizer_state_bytes(optimizer, owned_vars) if optimizer is not None else {}
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
        updates = (_update_times(optimizer, owned_vars, sync, warmup, repeats)
                   if optimizer is not None else {})
        calibration = (_whole_model_s(model, args[0] if sequential else args, loss_fn, sync,
                                      warmup, repeats) if calibrate else None)
    sinks = [entry for entry in nodes if entry[0].produces_model_output]
    if sinks:  # the loss runs on the last stage
        entry = sinks[-1]
        entry[1] += loss_meta["loss_forward_s"]
        entry[2] = {m: b + loss_meta["loss_backward_s"] if m != "weight" else b
                    for m, b in entry[2].items()}
        loss_meta["loss_added_to"] = entry[0].id
    if calibration is not None:
        fwds, bwds, loss_meta["calibration"] = calibrate_times(
            [e[1] for e in nodes], [e[2] for e in nodes], calibration,
            "tf.function: forward with the loss; forward, loss and gradient (their difference)")
        for entry, f, b in zip(nodes, fwds, bwds):
            entry[1], entry[2] = f, b
    profile_nodes = tuple(
        dataclasses.replace(
            layer_node(layer.id, layer.desc, fwd, bwd, [_nbytes(t) for t in layer.outputs],
                       owned.get(layer.id, 0), state.get(layer.id, 0),
                       split_backward=split_backward),
            update_s=updates.get(layer.id, 0.0))
        for layer, fwd, bwd in nodes)
    first = args[0]
    meta = {"model": type(model).__name__, "source": SOURCE, "framework": "tensorflow",
            "framework_version": tf.__version__, "keras_version": keras.__version__,
            "device": _device_name(output), "graph": "sequential" if sequential else "functional",
            "batch_size": int(first.shape[0]) if first.shape.rank else 1,
            "warmup": warmup, "repeats": repeats, "split_backward": split_backward,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "inputs": inputs_meta, **loss_meta}
    return LayerProfile(profile_nodes, tuple(edges), meta)


# -- values --------------------------------------------------------------------------------------
def _nbytes(t: Any) -> int:
    return int(t.shape.num_elements()) * t.dtype.size


def _var_bytes(v: Any) -> int:
    return int(np.prod(v.shape, dtype=np.int64)) * tf.as_dtype(v.dtype).size


def _flat_tensors(value: Any) -> list:
    return [t for t in keras.tree.flatten(value) if isinstance(t, (tf.Tensor, np.ndarray))]


def _floating(t: Any) -> bool:
    return t.dtype.is_floating or t.dtype.is_complex


def _device_name(output: list) -> str:
    return output[0].device if output and hasattr(output[0], "device") else "unknown"


def _as_inputs(model: keras.Model, example_inputs: Any, sequential: bool) -> list:
    """The example as a list of tensors, one per model input."""
    if isinstance(example_inputs, dict) and not sequential:
        names = [t.name for t in model.inputs]
        missing = sorted(set(names) - set(example_inputs))
        if missing:
            raise ConfigError(f"example_inputs lacks the model inputs {missing}; it has "
                              f"{sorted(example_inputs)} (inputs: {names})")
        raw = [example_inputs[n] for n in names]
    elif isinstance(example_inputs, (list, tuple)):
        raw = list(example_inputs)
    else:
        raw = [example_inputs]
    out = []
    for i, x in enumerate(raw):
        try:
            out.append(tf.convert_to_tensor(x))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"example_inputs[{i}] is a {type(x).__name__} that TensorFlow "
                              f"cannot turn into a tensor ({first_line(err)}); pass one "
                              "minibatch as a tensor or numpy array (a list for several "
                              "inputs)") from err
    if not out:
        raise ConfigError("example_inputs is empty; pass one minibatch as a tensor")
    want = 1 if sequential else len(model.inputs)
    if len(out) != want:
        raise ConfigError(f"{type(model).__name__} takes {want} input(s) but example_inputs "
                          f"has {len(out)}; pass one tensor per model input")
    return out


def _run_failed(model: keras.Model, args: list, err: Exception) -> ConfigError:
    shapes = [t.shape.as_list() for t in args]
    return ConfigError(f"running {type(model).__name__} on example_inputs (shapes {shapes}) "
                       f"failed: {first_line(err)}; pass example_inputs the model accepts: one "
                       "minibatch per model input, with the shapes and dtypes of its Inputs")


def _sync_for() -> Callable[[], None]:
    if tf.config.list_logical_devices("GPU"):
        return tf.test.experimental.sync_devices
    return lambda: None  # eager CPU kernels run before the op returns


@contextlib.contextmanager
def _preserved(model: keras.Model) -> Iterator[None]:
    """Every variable (BatchNormalization statistics, seed states, ...) restored after."""
    saved = [(v, v.numpy()) for v in model.variables]
    try:
        yield
    finally:
        for v, value in saved:
            v.assign(value)


def _desc(op: Any) -> str:
    name = type(op).__name__
    if not isinstance(op, keras.layers.Layer):
        return name
    try:
        config = op.get_config()
    except Exception:  # a custom layer without get_config
        return name
    parts = [f"{k}={config[k]}" for k in _CONFIG_KEYS if config.get(k) is not None]
    return f"{name}({', '.join(parts)})" if parts else name


def _call(op: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(op, keras.layers.Layer):
        kwargs = {**kwargs}
        kwargs.setdefault("training", True)
    return op(*args, **kwargs)


def _trainable(variables: list) -> list:
    seen: set[int] = set()
    out = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


# -- layers of a keras.Sequential -----------------------------------------------------------------
def _sequential_layers(model: keras.Sequential, args: list):
    entries = list(model.layers)
    captured = []
    h = args[0]
    try:
        for layer in entries:
            h = layer(h, training=True)
            captured.append(h)
    except Exception as err:
        raise _run_failed(model, args, err) from err
    layers = []
    for i, layer in enumerate(entries):
        layers.append(_Layer(
            id=layer.name, desc=_desc(layer),
            run=lambda vals, layer=layer: _flat_tensors(layer(vals[0], training=True)),
            inputs=[args[0] if i == 0 else captured[i - 1]], grad=[i > 0],
            variables=_trainable(layer.trainable_variables), outputs=_flat_tensors(captured[i]),
            produces_model_output=i == len(entries) - 1))
    edges = [(entries[i].name, entries[i + 1].name) for i in range(len(entries) - 1)]
    inputs_meta = [{"name": "input", "bytes": _nbytes(args[0]), "readers": [entries[0].name]}]
    return layers, edges, _flat_tensors(captured[-1]), inputs_meta


# -- layers of a functional model -----------------------------------------------------------------
def _functional_layers(model: keras.Model, args: list):
    order = [n for depth in sorted(model._nodes_by_depth, reverse=True)
             for n in model._nodes_by_depth[depth] if n.operation is not None and not n.is_input]
    if not order:
        raise ConfigError(f"{model.name} has no layers between its inputs and outputs; there "
                          "is nothing to profile")
    input_ids = {id(t) for t in model.inputs}
    producer = {id(t): n for n in order for t in n.outputs}
    values = {id(kt): x for kt, x in zip(model.inputs, args)}
    try:
        for n in order:
            a, kw = n.arguments.fill_in(values)
            for kt, y in zip(n.outputs, keras.tree.flatten(_call(n.operation, a, kw))):
                values[id(kt)] = y
    except Exception as err:
        raise _run_failed(model, args, err) from err
    ops = [Op(key=n, name=n.operation.name, is_layer=isinstance(n.operation, keras.layers.Layer),
              inputs=tuple(producer[id(t)] for t in n.input_tensors if id(t) in producer),
              reads_model_input=any(id(t) in input_ids for t in n.input_tensors))
           for n in order]
    model_outputs = [producer[id(t)] for t in model.outputs if id(t) in producer]
    groups, edges, group_of = group_ops(ops, model_outputs)
    consumed = {id(t) for n in order for t in n.input_tensors} | {id(t) for t in model.outputs}
    layers = []
    for g in groups:
        members = set(g.members)
        ext, variables = [], []
        for n in g.members:
            if isinstance(n.operation, keras.layers.Layer):
                variables.extend(n.operation.trainable_variables)
            for t in n.input_tensors:
                if ((id(t) in input_ids or producer[id(t)] not in members)
                        and all(t is not e for e in ext)):
                    ext.append(t)
        out_tensors = [t for n in g.outputs for t in n.outputs if id(t) in consumed]
        layers.append(_Layer(
            id=g.id, desc=_group_desc(g.members), run=_runner(g.members, ext, out_tensors),
            inputs=[values[id(t)] for t in ext],
            grad=[id(t) not in input_ids and group_of.get(producer[id(t)]) is not None
                  and _floating(values[id(t)]) for t in ext],
            variables=_trainable(variables), outputs=[values[id(t)] for t in out_tensors],
            produces_model_output=g.produces_model_output))
    inputs_meta = []
    for kt, x in zip(model.inputs, args):
        readers = [lay.id for lay, g in zip(layers, groups)
                   if any(kt is t for n in g.members for t in n.input_tensors)]
        inputs_meta.append({"name": kt.name, "bytes": _nbytes(x), "readers": readers})
    output = [values[id(t)] for t in model.outputs]
    return layers, edges, output, inputs_meta


def _runner(members: list, ext: list, out_tensors: list) -> Callable[[list], list]:
    """Run a group's graph nodes on values for its external inputs; return its outputs."""

    def run(vals: list) -> list:
        values = {id(t): v for t, v in zip(ext, vals)}
        for n in members:
            a, kw = n.arguments.fill_in(values)
            for kt, y in zip(n.outputs, keras.tree.flatten(_call(n.operation, a, kw))):
                values[id(kt)] = y
        return [values[id(t)] for t in out_tensors]

    return run


def _group_desc(members: list) -> str:
    head, folded = _desc(members[0].operation), [_desc(n.operation) for n in members[1:]]
    if not folded:
        return head
    return f"{head} + " + ", ".join(folded[:6]) + (", ..." if len(folded) > 6 else "")


# -- measurements ---------------------------------------------------------------------------------
def _owned_variables(layers: list[_Layer]) -> tuple[dict[str, int], dict[str, list]]:
    """Trainable bytes and variables per layer; a shared variable counts at its first user."""
    seen: set[int] = set()
    nbytes: dict[str, int] = {}
    owned: dict[str, list] = {}
    for layer in layers:
        mine = [v for v in layer.variables if id(v) not in seen]
        seen.update(id(v) for v in mine)
        owned[layer.id] = mine
        nbytes[layer.id] = sum(_var_bytes(v) for v in mine)
    return nbytes, owned


def _optimizer_state_bytes(optimizer: keras.optimizers.Optimizer,
                           owned: dict[str, list]) -> dict[str, int]:
    """Per layer, the bytes of the slots a fresh copy of `optimizer` builds for its variables."""
    out: dict[str, int] = {}
    for layer_id, variables in owned.items():
        if not variables:
            continue
        try:
            fresh = type(optimizer).from_config(optimizer.get_config())
            fresh.build(variables)
        except Exception as err:
            raise ConfigError(f"cannot build a copy of the {type(optimizer).__name__} from its "
                              f"config to measure its state ({first_line(err)}); pass "
                              "optimizer=None to record 0 optimizer-state bytes") from err
        out[layer_id] = sum(_var_bytes(v) for v in fresh.variables if len(v.shape) > 0)
    return out


def _update_times(optimizer: keras.optimizers.Optimizer, owned: dict[str, list],
                  sync: Callable[[], None], warmup: int, repeats: int) -> dict[str, float]:
    """Per layer, the median time of one `apply_gradients` (compiled, as `model.fit` runs it)
    of a fresh copy of `optimizer` over copies of the layer's variables, zero gradients."""
    out: dict[str, float] = {}
    for layer_id, variables in owned.items():
        if not variables:
            continue
        try:
            fresh = type(optimizer).from_config(optimizer.get_config())
            copies = [keras.Variable(v.numpy(), dtype=v.dtype, trainable=True)
                      for v in variables]
            zeros = [tf.zeros(c.shape, dtype=c.dtype) for c in copies]
            fresh.build(copies)
            apply = tf.function(lambda: fresh.apply_gradients(zip(zeros, copies)))
            out[layer_id] = median_seconds(apply, sync, warmup=warmup, repeats=repeats)
        except Exception as err:
            raise ConfigError(f"timing an update of the {type(optimizer).__name__} over layer "
                              f"{layer_id!r}'s variables failed ({first_line(err)}); pass "
                              "optimizer=None to record no update time") from err
    return out


def _whole_model_s(model: keras.Model, x: Any, loss_fn: Callable | None,
                   sync: Callable[[], None], warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of a compiled forward with the loss, and of a compiled forward, loss and
    gradient minus it (variables are restored by the caller)."""
    fn = loss_fn if loss_fn is not None else _sum_loss
    variables = model.trainable_variables

    def loss_of() -> Any:
        flat = tf.nest.flatten(model(x, training=True))
        return fn(flat[0] if len(flat) == 1 else flat)

    @tf.function
    def forward() -> Any:
        return loss_of()

    @tf.function
    def forward_backward() -> Any:
        with tf.GradientTape() as tape:
            loss = loss_of()
        return tape.gradient(loss, variables) if variables else loss

    try:                                   # the first run of each traces: never timed
        f = median_seconds(forward, sync, warmup=warmup, repeats=repeats)
        both = median_seconds(forward_backward, sync, warmup=warmup, repeats=repeats)
    except Exception as err:
        raise ConfigError(f"timing whole training passes of the model compiled with tf.function "
                          f"failed ({first_line(err)}); make loss_fn traceable (TensorFlow ops "
                          "only), or pass calibrate=False to keep the per-layer times") from err
    return f, both - f


def _layer_step(layer: _Layer, sync: Callable[[], None]) -> Callable[[str], tuple[float, float]]:
    leaves = [x for x, g in zip(layer.inputs, layer.grad) if g]
    weights = [v.value for v in layer.variables]

    def step(mode: str) -> tuple[float, float]:
        targets = {"full": leaves + weights, "input": leaves, "weight": weights}[mode]
        sync()
        t0 = time.perf_counter()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for t in targets:
                tape.watch(t)
            outs = layer.run(layer.inputs)
        sync()
        t1 = time.perf_counter()
        heads = [t for t in outs if _floating(t)]
        if not heads or not targets:
            return t1 - t0, 0.0
        grads = [tf.ones_like(t) for t in heads]
        sync()
        t2 = time.perf_counter()
        tape.gradient(heads, targets, output_gradients=grads)
        sync()
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    return step


def _sum_loss(output: Any) -> Any:
    parts = [tf.reduce_sum(t) for t in _flat_tensors(output) if _floating(t)]
    if not parts:
        raise ConfigError("the model's output holds no floating-point tensor to sum as the "
                          "default loss; pass loss_fn(output) -> scalar")
    return tf.add_n(parts)


def _time_loss(loss_fn: Callable | None, output: list, sync: Callable[[], None], warmup: int,
               repeats: int) -> dict:
    fn = loss_fn if loss_fn is not None else _sum_loss
    label = "sum of outputs" if loss_fn is None else getattr(loss_fn, "__name__", "loss_fn")
    arg = output[0] if len(output) == 1 else list(output)
    leaves = [t for t in output if _floating(t)]

    def step(_mode: str) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for t in leaves:
                tape.watch(t)
            loss = fn(arg)
        sync()
        t1 = time.perf_counter()
        size = getattr(getattr(loss, "shape", None), "num_elements", lambda: None)()
        if size != 1:
            got = (f"a tensor of shape {loss.shape.as_list()}" if size is not None
                   else type(loss).__name__)
            raise ConfigError(f"loss_fn returned {got}; it must return a scalar tensor "
                              "(reduce with keras.ops.mean or sum)")
        if not leaves:
            return t1 - t0, 0.0
        sync()
        t2 = time.perf_counter()
        tape.gradient(loss, leaves)
        sync()
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    return time_loss(step, label, "scalar, taking the model's output (a list for several outputs) as its one argument",
                     warmup=warmup, repeats=repeats)
