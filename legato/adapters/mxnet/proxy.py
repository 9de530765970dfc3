"""Dependency proxies for gluon: a block's next forward waits until its own parameters' update
has been issued.

`hold_all()` (at `trainer.step()`) closes every layer's gate; the trainer opens a layer's gate
once that layer's update has been *issued* to MXNet's engine (when its last message has been
started, optimizer.py [Note: issue at start]), and a block's forward pre-hook lets it pass once
the layers it reads are open. Issued is enough: the engine runs the forward's reads of a weight
after every write of that weight pushed before them (the update, which itself runs after the
pulls), so the forward computes with the updated weight while the Python thread has already
moved on. So step N+1's forward starts on the front layers while the back layers' gradients
are still waiting for the wire: ByteScheduler's "crossing the global barrier". The gates and
their waiting are the core's `Gates` (legato.core.scheduler.gates); this module decides which
block waits for which layers.

Which blocks wait for which layers:
- a block waits for the layers of the parameters it holds (`block.params`, shared ones too);
- [Note: blocks that never run] a block whose forward did not run in the first training step
  (its parent reads its parameters directly) hands its layers to the nearest ancestor whose
  forward did, as the torch adapter does; calls made while a HybridBlock traces its graph (with
  Symbols) do not count as runs;
- a hybridized (active) HybridBlock runs its whole subtree as one cached graph and its
  children's hooks do not fire, so its own hook waits for every layer below it (checked at each
  call, so hybridizing later stays correct);
- until the first step is taken, and for any forward outside `autograd.record()`, the whole
  model waits for every update.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import mxnet as mx
from mxnet import autograd, gluon

from legato.core.errors import LegatoError
from legato.core.scheduler.gates import Gates, hand_to_ran_ancestors

__all__ = ["BlockGates", "named_blocks"]

log = logging.getLogger(__name__)


def named_blocks(block: gluon.Block, prefix: str = "") -> Iterator[tuple[str, gluon.Block]]:
    """(path, block) for `block` and every block below it, in registration order; the root's
    path is "" and a child's is its parent's path, a dot, and its name ("0", "0.body.1")."""
    yield prefix, block
    for name, child in block._children.items():
        yield from named_blocks(child, f"{prefix}.{name}" if prefix else str(name))


def _symbolic(args) -> bool:
    for a in args:
        if isinstance(a, mx.sym.Symbol):
            return True
        if isinstance(a, (list, tuple)) and _symbolic(a):
            return True
    return False


class BlockGates:
    """One gate per layer; blocks wait on the gates of the layers whose parameters they read.

    Args:
        model: the root block.
        direct_layers: block path -> layers of the parameters it holds itself.
        num_layers: how many gates.
        timeout_s: how long a forward may wait before failing with a clear error.
        check_error: called while waiting; raises if communication or an update failed.
        rank: for messages.
        layer_names: for messages.
    """

    def __init__(self, model: gluon.Block, direct_layers: dict[str, tuple[int, ...]],
                 num_layers: int, *, timeout_s: float, check_error: Callable[[], None],
                 rank: int, layer_names: list[str]) -> None:
        self._gates = Gates(num_layers, timeout_s=timeout_s, check_error=check_error, rank=rank)
        self._all = tuple(range(num_layers))
        self._rank = rank
        self._layer_names = layer_names
        self._direct = dict(direct_layers)
        self._ran: set[str] = set()
        self._observing = True
        self._waits: dict[str, tuple[int, ...]] = {}
        blocks = list(named_blocks(model))
        # Everything below a block (itself included): what its cached graph reads when active.
        self._subtree: dict[str, tuple[int, ...]] = {}
        for path, _ in blocks:
            below: set[int] = set()
            for other, layers in self._direct.items():
                if path == "" or other == path or other.startswith(path + "."):
                    below.update(layers)
            self._subtree[path] = tuple(sorted(below))
        self._handles = {path: block.register_forward_pre_hook(self._hook(path, block))
                         for path, block in blocks}

    def _hook(self, path: str, block: gluon.Block):
        root = path == ""

        def gate(_block, args) -> None:
            if _symbolic(args):  # a HybridBlock tracing its graph: nothing is read
                return
            if self._observing:
                self._ran.add(path)
                if root:
                    self._wait_open(self._all, "the model")
                return
            if root and not autograd.is_recording():
                self._wait_open(self._all, "the model (a forward outside autograd.record)")
                return
            if getattr(block, "_active", False):  # hybridized: its cached graph reads all below
                layers = self._subtree[path]
            else:
                layers = self._waits.get(path)
            if layers:
                self._wait_open(layers, path or "the model")
        return gate

    def finish_observing(self) -> None:
        """After the first forward: give each block that did not run to its nearest ancestor
        that did (see [Note: blocks that never run])."""
        if not self._observing:
            return
        self._waits = hand_to_ran_ancestors(self._direct, self._ran, rank=self._rank,
                                            kind="blocks", sync_call="trainer.synchronize()")
        self._observing = False

    def _wait_open(self, layers: tuple[int, ...], name: str) -> None:
        gates = self._gates

        def late() -> LegatoError:
            closed = [self._layer_names[i] for i in gates.closed(layers)]
            return LegatoError(
                f"[rank {self._rank}] step {gates.step}: the forward of {name!r} waited "
                f"{gates.timeout_s:g} s for the update of layer(s) {', '.join(closed[:5])}; a "
                "server or peer worker may be dead or stuck (see its log)")

        gates.wait(layers, name, late)

    def record_waits(self, on_wait) -> None:
        """Tell `on_wait(name, start, end)` of every forward blocked at a gate (a trace)."""
        self._gates.on_wait = on_wait

    def hold_all(self, step: int) -> None:
        self._gates.hold_all(step)

    def release(self, layer: int) -> None:
        self._gates.release(layer)

    def release_all(self) -> None:
        self._gates.release_all()

    def wake(self) -> None:
        """Wake waiters so that they re-check for errors."""
        self._gates.wake()

    def waits(self) -> dict[str, tuple[int, ...]]:
        """Block path -> layers its forward waits for when not hybridized (after step 1)."""
        return dict(self._waits)

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.detach()
        self._handles.clear()
