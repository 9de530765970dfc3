"""A Chrome trace (opens in Perfetto or chrome://tracing) of what a rank did and when.

Spans are complete events ("ph": "X") on named lanes: compute (forward, backward per layer),
queue (a message from ready to start), comm (a message on the wire), update (a layer's
optimizer step), wait (a forward blocked at a layer's gate until its update), step (from one
call of the optimizer's step to the next). One process per rank (`pid` = rank), one thread row
per lane. `step_breakdown` sums a trace up per step (`legato timeline TRACE`).

With `spill`, spans also go to that file as they are recorded (at least every second, in
Chrome's JSON array format, whose closing bracket may be missing), so a job that crashes
keeps its trace up to the crash: the file opens as it is in Perfetto or chrome://tracing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from legato.core._files import atomic_json

__all__ = ["SchedulerTrace", "SpannedBackend", "Timeline", "check_trace_path", "format_breakdown",
           "read_trace", "step_breakdown"]

log = logging.getLogger(__name__)

LANES = {"compute": 0, "queue": 1, "comm": 2, "update": 3, "wait": 4, "step": 5}


class SpannedBackend:
    """A CommBackend whose every message starts inside a span of the framework's own profiler,
    named `legato.msg ID: TENSORS` (torch.profiler's record_function, TensorFlow's TraceMe,
    MXNet's profiler tasks): the framework's collective or kvstore events of that message
    appear under it. The span covers the start (issuing) of the message; its time on the wire
    is the `comm` lane of legato's own timeline. Every other attribute is the backend's.

    Args:
        backend: the backend (`start(chunk, on_done)`).
        span: opens a span of the given name (a context manager); cheap when no profiler runs.
        names: chunk id -> the names of the tensors it carries.
    """

    def __init__(self, backend, span: Callable[[str], ContextManager],
                 names: Callable[[int], str]) -> None:
        self._backend = backend
        self._span = span
        self._names = names

    def start(self, chunk, on_done) -> None:
        with self._span(f"legato.msg {chunk.id}: {self._names(chunk.id)}"):
            self._backend.start(chunk, on_done)

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


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


def check_trace_path(path: str | os.PathLike) -> None:
    """Refuse a trace path whose folder is missing or not writable (ConfigError), before a job
    starts rather than when it ends."""
    from legato.core.errors import ConfigError

    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"timeline={os.fspath(path)!r}: its folder {folder} does not exist or "
                          "is not writable; give a path in a writable folder (LEGATO_TIMELINE "
                          "too)")


class SchedulerTrace:
    """A scheduled optimizer's trace, the same for every adapter: the scheduler's events
    (`on_event`, given to the Scheduler: a message waiting, then on the wire), the adapter's
    spans (`span`: forward, backward, updates), spilled as they come to
    `<path>.rank<N>.partial.json`, and at the end gathered onto rank 0 and written to `path`
    (`finish`). When a job ends badly the gathered trace is not written and each rank's spill
    is kept (it opens as it is).

    Args:
        path: the trace to write (its folder checked by `check_trace_path` first).
        rank: this rank.
        plan, chunk_names: the communication plan and a name per chunk (`set_plan` when it
            changes: the tuner).
    """

    def __init__(self, path: str | os.PathLike, rank: int, plan, chunk_names: Sequence[str]):
        self.path = path
        self.rank = rank
        self.timeline = Timeline(rank, spill=f"{os.fspath(path)}.rank{rank}.partial.json")
        self.set_plan(plan, chunk_names)
        self._step_at: float | None = None
        self._steps = 0

    def step_called(self) -> None:
        """The training thread called the optimizer's step: the span since the previous call
        is step N on the `step` lane (what `step_breakdown` cuts the trace at)."""
        now = time.perf_counter()
        if self._step_at is not None:
            self.timeline.span("step", f"step {self._steps}", self._step_at, now)
            self._steps += 1
        self._step_at = now

    def gate_waited(self, name: str, start: float, end: float) -> None:
        """A forward (`name`) was blocked at its gate from `start` to `end`."""
        self.timeline.span("wait", f"wait {name}", start, end)

    def set_plan(self, plan, chunk_names: Sequence[str]) -> None:
        self._plan = plan
        self._chunk_names = list(chunk_names)

    def on_event(self, kind: str, chunk_id: int, when: float) -> None:
        tl = self.timeline
        if kind == "ready":
            tl.begin("queue", chunk_id, when)
        elif kind == "start":
            tl.end("queue", chunk_id, f"wait {chunk_id}", when)
            tl.begin("comm", chunk_id, when)
        elif kind == "done":
            chunk = self._plan.chunks[chunk_id]
            tl.end("comm", chunk_id, f"msg {chunk_id}: {self._chunk_names[chunk_id]}", when,
                   bytes=chunk.nbytes, layer=chunk.layer)

    def span(self, lane: str, name: str, start: float, end: float | None = None) -> None:
        self.timeline.span(lane, name, start, time.perf_counter() if end is None else end)

    def write(self, all_gather: Callable[[list[dict]], list[list[dict]]], lead: bool,
              path: str | os.PathLike | None = None) -> str | None:
        """Gather every rank's events (`all_gather(mine)`: a collective returning every rank's
        list, in group rank order) and write them on the `lead` rank (group rank 0) to `path`
        (default: the trace's own). Returns the path written, on the lead rank."""
        gathered = all_gather(self.timeline.events())
        if not lead:
            return None
        written = self.timeline.write(path or self.path, gathered[1:])  # the lead's are first
        log.info("[rank %d] timeline of %d ranks written to %s", self.rank, len(gathered),
                 written)
        return str(written)

    def finish(self, healthy: bool, all_gather: Callable[[list[dict]], list[list[dict]]],
               lead: bool) -> None:
        """At close: when the job ended cleanly, `write` and drop the spill; otherwise keep
        the spill and say where it is."""
        try:
            if healthy:
                self.write(all_gather, lead)
                self.timeline.close_spill(remove=True)
        finally:
            spill = self.timeline.spill_path
            if spill is not None and spill.exists():
                self.timeline.close_spill()
                log.warning("[rank %d] the timeline was not gathered; this rank's spans are in "
                            "%s (opens in Perfetto as it is)", self.rank, spill)


# -- where a step goes ---------------------------------------------------------------------------

def read_trace(path: str | os.PathLike) -> list[dict]:
    """The spans of a trace legato wrote: the gathered trace (`{"traceEvents": [...]}`) or a
    rank's spill (`<trace>.rank<N>.partial.json`, a JSON array whose end may be missing).
    Raises ValueError, naming the file, for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a trace legato wrote (not UTF-8 text)") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # a spill cut off by a crash: every event is followed by ",\n"
            data = json.loads(text.rstrip().rstrip(",") + "\n]")
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a trace legato wrote (not JSON: {err})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path} is not a trace legato wrote (no traceEvents list)")
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
            and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))]


def _merged(spans: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    """The union of `spans` clipped to [lo, hi], as disjoint sorted intervals."""
    out: list[list[float]] = []
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


# (key, what the row says); the training thread's rows first, then the other threads'
BREAKDOWN_ROWS = (
    ("step", "step (one call of the optimizer's step to the next)"),
    ("forward", "forward compute (per-layer spans)"),
    ("backward", "backward compute (per-layer spans)"),
    ("gate_wait", "forward waiting at a gate for the previous step's update"),
    ("other", "training thread otherwise (loss, Python, framework, compute legato does not see)"),
    ("link_busy", "link busy (union of the messages' transfers)"),
    ("link_idle_queued", "link idle while a message waited (policy or credit window)"),
    ("updates", "updates (legato's updater thread)"),
)


def step_breakdown(events: list[dict], rank: int = 0, skip: int = 1) -> dict:
    """Where each step of `rank` went, from a legato trace's spans (`read_trace`): per step (the
    `step` lane), the time on each row of `BREAKDOWN_ROWS`, as medians over the steps after the
    first `skip` (warm-up). Rows whose lane the trace lacks (per-layer compute inside a compiled
    graph) are None. Raises ValueError when the trace holds fewer than `skip` + 1 steps of
    `rank`."""
    mine = [e for e in events if e.get("pid") == rank]
    lanes: dict[str, list[tuple[float, float, dict]]] = {}
    for e in mine:
        start = e["ts"] / 1e3
        lanes.setdefault(e.get("cat", ""), []).append((start, start + e["dur"] / 1e3, e))
    steps = sorted(lanes.get("step", []), key=lambda s: s[0])
    if len(steps) <= skip:
        ranks = sorted({e.get("pid") for e in events if e.get("cat") == "step"})
        raise ValueError(
            f"the trace holds {len(steps)} step(s) of rank {rank}, fewer than the {skip + 1} "
            f"needed (ranks with steps here: {ranks or 'none'}; a trace written before "
            "legato recorded steps has none): record more steps, or pass a smaller --skip or "
            "another --rank")

    def spans(lane, prefix=""):
        return [(a, b) for a, b, e in lanes.get(lane, []) if e.get("name", "").startswith(prefix)]

    forward, backward = spans("compute", "forward"), spans("compute", "backward")
    compute, waits = spans("compute"), spans("wait")
    comm, queue, updates = spans("comm"), spans("queue"), spans("update")
    rows: dict[str, list[float]] = {key: [] for key, _ in BREAKDOWN_ROWS}
    messages, nbytes = [], []
    for a, b, _ in steps[skip:]:
        busy = _merged(comm, a, b)
        rows["step"].append(b - a)
        rows["forward"].append(_length(_merged(forward, a, b)))
        rows["backward"].append(_length(_merged(backward, a, b)))
        rows["gate_wait"].append(_length(_merged(waits, a, b)))
        rows["other"].append((b - a) - _length(_merged(compute + waits, a, b)))
        rows["link_busy"].append(_length(busy))
        rows["link_idle_queued"].append(_length(_merged(queue + comm, a, b)) - _length(busy))
        rows["updates"].append(_length(_merged(updates, a, b)))
        done = [e for s, t, e in lanes.get("comm", []) if a <= t < b]
        messages.append(len(done))
        nbytes.append(sum(e.get("args", {}).get("bytes", 0) for e in done))
    present = {"forward": bool(forward), "backward": bool(backward), "gate_wait": True,
               "link_busy": bool(comm), "link_idle_queued": bool(comm),
               "updates": bool(updates)}
    median = {key: (_median(values) if present.get(key, True) else None)
              for key, values in rows.items()}
    return {"rank": rank, "steps": len(rows["step"]), "skipped": skip, "median_ms": median,
            "messages_per_step": _median(messages), "bytes_per_step": _median(nbytes)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def format_breakdown(result: dict) -> str:
    """`step_breakdown`'s result as a Markdown table (ms per step, share of the step)."""
    med = result["median_ms"]
    step = med["step"] or float("nan")
    lines = [f"rank {result['rank']}: medians of {result['steps']} steps (the first "
             f"{result['skipped']} skipped), {result['messages_per_step']:g} messages and "
             f"{result['bytes_per_step'] / 2**20:.1f} MiB a step",
             "", "| per step | ms | share of the step |", "| --- | --- | --- |"]
    for key, what in BREAKDOWN_ROWS:
        value = med[key]
        if value is None:
            lines.append(f"| {what} | not recorded | |")
        else:
            lines.append(f"| {what} | {value:.1f} | {100 * value / step:.0f}% |")
    if med["forward"] is None and med["backward"] is None:
        lines.append("")
        lines.append("No per-layer compute spans: the forward and backward ran inside a compiled "
                     "graph (or the adapter records none); their time is in 'training thread "
                     "otherwise'.")
    return "\n".join(lines)
