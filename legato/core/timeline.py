"""A Chrome trace (opens in Perfetto or chrome://tracing) of what a rank did and when.

Spans are complete events ("ph": "X") on named lanes: compute (forward, backward per layer),
queue (a message from ready to start), comm (a message on the wire), update (a layer's
optimizer step). One process per rank (`pid` = rank), one thread row per lane.

With `spill`, spans also go to that file as they are recorded (at least every second, in
Chrome's JSON array format, whose closing bracket may be missing), so a job that crashes
keeps its trace up to the crash: the file opens as it is in Perfetto or chrome://tracing.
"""

from __future__ import annotations

import json
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
        spill: a file that receives the spans as they are recorded (see above); created
            anew, never appended to an earlier run's.
        flush_every_s: the longest a span waits in memory before it is written to `spill`.
    """

    def __init__(self, rank: int = 0, max_events: int = 1_000_000,
                 spill: str | os.PathLike | None = None, flush_every_s: float = 1.0) -> None:
        self.rank = rank
        self.spill_path = Path(spill) if spill is not None else None
        self._spill = None
        self._pending: list[dict] = []
        self._flush_every_s = flush_every_s
        self._flushed_at = time.monotonic()
        if self.spill_path is not None:
            self._spill = open(self.spill_path, "w", encoding="utf-8")  # noqa: SIM115
            self._spill.write("[\n")
            for event in _metadata([rank]):
                self._spill.write(json.dumps(event) + ",\n")
            self._spill.flush()
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
            if self._spill is not None:
                self._pending.append(event)
                if (len(self._pending) >= 1024
                        or time.monotonic() - self._flushed_at >= self._flush_every_s):
                    self._flush_locked()

    def flush(self) -> None:
        """Write the spans recorded so far to the spill file."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._spill is None:
            return
        if self._pending:
            self._spill.write("".join(json.dumps(e) + ",\n" for e in self._pending))
            self._pending = []
        self._spill.flush()
        self._flushed_at = time.monotonic()

    def close_spill(self, remove: bool = False) -> None:
        """Flush and close the spill file; `remove` it (once the whole trace is written)."""
        with self._lock:
            self._flush_locked()
            if self._spill is not None:
                self._spill.close()
                self._spill = None
        if remove and self.spill_path is not None:
            self.spill_path.unlink(missing_ok=True)

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
        meta = _metadata(sorted({e["pid"] for e in events} | {self.rank}))
        trace = {"traceEvents": meta + events, "displayTimeUnit": "ms",
                 "otherData": {"legato_dropped_events": self.dropped}}
        return atomic_json(path, trace, indent=None)


def _metadata(pids) -> list[dict]:
    """Process and lane names for the trace viewer."""
    meta = []
    for pid in pids:
        meta.append({"name": "process_name", "ph": "M", "pid": pid,
                     "args": {"name": f"rank {pid}"}})
        meta += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                  "args": {"name": lane}} for lane, tid in LANES.items()]
    return meta
