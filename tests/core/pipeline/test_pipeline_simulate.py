"""Pipeline simulator: bubble and makespan closed forms, the alpha + bytes/B link, ring
all-reduce, peak memory, JSON and the Gantt PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from legato.core.errors import ConfigError
from legato.core.pipeline.ir import Schedule
from legato.core.pipeline.profile import LayerNode
from legato.core.pipeline.schedules import (
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    pipedream,
    pipedream_2bw,
    zb_h1,
)
from legato.core.pipeline.simulate import Link, StageCost, simulate
from legato.core.pipeline.schedules import get_schedule
from legato.core.pipeline.verify import DeadlockError, verify

CASES = [(p, m) for p in (1, 2, 3, 4, 6) for m in (1, 2, 3, 4, 8, 13)]


@pytest.mark.parametrize("generator", [gpipe, one_f_one_b])
@pytest.mark.parametrize("forward_s, backward_s", [(1.0, 1.0), (1.0, 2.0), (0.3, 0.7)])
def test_bubble_closed_form_gpipe_and_1f1b(generator, forward_s, backward_s):
    for p, m in CASES:
        result = simulate(generator(p, m), StageCost(forward_s, backward_s))
        assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
        assert result.makespan_s == pytest.approx((m + p - 1) * (forward_s + backward_s))
        assert all(b == pytest.approx(m * (forward_s + backward_s))
                   for b in result.busy_s.values())


@pytest.mark.parametrize("backward_ratio", [1.0, 2.0])
def test_interleaved_divides_the_bubble_by_v(backward_ratio):
    """Megatron: bubble time (p - 1)(tf + tb) / v, so fraction (p - 1) / (v m + p - 1)."""
    tf, tb = 1.0, backward_ratio
    for p, groups, v in [(2, 1, 2), (2, 3, 2), (4, 1, 2), (4, 2, 2), (4, 2, 3), (4, 3, 4),
                         (3, 2, 1), (8, 2, 2)]:
        m = groups * p
        chunk = StageCost(tf / v, tb / v)  # the rank's model split into v equal chunks
        result = simulate(interleaved_1f1b(p, m, virtual_stages=v), chunk)
        assert result.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
        bubble_s = result.makespan_s - m * (tf + tb)
        assert bubble_s == pytest.approx((p - 1) * (tf + tb) / v)
        flush = simulate(one_f_one_b(p, m), StageCost(tf, tb))
        assert flush.makespan_s - m * (tf + tb) == pytest.approx(v * bubble_s)


def test_async_schedules_have_the_startup_bubble_only():
    p, m = 4, 12
    for schedule in (pipedream(p, m), pipedream(p, m, vertical_sync=True)):
        result = simulate(schedule, StageCost(1.0, 2.0))
        assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    # 2BW over 3 steps of m: no flush between steps
    result = simulate(pipedream_2bw(p, p, num_steps=3), StageCost(1.0, 1.0))
    assert result.makespan_s == pytest.approx((3 * p + p - 1) * 2)
    gpipe_steps = 3 * simulate(gpipe(p, p), StageCost(1.0, 1.0)).makespan_s
    assert result.makespan_s < gpipe_steps


def test_split_backward_shortens_1f1b():
    cost = StageCost(1.0, 2.0, backward_input_s=1.0, backward_weight_s=1.0)
    whole = simulate(one_f_one_b(4, 8), cost)
    split = simulate(one_f_one_b(4, 8, split_backward=True), cost)
    assert split.makespan_s < whole.makespan_s
    assert sum(split.busy_s.values()) == pytest.approx(sum(whole.busy_s.values()))


def test_link_alpha_plus_bytes_over_bandwidth():
    link = Link(alpha_s=0.01, bandwidth_Bps=1e6)
    costs = [StageCost(1.0, 2.0, output_bytes=50_000), StageCost(0.5, 1.0, output_bytes=7)]
    result = simulate(gpipe(2, 1), costs, link)
    transfer = 0.01 + 50_000 / 1e6  # the activation forward, its gradient back: same size
    assert result.makespan_s == pytest.approx(1.0 + transfer + 0.5 + 1.0 + transfer + 2.0)
    sends = [s for s in result.timeline if s.action.kind.is_send]
    assert [s.end_s - s.start_s for s in sends] == pytest.approx([transfer, transfer])


def test_transfers_share_a_link_one_at_a_time():
    link = Link(0.0, 1.0)  # one byte per second
    costs = [StageCost(0.0, 0.0, output_bytes=10), StageCost(0.0, 0.0)]
    result = simulate(gpipe(2, 3), costs, link)
    starts = sorted((s.start_s, s.end_s) for s in result.timeline
                    if str(s.action).startswith("0SEND_F"))
    assert starts == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    # the gradients (as large) queue on the other direction once rank 1 has all three
    backs = sorted((s.start_s, s.end_s) for s in result.timeline
                   if str(s.action).startswith("1SEND_B"))
    assert backs == [(30.0, 40.0), (40.0, 50.0), (50.0, 60.0)]
    assert result.makespan_s == pytest.approx(60.0)


def test_issuing_a_message_takes_the_senders_time():
    """send_s: rank 0 runs F0, issues it (0.5), F1, issues it; rank 1 gets F0 at 1.5 and F1
    at 3; backwards mirror it: 8 time units where free sends take 6."""
    cost = StageCost(1.0, 1.0, send_s=0.5)
    free = Link(0.0, 1e30)
    assert simulate(gpipe(2, 2), StageCost(1.0, 1.0), free).makespan_s == pytest.approx(6.0)
    assert simulate(gpipe(2, 2), cost, free).makespan_s == pytest.approx(8.0)
    # on one shared core every issue is work too: 2 x (2 F + 2 B + 2 sends)
    assert simulate(gpipe(2, 2), cost, free, cores=1).makespan_s == pytest.approx(10.0)
    for sched in (one_f_one_b(4, 8), pipedream(3, 6)):
        assert simulate(sched, cost, Link(0.01, 1e6)).makespan_s == pytest.approx(
            simulate(sched, cost, Link(0.01, 1e6), cores=4).makespan_s)


def test_costs_from_a_pipelines_own_timeline():
    from legato.core.pipeline import Action, Span
    from legato.core.pipeline.predict import costs_from_timeline

    base = [StageCost(9.0, 9.0, output_bytes=100), StageCost(9.0, 9.0, optimizer_step_s=7.0)]
    spans = [Span(0, Action.parse("0F0"), 0.0, 1.0), Span(0, Action.parse("0F1"), 2.0, 5.0),
             Span(0, Action.parse("0SEND_F0@1"), 1.0, 1.5), Span(1, Action.parse("1I0"), 0, 2.0),
             Span(1, Action.parse("1W0"), 2.0, 3.0), Span(1, Action.parse("1SEND_B0@0"), 3, 3.25),
             Span(0, Action.parse("0B0"), 5.0, 9.0)]
    got = costs_from_timeline(spans, base)
    assert got[0].forward_s == 2.0 and got[0].backward_s == 4.0 and got[0].send_s == 0.5
    assert got[0].output_bytes == 100 and got[0].optimizer_step_s == 0.0
    assert (got[1].backward_input_s, got[1].backward_weight_s, got[1].backward_s) == (2, 1, 3)
    assert got[1].forward_s == 9.0 and got[1].optimizer_step_s == 7.0   # not run: the base's
    assert got[1].send_s == 0.25


def test_costs_from_a_timeline_on_shared_cores_are_work_at_full_speed():
    """cores=1: 0F0 (0-2) ran alone for 1 s then beside 1F0 (1-3) for 1 s (at half speed):
    1.5 s of work; 1F0 ran beside 0F0 for 1 s and alone for 1 s: 1.5 s; a receive's wait is no
    work and shares nothing. Simulating the schedule back on one core from that work gives
    the measured timeline's end again; with a core each, the durations as measured."""
    from legato.core.pipeline import Action, Span
    from legato.core.pipeline.predict import costs_from_timeline

    base = [StageCost(9.0, 9.0), StageCost(9.0, 9.0)]
    spans = [Span(0, Action.parse("0F0"), 0.0, 2.0), Span(1, Action.parse("1F0"), 1.0, 3.0),
             Span(1, Action.parse("1RECV_F0@0"), 0.0, 1.0),
             Span(1, Action.parse("1B0"), 3.0, 4.0)]
    shared = costs_from_timeline(spans, base, cores=1)
    assert shared[0].forward_s == pytest.approx(1.5) and shared[1].forward_s == pytest.approx(1.5)
    assert shared[1].backward_s == pytest.approx(1.0)
    assert costs_from_timeline(spans, base, cores=2)[0].forward_s == pytest.approx(2.0)
    assert costs_from_timeline(spans, base)[1].forward_s == pytest.approx(2.0)
    # two ranks, each F then B, on one core: 4 actions of 1 s of work each; measured as
    # 2-s spans while both ran: the work recovered is 1 s each and the makespan is 4
    from legato.core.pipeline.schedules import gpipe as gp

    sched = gp(2, 1)
    sim = simulate(sched, StageCost(1.0, 1.0), Link(0.0, 1e30), cores=1)
    got = costs_from_timeline(sim.timeline, [StageCost(5.0, 5.0)] * 2, cores=1)
    assert [c.forward_s for c in got] == pytest.approx([1.0, 1.0])
    assert simulate(sched, got, Link(0.0, 1e30), cores=1).makespan_s == pytest.approx(
        sim.makespan_s)


def test_link_from_a_pipelines_own_timeline():
    """Rank 1 waits from t=0 for 0SEND_F0 (issued 1.0-1.5, arrives 3.5): 2 s for 100 bytes at
    100 B/s is 1 s beyond the bytes; the gradient back arrived while nobody waited (ignored)."""
    from legato.core.pipeline import Action, Span
    from legato.core.pipeline.predict import link_from_timeline

    base = [StageCost(1.0, 1.0, output_bytes=100), StageCost(1.0, 1.0)]
    spans = [Span(0, Action.parse("0SEND_F0@1"), 1.0, 1.5),
             Span(1, Action.parse("1RECV_F0@0"), 0.0, 3.5),
             Span(1, Action.parse("1SEND_B0@0"), 5.0, 5.1),
             Span(0, Action.parse("0RECV_B0@1"), 9.0, 9.0)]
    got = link_from_timeline(spans, base, Link(0.01, 100.0))
    assert got == Link(1.0, 100.0)
    assert link_from_timeline(spans[2:], base, Link(0.01, 100.0)) == Link(0.01, 100.0)


def test_ring_all_reduce_within_a_replicated_stage():
    ring = Link(alpha_s=0.001, bandwidth_Bps=1e9)
    costs = [StageCost(1.0, 1.0, parameter_bytes=3 * 10**9), StageCost(1.0, 1.0)]
    result = simulate(gpipe(2, 3, replicas=[3, 1]), costs, Link(), allreduce_link=ring)
    reduce_s = 2 * 2 / 3 * 3 + 2 * 2 * 0.001
    assert ring.allreduce_s(3 * 10**9, 3) == pytest.approx(reduce_s)
    spans = [s for s in result.timeline if s.action.kind.value == "ALLREDUCE"]
    assert len(spans) == 3 and len({(s.start_s, s.end_s) for s in spans}) == 1
    assert spans[0].end_s - spans[0].start_s == pytest.approx(reduce_s)
    assert result.makespan_s == pytest.approx(spans[0].end_s)
    assert Link().allreduce_s(10**9, 1) == 0.0


def test_optimizer_step_time_is_not_compute():
    result = simulate(one_f_one_b(2, 2), StageCost(1.0, 1.0, optimizer_step_s=5.0))
    assert result.makespan_s == pytest.approx(6.0 + 5.0)
    assert result.busy_s == {0: 4.0, 1: 4.0}


@pytest.mark.parametrize("tf, tb, tw", [(1.0, 1.0, 1.0), (1.0, 1.5, 0.8), (2.0, 1.0, 0.5),
                                        (0.4, 0.3, 0.2)])
def test_zero_bubble_h1_bubble_is_the_papers(tf, tb, tw):
    """Qi et al., Zero Bubble Pipeline Parallelism (ICLR'24) §3.1: with T_W <= T_F, ZB-H1's
    bubble is (p - 1)(T_F + T_B - T_W) where 1F1B's is (p - 1)(T_F + T_B + T_W) (m >= p)."""
    cost = StageCost(tf, tb + tw, backward_input_s=tb, backward_weight_s=tw)
    for p, m in [(2, 2), (2, 5), (3, 6), (4, 4), (4, 8), (6, 13)]:
        zb = simulate(zb_h1(p, m), cost)
        assert zb.makespan_s == pytest.approx(m * (tf + tb + tw) + (p - 1) * (tf + tb - tw))
        flush = simulate(one_f_one_b(p, m), cost)
        assert flush.makespan_s == pytest.approx((m + p - 1) * (tf + tb + tw))
        assert sum(zb.busy_s.values()) == pytest.approx(sum(flush.busy_s.values()))


def test_zero_bubble_h1_holds_no_more_than_1f1bs_first_stage():
    p, m = 4, 8
    cost = StageCost(1.0, 2.0, 1.0, 1.0, activation_bytes=100, parameter_bytes=10_000)
    zb = simulate(zb_h1(p, m), cost).peak_memory_bytes
    flush = simulate(one_f_one_b(p, m), cost).peak_memory_bytes
    assert zb == {s: 10_000 + 100 * p for s in range(p)}       # W frees the activations
    assert max(zb.values()) == max(flush.values())
    with pytest.raises(Exception, match="zb-h1: replicas=.*straight pipelines only"):
        zb_h1(2, 4, replicas=[2, 1])


def test_peak_memory_1f1b_vs_gpipe_vs_pipedream():
    p, m = 4, 8
    cost = StageCost(1.0, 1.0, activation_bytes=100, parameter_bytes=10_000,
                     optimizer_state_bytes=20_000)
    flush = simulate(one_f_one_b(p, m), cost).peak_memory_bytes
    assert flush == {s: 10_000 + 20_000 + 100 * min(p - s, m) for s in range(p)}
    fill = simulate(gpipe(p, m), cost).peak_memory_bytes
    assert fill == {s: 10_000 + 20_000 + 100 * m for s in range(p)}
    stash = simulate(pipedream(p, m), cost).peak_memory_bytes
    assert stash == {s: 10_000 * (p - s) + 20_000 + 100 * (p - s) for s in range(p)}
    double = simulate(pipedream_2bw(p, m), cost).peak_memory_bytes
    assert double == {s: 10_000 * 2 + 20_000 + 100 * (p - s) for s in range(p)}


def test_interleaved_memory_sums_the_chunks_of_a_rank():
    cost = StageCost(1.0, 1.0, activation_bytes=1, parameter_bytes=1000)
    result = simulate(interleaved_1f1b(2, 4, virtual_stages=2), cost)
    report = result.report
    assert result.peak_memory_bytes == {r: 2 * 1000 + report.peak_in_flight_rank[r]
                                        for r in (0, 1)}


def test_costs_and_links_are_validated():
    with pytest.raises(ConfigError, match="one StageCost per"):
        simulate(gpipe(3, 2), [StageCost(1, 1)] * 2)
    with pytest.raises(ConfigError, match="forward_s=-1"):
        StageCost(-1, 1)
    with pytest.raises(ConfigError, match="both backward_input_s and backward_weight_s"):
        StageCost(1, 1, backward_input_s=0.5)
    with pytest.raises(ConfigError, match="bandwidth_Bps > 0"):
        Link(0.0, 0.0)
    with pytest.raises(DeadlockError):
        simulate(Schedule("hand", {0: ["0F0", "0RECV_B0@1", "0SEND_F0@1", "0B0"],
                                   1: ["1RECV_F0@0", "1F0", "1B0", "1SEND_B0@0"]},
                          [(0,), (1,)], 1), StageCost(1, 1))


def test_stage_cost_from_profiled_layers():
    nodes = [LayerNode("a", forward_s=0.2, backward_s=0.4, activation_bytes=1000,
                       parameter_bytes=10, optimizer_state_bytes=20),
             LayerNode("b", forward_s=0.1, backward_s=0.2, backward_input_s=0.1,
                       backward_weight_s=0.1, activation_bytes=300, parameter_bytes=5)]
    cost = StageCost.from_layers(nodes, batch_fraction=0.5)
    assert cost.forward_s == pytest.approx(0.15) and cost.backward_s == pytest.approx(0.3)
    assert cost.backward_input_s is None and cost.input_s == pytest.approx(0.15)
    assert (cost.output_bytes, cost.activation_bytes) == (150, 650)
    assert (cost.parameter_bytes, cost.optimizer_state_bytes) == (15, 20)
    split = StageCost.from_layers(nodes[1:])
    assert (split.input_s, split.weight_s) == (0.1, 0.1)


def test_to_json_and_gantt(tmp_path):
    result = simulate(pipedream(2, 6, replicas=[2, 1], split_backward=True),
                      [StageCost(2.0, 4.0, output_bytes=10**6, parameter_bytes=10**6),
                       StageCost(1.0, 2.0)], Link(1e-3, 1e9))
    data = json.loads(json.dumps(result.to_json()))
    assert data["schedule"] == "pipedream" and data["makespan_s"] == result.makespan_s
    assert {d["rank"] for d in data["stages"]} == {0, 1, 2}
    assert len(data["timeline"]) == len(result.report.order)  # one span per action
    out = result.gantt(tmp_path / "charts" / "pipedream.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["pipedream.png"]  # no temp file left
    assert result.timeline and math.isfinite(result.makespan_s)


def test_simulator_imports_no_matplotlib_until_drawing():
    code = ("import sys; import legato.core.pipeline.simulate as s; "
            "assert 'matplotlib' not in sys.modules, 'imported at load'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- ranks sharing fewer cores ------------------------------------------------------------------
@pytest.mark.parametrize("name, p, m", [("gpipe", 4, 8), ("1f1b", 3, 6), ("pipedream", 4, 8),
                                        ("2bw", 3, 6)])
def test_shared_cores_path_equals_the_fixed_one_when_cores_suffice(name, p, m):
    from legato.core.pipeline.simulate import _simulate_shared, _stage_costs

    kw = {"num_steps": 2} if name == "2bw" else {}
    sched = get_schedule(name)(p, m, **kw)
    cost = StageCost(forward_s=1.0, backward_s=2.0, optimizer_step_s=0.5, output_bytes=1000,
                     parameter_bytes=10)
    link = Link(0.01, 1e5)
    fixed = simulate(sched, cost, link)
    shared = _simulate_shared(sched, _stage_costs(cost, sched.num_stages), link, link, 10**6,
                              verify(sched))
    assert shared.makespan_s == pytest.approx(fixed.makespan_s)
    assert shared.bubble_fraction == pytest.approx(fixed.bubble_fraction)


def test_one_core_runs_all_the_work_one_after_another():
    sched = get_schedule("1f1b")(4, 8)
    cost = StageCost(forward_s=1.0, backward_s=2.0, optimizer_step_s=0.5)
    one = simulate(sched, cost, Link(), cores=1)
    assert one.makespan_s == pytest.approx(4 * 8 * 3.0 + 4 * 0.5)
    two = simulate(sched, cost, Link(), cores=2)
    assert simulate(sched, cost, Link()).makespan_s < two.makespan_s < one.makespan_s
    with pytest.raises(ConfigError, match="cores=0"):
        simulate(sched, cost, Link(), cores=0)
