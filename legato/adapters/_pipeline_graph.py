"""Framework-free parts of the pipeline profilers: grouping a traced op graph into layer nodes,
the timing loop, and turning measurements into `LayerNode`s.

The torch, TensorFlow and MXNet profilers (`legato.adapters.<framework>.pipeline_profile`)
each trace or walk their model, describe it here as `Op`s, run framework code for the
measurements, and assemble the `LayerProfile` with `layer_node`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Hashable, Iterable, Sequence

from legato.core.errors import ConfigError
from legato.core.pipeline.profile import LayerNode

__all__ = ["BACKWARD_MODES", "Group", "Op", "check_counts", "first_line", "group_ops",
           "layer_node", "time_layer"]

# "full": gradients for the layer's inputs and weights in one pass (what plain training runs);
# "input": input gradients only (B in zero-bubble schedules); "weight": weight gradients only (W).
BACKWARD_MODES = ("full", "input", "weight")


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a traced model graph, in a topological order.

    Args:
        key: identifies the op (an FX node, a Keras node).
        name: the node id it gets if it becomes a node of its own.
        is_layer: a module or layer call (`call_module`, a Keras `Layer`): always its own node.
        has_params: the op reads trainable parameters directly: always its own node.
        inputs: keys of the ops whose values it reads (model inputs and constants left out).
        reads_model_input: it reads a model input directly.
        yields_tensor: its value holds at least one tensor (not only ints or shapes).
    """

    key: Hashable
    name: str
    is_layer: bool
    has_params: bool = False
    inputs: tuple[Hashable, ...] = ()
    reads_model_input: bool = False
    yields_tensor: bool = True


@dataclasses.dataclass
class Group:
    """A node of the profile: a head op and the parameter-free ops folded into it."""

    id: str
    members: list[Hashable]
    outputs: list[Hashable] = dataclasses.field(default_factory=list)
    produces_model_output: bool = False


# [Note: folding parameter-free ops]
# Modules/layers are nodes. A parameter-free function or method call (relu, flatten, view,
# getitem, size, a Keras op) is folded into the node that produced its input when exactly one
# node did and it reads no model input: it then runs, and is timed, as part of that node, and
# whatever of it leaves the node counts in that node's activation outputs. A call that reads
# the values of two or more nodes (add, cat, mul of two activations), or of a node and a model
# input, is a merge point and becomes its own node: that is where a skip connection rejoins the
# main path, so the branch shows in the DAG as two edges into the merge node. A call that reads
# only model inputs and yields a tensor is its own node too (it runs before any layer); one that
# reads nothing computed (a constant) or yields no tensor and has no single producer (a shape
# read off an input) belongs to no node: its value is a constant for the nodes that use it.
# Model inputs are not nodes (in every framework's profiler); the nodes that read them are the
# sources of the DAG, and `meta["inputs"]` lists each input's bytes and readers.


def group_ops(ops: Sequence[Op], model_outputs: Iterable[Hashable]
              ) -> tuple[list[Group], list[tuple[str, str]], dict[Hashable, str | None]]:
    """Group `ops` (topologically ordered) into layer nodes ([Note: folding parameter-free ops]).

    Returns:
        The groups in order, the edges between them (each once, in first-seen order), and the
        group id of every op (None for ops that belong to no node).
    """
    group_of: dict[Hashable, str | None] = {}
    groups: dict[str, Group] = {}
    used: set[str] = set()

    def new_group(op: Op) -> None:
        gid, k = op.name, 1
        while gid in used:
            k += 1
            gid = f"{op.name}#{k}"
        used.add(gid)
        groups[gid] = Group(gid, [op.key])
        group_of[op.key] = gid

    for op in ops:
        if op.key in group_of:
            raise ConfigError(f"op {op.name!r} appears twice in the traced graph")
        producers = {group_of.get(k) for k in op.inputs} - {None}
        if op.is_layer or op.has_params:
            new_group(op)
        elif len(producers) == 1 and (not op.reads_model_input or not op.yields_tensor):
            gid = producers.pop()
            groups[gid].members.append(op.key)
            group_of[op.key] = gid
        elif op.yields_tensor and (producers or op.reads_model_input):
            new_group(op)
        else:
            group_of[op.key] = None

    consumed_outside: set[Hashable] = set()
    edges: list[tuple[str, str]] = []
    seen_edges: set[tuple[str, str]] = set()
    for op in ops:
        gid = group_of[op.key]
        for k in op.inputs:
            src = group_of.get(k)
            if src == gid:
                continue
            consumed_outside.add(k)
            if gid is not None and src is not None and (src, gid) not in seen_edges:
                seen_edges.add((src, gid))
                edges.append((src, gid))
    outputs = set(model_outputs)
    for group in groups.values():
        group.outputs = [k for k in group.members if k in consumed_outside or k in outputs]
        group.produces_model_output = any(k in outputs for k in group.members)
    return list(groups.values()), edges, group_of


def time_layer(step: Callable[[str], tuple[float, float]], modes: Sequence[str], *,
               warmup: int, repeats: int) -> tuple[float, dict[str, float]]:
    """Run `step(mode)` (one forward and one backward of that mode, returning their seconds)
    `warmup` times untimed, then `repeats` times per mode.

    Returns:
        The median forward time over every timed step, and the median backward time per mode.
    """
    forward: list[float] = []
    backward: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(warmup + repeats):
        for mode in modes:
            f, b = step(mode)
            if i >= warmup:
                forward.append(f)
                backward[mode].append(b)
    return statistics.median(forward), {m: statistics.median(v) for m, v in backward.items()}



def time_loss(step: Callable[[str], tuple[float, float]], label: str, expects: str, *,
              warmup: int, repeats: int) -> dict:
    """Time the loss on the model's output like a layer; a failing loss_fn becomes a
    ConfigError saying what it must return (`expects`)."""
    try:
        fwd, bwd = time_layer(step, ("full",), warmup=warmup, repeats=repeats)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"loss_fn(output) failed: {first_line(err)}; pass loss_fn(output) "
                          f"-> {expects}") from err
    return {"loss": label, "loss_forward_s": fwd, "loss_backward_s": bwd["full"]}

def median_seconds(run: Callable[[], Any], sync: Callable[[], None], *, warmup: int,
                   repeats: int) -> float:
    """Median wall time of `run()` over `repeats` timed calls after max(1, `warmup`) untimed
    ones (the first call may trace or build), with `sync()` (device synchronization) around
    each."""
    times = []
    for r in range(max(1, warmup) + repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        if r >= max(1, warmup):
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate_times(forward: list[float], backward: list[dict[str, float]],
              measured: tuple[float, float], how: str) -> tuple[list[float], list[dict], dict]:
    """Scale per-layer times so they add up to whole passes of the model.

    [Note: calibration] A layer timed alone on its own input runs with its weights and input
    hot in cache and without the bookkeeping of a whole graph (autograd's, or a compiled
    step's fusion); the per-layer sums differ from real passes of the same model (15-25% below
    on a 2-core CPU for PyTorch). The per-layer times keep the shares, whole passes give the
    totals: every forward time is scaled by measured forward / sum of forwards, every backward
    time (each mode) by measured backward / sum of full backwards. A total that is not
    positive leaves its times unscaled.

    Args:
        forward: each layer's forward seconds (the loss included where it was added).
        backward: each layer's backward seconds per mode (BACKWARD_MODES, or "full" only).
        measured: (forward, backward) seconds of a whole pass, as the adapter ran it.
        how: how the adapter ran the whole passes (kept in the profile's meta).
    Returns:
        (scaled forwards, scaled backwards, meta["calibration"]).
    """
    fwd_sum = sum(forward)
    bwd_sum = sum(b["full"] for b in backward)
    f_scale = measured[0] / fwd_sum if fwd_sum > 0 and measured[0] > 0 else 1.0
    b_scale = measured[1] / bwd_sum if bwd_sum > 0 and measured[1] > 0 else 1.0
    meta = {"forward_scale": f_scale, "backward_scale": b_scale,
            "forward_measured_s": measured[0], "backward_measured_s": measured[1], "how": how}
    return ([f * f_scale for f in forward],
            [{m: t * b_scale for m, t in b.items()} for b in backward], meta)


def layer_node(node_id: str, desc: str, forward_s: float, backward_s: dict[str, float],
               activation_outputs: Sequence[int], parameter_bytes: int,
               optimizer_state_bytes: int, *, split_backward: bool) -> LayerNode:
    """A `LayerNode` from measured times (`backward_s` keyed by BACKWARD_MODES) and sizes."""
    outputs = tuple(int(b) for b in activation_outputs)
    return LayerNode(
        id=node_id, desc=desc, forward_s=max(forward_s, 0.0),
        backward_s=max(backward_s["full"], 0.0),
        backward_input_s=max(backward_s["input"], 0.0) if split_backward else None,
        backward_weight_s=max(backward_s["weight"], 0.0) if split_backward else None,
        activation_bytes=sum(outputs), activation_outputs=outputs,
        parameter_bytes=int(parameter_bytes), optimizer_state_bytes=int(optimizer_state_bytes))


def check_counts(warmup: int, repeats: int) -> None:
    """Reject warmup < 0 or repeats < 1, naming the values."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup={warmup!r} is invalid; pass an int >= 0 (default 2)")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats={repeats!r} is invalid; pass an int >= 1 (default 5)")


def first_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut at `limit` characters, for wrapped errors."""
    text = str(err).strip().splitlines()
    msg = text[0] if text else ""
    if len(msg) > limit:
        msg = msg[:limit] + "..."
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__
