"""Dependency proxies for Keras: a layer's next forward waits until its own update is done.

`hold_all()` (at `apply_gradients`) closes every layer's gate; legato's updater opens a layer's
gate once that layer's variables are updated, and the layer's `call` (replaced on the instance)
waits for its gate in eager mode. Under a tf.function the wait is an op in the graph
(`graph_gate`, see the optimizer's [Note: compiled steps]). As in the PyTorch adapter, the
first forward is observed: a layer whose variables its parent reads without calling it hands
its wait to the model's own `call`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import tensorflow as tf

from legato.core.scheduler.gates import Gates

__all__ = ["LayerGates", "owned_layers"]

log = logging.getLogger(__name__)


def owned_layers(model) -> list[tuple[Any, list]]:
    """Layers (depth first, in the order Keras tracks them) with the trainable variables each
    holds itself (not through sublayers)."""
    out, seen = [], set()

    def visit(layer) -> None:
        subs = list(layer._flatten_layers(include_self=False, recursive=False))
        inner = {id(v) for s in subs for v in s.trainable_variables}
        own = [v for v in layer.trainable_variables
               if id(v) not in inner and id(v) not in seen]
        if own:
            seen.update(id(v) for v in own)
            out.append((layer, own))
        for s in subs:
            visit(s)

    visit(model)
    return out


class LayerGates:
    """One gate per layer; a layer's `call` waits until its own variables are updated.

    Each gated layer's `call` is replaced, on the instance, by a wrapper that waits for the
    layer's gate in eager mode and is transparent while a tf.function traces it (then
    `traced` is set: the optimizer must finish each step's updates before returning).
    `remove()` restores the layers' own `call`.

    The first forward is observed, as in the PyTorch adapter's gates: a layer whose variables
    are read by a parent without calling the layer never runs its `call`, so from then on the
    model's own `call` waits for those layers; until then, and in inference (training not
    true), the model's `call` waits for every layer.
    """

    def __init__(self, model, layers: list, timeout_s: float, check_error, rank: int,
                 around=None, trace=None) -> None:
        self._around = around  # around(layer, call, args, kwargs): runs a gated layer's call
        self._trace = trace    # a SchedulerTrace: forward spans of eager calls
        self._gates = Gates(len(layers), timeout_s=timeout_s, check_error=check_error,
                            rank=rank)
        if trace is not None:
            self._gates.on_wait = trace.gate_waited
        self._all = tuple(range(len(layers)))
        # [Note: hooks off under plain] whether the gates and the optimizer's gradient posts
        # run: `on` for eager calls; `graph_on` for the ops of a compiled step, read when the
        # graph runs, so a traced step follows the setting without retracing (a graph traced
        # while they are off still gets the ops, for when they are on again)
        self.on = True
        self.graph_on = tf.Variable(True, trainable=False, name="legato_graph_hooks_on")
        self.traced = False
        self._observing = True
        self._ran: set[int] = set()
        self._root_waits: tuple[int, ...] = self._all
        self._patched: list = []
        root = None
        for index, layer in enumerate(layers):
            if layer is model:
                root = index
            self._patch(layer, index, layer.name)
        if root is None:
            self._patch(model, None, "the model")

    def _patch(self, layer, index: int | None, name: str) -> None:
        own = layer.call

        def gated(*args, **kwargs):
            graph = not tf.executing_eagerly()
            if not graph and not self.on:
                return own(*args, **kwargs)
            if graph and self._around is None:
                self.traced = True  # no gates in a graph without the optimizer's hooks
                return own(*args, **kwargs)
            if self._observing and index is not None:
                self._ran.add(index)
            waits: tuple[int, ...] = () if index is None else (index,)
            if index is None:  # the model's own call
                training = bool(kwargs.get("training"))
                if graph:  # see [Note: compiled steps]; what to wait for is decided per run
                    gate = self.graph_gate(
                        lambda: self._root_waits if training else self._all, name)
                    args = tf.nest.map_structure(
                        lambda t: _after(gate, t) if tf.is_tensor(t) else t, args)
                else:
                    waits = self._root_waits if training else self._all
                    if waits:
                        self.wait(waits, name)
                return own(*args, **kwargs)
            if not graph:
                self.wait(waits, name)
            started = time.perf_counter()
            out = (own(*args, **kwargs) if self._around is None else
                   self._around(index, own, args, kwargs, graph))
            if self._trace is not None and not graph:
                self._trace.span("compute", f"forward {name}", started)
            return out
        gated.__wrapped__ = own
        gated.__signature__ = _signature(own)
        had = "call" in layer.__dict__
        object.__setattr__(layer, "call", gated)
        self._patched.append((layer, own, had))

    def graph_gate(self, layers, name: str, before=None) -> tf.Tensor:
        """An op that waits (when the graph runs) until `layers` (a tuple, or a function giving
        one when the graph runs) are updated; `before()` runs first, on every run."""
        def run():
            if before is not None:
                before()
            waits = layers() if callable(layers) else layers
            if waits:
                self.wait(waits, name)
            return np.int32(0)
        return tf.cond(self.graph_on,
                       lambda: tf.py_function(run, [], tf.int32, name="legato_gate"),
                       lambda: tf.constant(0, tf.int32))

    def finish_observing(self) -> None:
        """After the first forward (see the class doc)."""
        if not self._observing:
            return
        self._observing = False
        self._root_waits = tuple(i for i in self._all if i not in self._ran)
        if self._root_waits:
            log.debug("[rank %d] layers %s never ran their call; the model's call waits for "
                      "their update", self._gates.rank, self._root_waits)

    def wait(self, layers: tuple[int, ...], name: str) -> None:
        self._gates.wait(layers, name)

    def hold_all(self, step: int) -> None:
        self.finish_observing()
        self._gates.hold_all(step)

    def release(self, layer: int) -> None:
        self._gates.release(layer)

    def release_all(self) -> None:
        self._gates.release_all()

    def remove(self) -> None:
        for layer, own, had in self._patched:
            if had:
                object.__setattr__(layer, "call", own)
            else:
                try:
                    object.__delattr__(layer, "call")
                except AttributeError:
                    pass
        self._patched = []


def _signature(fn):
    import inspect

    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _after(gate: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
    with tf.control_dependencies([gate]):
        return tf.identity(t)
