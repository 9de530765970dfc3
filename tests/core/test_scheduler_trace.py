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


# -- legato timeline: where a step goes -----------------------------------------------------------

def _span(cat, name, start_ms, end_ms, pid=0, **args):
    event = {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": 0, "ts": start_ms * 1e3,
             "dur": (end_ms - start_ms) * 1e3}
    if args:
        event["args"] = args
    return event


def _two_steps():
    """Steps [0, 100) and [100, 180) ms of rank 0, with spans that overlap each other and
    the step boundaries."""
    return [
        _span("step", "step 0", 0, 100), _span("step", "step 1", 100, 180),
        # step 0: forward 10-30, a wait 25-40 inside and after it, backward 50-70
        _span("compute", "forward a", 10, 30), _span("wait", "wait b", 25, 40),
        _span("compute", "backward a", 50, 70),
        # messages: 60-90 and 80-120 on the wire (union 60-120), queued 55-60 and 70-80
        _span("queue", "wait 0", 55, 60), _span("comm", "msg 0", 60, 90, bytes=1024),
        _span("queue", "wait 1", 70, 80), _span("comm", "msg 1", 80, 120, bytes=3072),
        _span("update", "update a", 120, 130),
        # step 1: forward 100-110, backward 140-150; another rank's spans are ignored
        _span("compute", "forward a", 100, 110), _span("compute", "backward a", 140, 150),
        _span("comm", "msg 0", 0, 180, pid=1),
    ]


def test_step_breakdown_cuts_every_lane_at_the_step_boundaries():
    from legato.core.timeline import step_breakdown

    found = step_breakdown(_two_steps(), rank=0, skip=0)
    assert found["steps"] == 2
    med = found["median_ms"]

    def mid(a, b):
        return pytest.approx((a + b) / 2)

    assert med["step"] == mid(100, 80)
    assert med["forward"] == mid(20, 10)
    assert med["backward"] == mid(20, 10)
    assert med["gate_wait"] == mid(15, 0)
    assert med["other"] == mid(100 - 50, 80 - 20)       # step less (forward | wait | backward)
    assert med["link_busy"] == mid(40, 20)              # 60-100 | 100-120
    assert med["link_idle_queued"] == mid(5, 0)         # 55-60; 70-80 is under msg 0
    assert med["updates"] == mid(0, 10)
    assert found["messages_per_step"] == 1              # msg 0 ends in step 0, msg 1 in step 1
    assert found["bytes_per_step"] == 2048


def test_step_breakdown_says_what_a_compiled_graph_hides_and_refuses_too_few_steps():
    from legato.core.timeline import format_breakdown, step_breakdown

    graph = [e for e in _two_steps() if e["cat"] != "compute"]
    text = format_breakdown(step_breakdown(graph, skip=1))
    assert "| forward compute (per-layer spans) | not recorded |" in text
    assert "compiled graph" in text
    with pytest.raises(ValueError, match="2 step.* of rank 0, fewer than the 3 needed"):
        step_breakdown(graph, skip=2)
    with pytest.raises(ValueError, match="ranks with steps here: \\[0\\]"):
        step_breakdown(graph, rank=1)


def test_legato_timeline_reads_a_spill_cut_off_and_refuses_what_is_not_a_trace(tmp_path, capsys):
    from legato.cli import main

    spill = tmp_path / "trace.json.rank0.partial.json"  # a crashed rank's spill: no closing ]
    spill.write_text("[\n" + "".join(json.dumps(e) + ",\n" for e in _two_steps()))
    assert main(["timeline", str(spill), "--skip", "0"]) == 0
    out = capsys.readouterr().out
    assert "medians of 2 steps" in out and "| link busy" in out
    for bad, says in ((tmp_path / "missing.json", "is not a file"),
                      (tmp_path / "notes.txt", "not a trace legato wrote")):
        if bad.name == "notes.txt":
            bad.write_text("hello")
        assert main(["timeline", str(bad)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["timeline", str(spill), "--skip", "5"]) == 2
    assert "fewer than the 6 needed" in capsys.readouterr().err


def test_step_called_records_the_span_between_two_calls(tmp_path):
    trace, _ = _trace(tmp_path / "trace.json")
    trace.step_called()
    trace.step_called()
    trace.step_called()
    steps = [e for e in trace.timeline.events() if e["cat"] == "step"]
    assert [e["name"] for e in steps] == ["step 0", "step 1"]
    assert steps[0]["ts"] + steps[0]["dur"] == pytest.approx(steps[1]["ts"])
    trace.timeline.close_spill(remove=True)
