"""Dependency proxies for torch: a module's next forward waits until its own update is done.

Each module that holds parameters gets a forward pre-hook. `hold_all()` (at `opt.step()`)
closes every gate; the updater opens a layer's gate once that layer's parameters are updated,
and a module passes once all the layers whose parameters it uses are open. So step N+1's
forward starts on the first layers while the last layers' gradients are still on the wire:
ByteScheduler's "crossing the global barrier".
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from legato.core.errors import LegatoError

__all__ = ["LayerGates"]

log = logging.getLogger(__name__)


class LayerGates:
    """One gate per layer; forward pre-hooks wait on the gates of the layers a module uses.

    Args:
        modules: (module, layers it depends on) pairs.
        num_layers: how many gates.
        timeout_s: how long a forward may wait before failing with a clear error.
        check_error: called while waiting; raises if communication has failed.
        rank: for messages.
    """

    def __init__(self, modules: list[tuple[str, torch.nn.Module, tuple[int, ...]]],
                 num_layers: int, *, timeout_s: float, check_error: Callable[[], None],
                 rank: int) -> None:
        self._cv = threading.Condition()
        self._open = [True] * num_layers
        self._step = 0
        self._timeout_s = timeout_s
        self._check_error = check_error
        self._rank = rank
        self._handles = [
            module.register_forward_pre_hook(self._hook(name, layers))
            for name, module, layers in modules
        ]

    def _hook(self, name: str, layers: tuple[int, ...]):
        def wait_for_update(module, args):
            if all(self._open[i] for i in layers):  # fast path, no lock
                return None
            self.wait(layers, name)
            return None
        return wait_for_update

    def wait(self, layers: tuple[int, ...], name: str) -> None:
        deadline = time.monotonic() + self._timeout_s
        with self._cv:
            while not all(self._open[i] for i in layers):
                self._check_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LegatoError(
                        f"[rank {self._rank}] step {self._step}: the forward of {name!r} waited "
                        f"{self._timeout_s:g} s for its parameters' update; a peer rank may be "
                        "dead or stuck (see its log)")
                self._cv.wait(min(left, 0.5))
        self._check_error()

    def hold_all(self, step: int) -> None:
        with self._cv:
            self._step = step
            self._open = [False] * len(self._open)

    def release(self, layer: int) -> None:
        with self._cv:
            self._open[layer] = True
            self._cv.notify_all()

    def release_all(self) -> None:
        with self._cv:
            self._open = [True] * len(self._open)
            self._cv.notify_all()

    def wake(self) -> None:
        """Wake waiters so they re-check for errors."""
        with self._cv:
            self._cv.notify_all()

    def all_open(self) -> bool:
        return all(self._open)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
