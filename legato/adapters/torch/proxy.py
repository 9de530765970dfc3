"""Dependency proxies for torch: a module's next forward waits until its own update is done.

`hold_all()` (at `opt.step()`) closes every layer's gate; the updater opens a layer's gate once
that layer's parameters are updated, and a module's forward pre-hook lets it pass once the
layers it depends on are open. So step N+1's forward starts on the first layers while the last
layers' gradients are still on the wire: ByteScheduler's "crossing the global barrier".

[Note: modules that never run] Some modules hold parameters that their parent uses directly:
`nn.MultiheadAttention` reads `out_proj.weight` without calling `out_proj`, so a pre-hook on
`out_proj` never fires, and the parameter could be updated in place while the next step still
needs it for backward. So the first forward is observed: every module whose forward did not
run hands its layers to the nearest ancestor whose forward did. Until that first step is
taken, and for any forward in eval mode or without gradients (where fused paths may read any
parameter), the whole model waits for every update.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from legato.core.scheduler.gates import Gates, hand_to_ran_ancestors

__all__ = ["LayerGates"]

log = logging.getLogger(__name__)


class LayerGates:
    """One gate per layer; modules wait on the gates of the layers whose parameters they use.

    Args:
        model: the root module.
        direct_layers: module name -> layers of the parameters it holds directly.
        num_layers: how many gates.
        timeout_s: how long a forward may wait before failing with a clear error.
        check_error: called while waiting; raises if communication has failed.
        rank: for messages.
    """

    def __init__(self, model: torch.nn.Module, direct_layers: dict[str, tuple[int, ...]],
                 num_layers: int, *, timeout_s: float, check_error: Callable[[], None],
                 rank: int) -> None:
        self._gates = Gates(num_layers, timeout_s=timeout_s, check_error=check_error, rank=rank)
        self._all = tuple(range(num_layers))
        self._rank = rank
        self._direct = dict(direct_layers)
        self._ran: set[str] = set()
        self._observing = True
        self._waits: dict[str, tuple[int, ...]] = {}
        self._handles = {name: module.register_forward_pre_hook(self._hook(name))
                         for name, module in model.named_modules()}

    def _hook(self, name: str):
        root = name == ""

        def gate(module, args):
            if self._observing:
                self._ran.add(name)
                if root:
                    self._wait_all_open(self._all, "the model")
                return None
            if root and (not torch.is_grad_enabled() or not module.training):
                self._wait_all_open(self._all, "the model (eval or no_grad forward)")
                return None
            layers = self._waits.get(name)
            if layers:
                self._wait_all_open(layers, name)
            return None
        return gate

    def finish_observing(self) -> None:
        """After the first forward: give each module that did not run to its nearest ancestor
        that did (see [Note: modules that never run])."""
        if not self._observing:
            return
        self._waits = hand_to_ran_ancestors(self._direct, self._ran, rank=self._rank,
                                            kind="modules", sync_call="opt.synchronize()")
        self._observing = False
        # Every forward runs these hooks: keep only those that gate something (and the root's,
        # which gates eval and no_grad forwards).
        for name in [n for n in self._handles if n and n not in self._waits]:
            self._handles.pop(name).remove()

    def _wait_all_open(self, layers: tuple[int, ...], name: str) -> None:
        self._gates.wait(layers, name)

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
        """Wake waiters so they re-check for errors."""
        self._gates.wake()

    def waits(self) -> dict[str, tuple[int, ...]]:
        """Module name -> layers its forward waits for (after the first step)."""
        return dict(self._waits)

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
