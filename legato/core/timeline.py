"""A Chrome trace (opens in Perfetto or chrome://tracing) of what a rank did and when.

Spans are complete events ("ph": "X") on named lanes: compute (forward, backward per layer),
queue (a message from ready to start), comm (a message on the wire), update (a layer's
optimizer step). One process per rank (`pid` = rank), one thread row per lane.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from legato.core._files import atomic_json

__all__ = ["Timeline"]

LANES = {"compute": 0, "queue": 1, "comm": 2, "update": 3}


class Timeline:
    """Thread-safe recorder of spans; `write(path)` saves a Chrome trace atomically.

    Args:
        rank: shown as the process; also the default for `pid`.
        max_events: recording stops (and says so in the trace) past this many spans.
    """

    def __init__(self, rank: int = 0, max_events: int = 1_000_000) -> None:
        self.rank = rank
        self._events: list[dict] = []
        self._lock = threading.Lock()
        # Absolute monotonic time: processes on one machine share the clock, so traces of
        # several ranks line up when merged.
        self._origin = 0.0
        self._max = max_events
        self._open: dict[tuple[str, object], float] = {}
        self.dropped = 0

    def now(self) -> float:
        return time.perf_counter()

    def span(self, lane: str, name: str, start: float, end: float, **args) -> None:
        """Record [start, end] (perf_counter seconds) on `lane`."""
        event = {"name": name, "cat": lane, "ph": "X", "pid": self.rank,
                 "tid": LANES.get(lane, len(LANES)), "ts": (start - self._origin) * 1e6,
                 "dur": max(0.0, end - start) * 1e6}
        if args:
            event["args"] = args
        with self._lock:
            if len(self._events) >= self._max:
                self.dropped += 1
                return
            self._events.append(event)

    def begin(self, lane: str, key: object, when: float | None = None) -> None:
        with self._lock:
            self._open[(lane, key)] = self.now() if when is None else when

    def end(self, lane: str, key: object, name: str, when: float | None = None, **args) -> None:
        with self._lock:
            start = self._open.pop((lane, key), None)
        if start is not None:
            self.span(lane, name, start, self.now() if when is None else when, **args)

    def events(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def write(self, path: str | os.PathLike, others: list[list[dict]] = ()) -> Path:
        """Write the trace to `path` (via a temporary file and a rename: never half-written).

        `others` are other ranks' `events()`, merged into the same file.
        """
        path = Path(path)
        events = self.events()
        for more in others:
            events.extend(more)
        meta = []
        for pid in sorted({e["pid"] for e in events} | {self.rank}):
            meta.append({"name": "process_name", "ph": "M", "pid": pid,
                         "args": {"name": f"rank {pid}"}})
            meta += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                      "args": {"name": lane}} for lane, tid in LANES.items()]
        trace = {"traceEvents": meta + events, "displayTimeUnit": "ms",
                 "otherData": {"legato_dropped_events": self.dropped}}
        return atomic_json(path, trace, indent=None)
