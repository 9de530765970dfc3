"""SchedulerTrace, the timeline every adapter's scheduled optimizer records: what it writes after
a clean end and what it keeps after a bad one."""

from __future__ import annotations

import json
import time

import pytest

from legato.core.errors import ConfigError
from legato.core.scheduler.plan import CommTask
from legato.core.scheduler.policy import plan_for, resolve_config
from legato.core.timeline import SchedulerTrace, check_trace_path


def _trace(path, rank=0):
    plan = plan_for(resolve_config("priority"), [CommTask(0, "w", 0, 4096, 4, "float32"),
                                                 CommTask(1, "b", 0, 64, 4, "float32")])
    return SchedulerTrace(path, rank, plan, [f"chunk {c.id}" for c in plan.chunks]), plan


def _record_one_message(trace) -> None:
    now = time.perf_counter()
    trace.on_event("ready", 0, now)
    trace.on_event("start", 0, now + 0.001)
    trace.on_event("done", 0, now + 0.002)
    trace.span("update", "update fc", now + 0.002, now + 0.003)


def test_a_clean_end_writes_every_ranks_spans_on_the_lead_and_drops_the_spill(tmp_path):
    path = tmp_path / "trace.json"
    lead, _ = _trace(path, 0)
    other, _ = _trace(path, 1)
    _record_one_message(lead)
    _record_one_message(other)
    theirs = other.timeline.events()
    other.finish(True, lambda mine: [[], mine], lead=False)   # a follower writes nothing
    assert not path.exists()
    lead.finish(True, lambda mine: [mine, theirs], lead=True)
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert sorted({e["pid"] for e in spans}) == [0, 1]
    assert {e["cat"] for e in spans} == {"queue", "comm", "update"}
    comm = next(e for e in spans if e["cat"] == "comm")
    assert comm["name"] == "msg 0: chunk 0" and comm["args"]["bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]


def test_a_bad_end_keeps_each_ranks_spill_and_writes_no_trace(tmp_path):
    path = tmp_path / "trace.json"
    trace, _ = _trace(path, 1)
    _record_one_message(trace)
    trace.finish(False, lambda mine: pytest.fail("no gathering after a failure"), lead=False)
    assert not path.exists()
    spill = tmp_path / "trace.json.rank1.partial.json"
    events = json.loads(spill.read_text().rstrip().rstrip(",") + "]")  # Chrome's open array
    assert {e.get("cat") for e in events if e["ph"] == "X"} == {"queue", "comm", "update"}


def test_a_gathering_that_fails_keeps_the_spill(tmp_path):
    trace, _ = _trace(tmp_path / "trace.json", 0)
    _record_one_message(trace)

    def lost(_mine):
        raise TimeoutError("a peer is gone")
    with pytest.raises(TimeoutError):
        trace.finish(True, lost, lead=True)
    assert (tmp_path / "trace.json.rank0.partial.json").exists()


def test_a_trace_in_a_missing_folder_is_refused_before_the_job(tmp_path):
    with pytest.raises(ConfigError, match="does not exist or is not writable"):
        check_trace_path(tmp_path / "nowhere" / "trace.json")
