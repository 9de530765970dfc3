"""Layer gates: the dependency proxies' shared mechanics, for every adapter.

One gate per layer. At a step's `hold_all`, every gate closes; the updater opens a layer's gate
once that layer's parameters are updated; a forward waits until the gates of the layers it
reads are open. How a forward is intercepted (a module's pre-hook, a Keras layer's `call`, a
gluon block's pre-hook) is the adapter's business; this is only the waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from legato.core._wait import wait_for
from legato.core.errors import LegatoError

__all__ = ["Gates", "hand_to_ran_ancestors"]

log = logging.getLogger(__name__)


class Gates:
    """Open/closed flags per layer, waited on with a deadline and an error check.

    Args:
        num_layers: how many gates.
        timeout_s: how long a forward may wait before failing with a clear error.
        check_error: called while waiting; raises if communication has failed.
        rank: for messages.
    """

    def __init__(self, num_layers: int, *, timeout_s: float, check_error: Callable[[], None],
                 rank: int) -> None:
        self._cv = threading.Condition()
        self._open = [True] * num_layers
        self.step = 0
        self.timeout_s = timeout_s
        self._check_error = check_error
        self.rank = rank
        # (name, start, end) of each wait that blocked, perf_counter seconds: a trace's `wait`
        # lane (SchedulerTrace.gate_waited); None when no trace is recorded
        self.on_wait: Callable[[str, float, float], None] | None = None

    def __len__(self) -> int:
        return len(self._open)

    def is_open(self, layers: Sequence[int]) -> bool:
        return all(self._open[i] for i in layers)

    def wait(self, layers: Sequence[int], name: str, late: Callable[[], BaseException] | None
             = None) -> None:
        """Block until every gate in `layers` is open; `name` (what waits) is for the error."""
        if self.is_open(layers):  # fast path, no lock
            return
        late = late or (lambda: LegatoError(
            f"[rank {self.rank}] step {self.step}: the forward of {name!r} waited "
            f"{self.timeout_s:g} s for its parameters' update; a peer rank may be dead or stuck "
            "(see its log)"))
        started = time.perf_counter()
        with self._cv:
            wait_for(self._cv, lambda: self.is_open(layers), self.timeout_s, self._check_error,
                     late)
        if self.on_wait is not None:
            self.on_wait(name, started, time.perf_counter())
        self._check_error()

    def closed(self, layers: Sequence[int]) -> list[int]:
        return [i for i in layers if not self._open[i]]

    def hold_all(self, step: int) -> None:
        with self._cv:
            self.step = step
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
        """Wake waiters so that they re-check for errors."""
        with self._cv:
            self._cv.notify_all()


def hand_to_ran_ancestors(direct: dict[str, Sequence[int]], ran: set[str], *, rank: int,
                          kind: str, sync_call: str) -> dict[str, tuple[int, ...]]:
    """After the first forward: each part (a dotted path, "" the model) whose forward did not
    run hands its layers to the nearest ancestor whose forward did.

    Args:
        direct: path -> layers of the parameters it holds directly.
        ran: paths whose forward ran in the first step.
        kind: "modules" or "blocks", for the warning; sync_call: what the user calls instead.
    Returns:
        path -> the layers its forward waits for.
    """
    waits: dict[str, set[int]] = {}
    for path, layers in direct.items():
        owner = path
        while owner not in ran and owner != "":
            owner = owner.rpartition(".")[0]
        if owner != path:
            log.debug("[rank %d] %r never runs its forward; %r waits for its update", rank,
                      path, owner or "the model")
        waits.setdefault(owner, set()).update(layers)
    if "" in waits and "" not in ran:
        log.warning("[rank %d] the model's own forward was not called, so parameters read "
                    "outside their %s' forwards cannot be gated; call model(...) or %s before "
                    "each forward", rank, kind, sync_call)
    return {path: tuple(sorted(ls)) for path, ls in waits.items()}
