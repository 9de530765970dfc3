"""The step bookkeeping every scheduled optimizer shares (PyTorch, TensorFlow, MXNet adapters).

An adapter's optimizer wrapper is called once per training step (`opt.step()`,
`apply_gradients`, `trainer.step`) and updates each layer later, when that layer's gradients
are reduced. `StepTracker` counts both sides: steps called, and per layer the updates done
(or skipped), a step being done when every layer's update is; it keeps per-step information
that the updates of that step need (a mixed-precision step's unscale factor and skip
decision), drops the updates of gradients that were cleared before their step
(`void_round`), counts the steps and updates skipped under mixed precision, records the
first failure of any thread, and lets the training thread wait (`synchronize`) with errors
that name the rank and the step. `close_scheduled` is the
shut-down order all three adapters follow. Framework-free: the adapters bring the gradients,
the optimizer steps and the gates.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

from legato.core._wait import wait_for
from legato.core.errors import LegatoError

__all__ = ["ClosesOnExit", "LayerUpdater", "StepTracker", "close_scheduled"]

log = logging.getLogger(__name__)


class StepTracker:
    """Steps called and done, per-layer updates, per-step information, failure.

    Args:
        layer_names: one name per layer, for messages.
        rank: for messages.
        timeout_s: the default limit of every wait.
        on_fail: called (any thread) after the first failure is recorded: wake the gates.
        suspect: what a wait that timed out suggests ("a peer may be dead").
    """

    def __init__(self, layer_names: Sequence[str], *, rank: int, timeout_s: float,
                 on_fail: Callable[[], None] | None = None,
                 suspect: str = "a peer may be dead") -> None:
        self.layer_names = list(layer_names)
        self.rank = rank
        self.timeout_s = timeout_s
        self.cv = threading.Condition()
        self.steps_called = 0
        self.steps_updated = 0           # steps whose every layer was updated (or skipped)
        self.layers_updated_in_step = 0
        self.updates_done = [0] * len(self.layer_names)  # per layer: steps updated
        self.error: BaseException | None = None
        self.closed = False
        self._on_fail = on_fail
        self._suspect = suspect
        self._info: dict[int, Any] = {}
        self.round = 0                   # which hand-over of gradients queued updates are for
        self._voided: set[int] = set()
        self.steps_skipped = 0           # steps every rank skipped (mixed precision overflow)
        self.updates_skipped = 0         # layer updates skipped on non-finite reduced values

    # -- the training thread ---------------------------------------------------------------
    def call_step(self, info: Any = None) -> int:
        """A step was called; `info` is kept for its updates (`info(step)`). Returns its index."""
        with self.cv:
            step = self.steps_called
            if info is not None:
                self._info[step] = info
            self.steps_called += 1
            self.cv.notify_all()
            return step

    def info(self, step: int, default: Any = None) -> Any:
        with self.cv:
            return self._info.get(step, default)

    def skipped(self, step: int) -> None:
        """`step` is skipped on every rank (a rank's gradients were not finite: the ranks'
        shared mixed-precision decision); its updates run as no-ops."""
        with self.cv:
            self.steps_skipped += 1
        log.info("[rank %d] step %d: gradients not finite on some rank; the update is "
                 "skipped", self.rank, step)

    def update_skipped(self, step: int, what: str) -> None:
        """The reduced gradients of `what` in `step` are not finite though no rank's own were
        (a sum of finite values overflowed): every rank holds the same values and skips that
        update alike (a data-parallel job would have skipped the whole step)."""
        with self.cv:
            self.updates_skipped += 1
        log.warning("[rank %d] step %d: the reduced gradients of %s are not finite though no "
                    "rank's own were; its update is skipped", self.rank, step, what)

    def void_round(self) -> None:
        """The gradients handed over since the last step were cleared: the layer updates
        queued for them (with the current `round`) are skipped (`may_update` says so)."""
        with self.cv:
            self._voided.add(self.round)
            self.round += 1
            self.cv.notify_all()

    # -- the updating threads --------------------------------------------------------------
    def may_update(self, layer: int, round_: int) -> bool:
        """Wait until `layer`'s update of its next step may run (that step was called): True;
        False when its gradients were cleared, the tracker closed first, or anything failed."""
        with self.cv:
            while (self.steps_called <= self.updates_done[layer] and not self.closed
                   and self.error is None and round_ not in self._voided):
                self.cv.wait(0.5)
            return (round_ not in self._voided and self.error is None
                    and self.steps_called > self.updates_done[layer])

    def layers_done(self, layers: Sequence[int]) -> None:
        """These layers' updates of their next step are done (or skipped)."""
        with self.cv:
            for layer in layers:
                self.updates_done[layer] += 1
                self.layers_updated_in_step += 1
                if self.layers_updated_in_step == len(self.layer_names):
                    self.layers_updated_in_step = 0
                    self._info.pop(self.steps_updated, None)
                    self.steps_updated += 1
            self.cv.notify_all()

    def step_done(self) -> None:
        """Every layer of the next step at once (a pass-through optimizer step)."""
        self.layers_done(range(len(self.layer_names)))

    # -- failure and waiting ---------------------------------------------------------------
    def fail(self, err: BaseException) -> None:
        """Keep the first failure (logged); waits raise it from now on."""
        with self.cv:
            first = self.error is None
            if first:
                self.error = err
                log.error("%s", err)
            self.cv.notify_all()
        if self._on_fail is not None:
            self._on_fail()

    def raise_if_failed(self, *others: BaseException | None) -> None:
        err = self.error or next((e for e in others if e is not None), None)
        if err is not None:
            raise err

    def wait_updated(self, steps: int | None = None, timeout_s: float | None = None,
                     what: str = "synchronize", check: Callable[[], None] | None = None) -> None:
        """Wait until `steps` steps (default: all called) are done, or raise the failure or a
        LegatoError naming the step and how many layers are in."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        target = self.steps_called if steps is None else steps
        check = check or self.raise_if_failed
        with self.cv:
            wait_for(self.cv, lambda: self.steps_updated >= target, timeout, check,
                     lambda: LegatoError(
                         f"[rank {self.rank}] {what}: step {self.steps_updated} not done after "
                         f"{timeout:g} s ({self.layers_updated_in_step} of "
                         f"{len(self.layer_names)} layers updated); {self._suspect}"),
                     poll_s=1.0)
        check()

    def stats(self, plan, config, issued: int) -> dict[str, Any]:
        """What every adapter's `stats()` reports: steps called, done and skipped, the plan's
        messages and bytes per step, layers, messages issued and the policy in force."""
        return {"steps": self.steps_called, "steps_done": self.steps_updated,
                "steps_skipped": self.steps_skipped, "messages_per_step": len(plan.chunks),
                "bytes_per_step": plan.total_bytes, "layers": len(self.layer_names),
                "issued": issued, "config": config.describe()}

    def mark_closed(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()


def close_scheduled(tracker: StepTracker, scheduler, *, timeout_s: float, rank: int,
                    wait: Callable[[float], None], steps: Sequence[Callable[[], None]],
                    trace=None, all_gather: Callable[[list], list] | None = None,
                    lead: bool = False,
                    release: Callable[[bool], None] | None = None) -> bool:
    """Shut a scheduled optimizer down in the order every adapter needs: wait for its work
    (`wait(timeout)`, skipped after a failure), mark the tracker closed, close the scheduler
    (the leader drains its queue and tells the followers), then run every clean-up step in
    `steps`, each whatever the earlier ones raised; then finish the `trace` (a
    legato.core.timeline.SchedulerTrace: gathered with `all_gather` and written on the `lead`
    rank after a clean end) and `release(healthy)` the transport, both whatever happened
    before. Returns whether everything finished cleanly."""
    healthy = False
    try:
        try:
            if tracker.error is None and scheduler.error is None:
                wait(timeout_s)
                healthy = True
        finally:
            tracker.mark_closed()
            try:
                # after a failure, messages in flight may never complete (a peer stopped too)
                scheduler.close(timeout_s=min(timeout_s, 60.0), abort=tracker.error is not None)
            except Exception as err:  # noqa: BLE001 (closing: log and go on)
                log.warning("[rank %d] closing the scheduler: %s", rank, err)
            healthy = healthy and scheduler.error is None
            errors = []
            for step in steps:
                try:
                    step()
                except Exception as err:  # noqa: BLE001 (every step runs; the first is raised)
                    errors.append(err)
            if errors:
                raise errors[0]
    finally:
        try:
            if trace is not None:
                trace.finish(healthy, all_gather, lead)
        finally:
            if release is not None:
                release(healthy)
    return healthy


class LayerUpdater:
    """A thread that runs each layer's update once the step it belongs to was called (the
    PyTorch and TensorFlow adapters; MXNet's engine orders its updates itself).

    `put(layer)` queues the layer whose gradients are all reduced; the thread waits for
    `tracker.may_update`, then calls `run(layer, step)`. A LegatoError from `run` fails the
    tracker as it is; anything else as "updating layer NAME failed". `run` reports the layer
    done (`tracker.layers_done`) itself, after its framework's work.
    """

    def __init__(self, tracker: StepTracker, run: Callable[[int, int], None], *,
                 name: str) -> None:
        import queue

        self._tracker = tracker
        self._run = run
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, layer: int) -> None:
        self._queue.put((layer, self._tracker.round))

    def _loop(self) -> None:
        tracker = self._tracker
        while True:
            item = self._queue.get()
            if item is None:
                return
            layer, round_ = item
            if not tracker.may_update(layer, round_):
                continue
            try:
                self._run(layer, tracker.updates_done[layer])
            except LegatoError as err:
                tracker.fail(err)
            except BaseException as err:  # noqa: BLE001 (raised in the training thread)
                tracker.fail(LegatoError(
                    f"[rank {tracker.rank}] updating layer {tracker.layer_names[layer]!r} "
                    f"failed: {type(err).__name__}: {err}"))

    def stop(self, timeout_s: float) -> None:
        self._queue.put(None)
        self._thread.join(min(timeout_s, 60.0))


class ClosesOnExit:
    """`with wrapper:` closes it at the end, and so does the interpreter's exit once
    `_close_at_exit()` was called (the scheduled optimizers of every adapter)."""

    def close(self, timeout_s: float | None = None) -> None:  # pragma: no cover (overridden)
        raise NotImplementedError

    def _close_at_exit(self) -> None:
        """Close at interpreter exit unless closed before (holds no reference to self)."""
        import atexit
        import weakref

        ref = weakref.ref(self)
        self._atexit = lambda: ref() is not None and ref().close()  # noqa: E731
        atexit.register(self._atexit)

    def _forget_exit(self) -> None:
        import atexit

        atexit.unregister(self._atexit)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
