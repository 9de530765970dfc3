"""From a plan to a simulated run: schedule on the plan's ranks, stage costs, prediction."""

from __future__ import annotations

import random

import pytest

from legato.core.errors import ConfigError
from legato.core.pipeline import LayerNode, LayerProfile, Link, plan, verify
from legato.core.pipeline.predict import batch_fraction, predict, schedule_for, stage_costs


def _chain(n: int = 8, seed: int = 0) -> LayerProfile:
    rng = random.Random(seed)
    nodes = [LayerNode(id="input", desc="Input", forward_s=0.5, activation_bytes=1 << 20)]
    nodes += [LayerNode(id=f"l{i}", forward_s=rng.uniform(0.01, 0.02),
                        backward_s=rng.uniform(0.02, 0.04), activation_bytes=1 << 20,
                        parameter_bytes=(1 << 22) * (i == n - 1)) for i in range(n)]
    edges = [("input", "l0")] + [(f"l{i}", f"l{i + 1}") for i in range(n - 1)]
    return LayerProfile(tuple(nodes), tuple(edges), {"model": "chain"})


def test_schedule_runs_on_the_plans_ranks():
    p = _chain()
    pl = plan(p, 4, bandwidth="10GB/s")
    sched = schedule_for(pl, "1f1b", microbatches=8)
    assert [tuple(sorted(r)) for r in sched.stage_ranks] == [s.ranks for s in pl.stages]
    verify(sched)


def test_stage_costs_cover_the_profile_without_placeholders():
    p = _chain()
    pl = plan(p, 3, bandwidth="10GB/s", straight=True)
    assert pl.placeholders == ("input",)
    costs = stage_costs(p, pl, fraction=0.25)
    total = sum(c.forward_s + c.backward_s for c in costs)
    real = sum(n.compute_s for n in p.nodes if n.id != "input")
    assert total == pytest.approx(0.25 * real)
    assert costs[-1].parameter_bytes == 1 << 22            # parameters do not scale


def test_prediction_of_a_straight_pipeline_matches_the_closed_form():
    """Equal stages, free link: 1F1B makespan = (m + p - 1) * (f + b) per microbatch."""
    nodes = [LayerNode(id=f"l{i}", forward_s=0.01, backward_s=0.02) for i in range(4)]
    p = LayerProfile(tuple(nodes), tuple((f"l{i}", f"l{i + 1}") for i in range(3)))
    pl = plan(p, 4, straight=True)
    m = 8
    pr = predict(p, pl, "1f1b", microbatches=m, link=Link(0.0, float("inf")))
    per_mb = 0.03 / m
    assert pr.result.makespan_s == pytest.approx((m + 4 - 1) * per_mb)
    assert pr.time_per_minibatch_s == pytest.approx(pr.result.makespan_s)
    assert batch_fraction("pipedream", m) == 1.0 and batch_fraction("gpipe", m) == 1 / m


def test_interleaved_needs_an_unreplicated_plan():
    p = _chain()
    pl = plan(p, 4, bandwidth="1GB/s")
    if any(s.replicas > 1 for s in pl.stages):
        with pytest.raises(ConfigError, match="no replicated stages"):
            schedule_for(pl, "interleaved-1f1b", microbatches=8)
    straight = plan(p, 4, straight=True)
    sched = schedule_for(straight, "interleaved-1f1b", microbatches=4, virtual_stages=2)
    assert sched.num_stages == 4 and len(sched.ranks) == 2
    with pytest.raises(ConfigError, match="multiple of 3"):
        schedule_for(straight, "interleaved-1f1b", microbatches=4, virtual_stages=3)


def test_a_plan_for_another_profile_is_refused():
    pl = plan(_chain(), 2)
    other = _chain(4)
    with pytest.raises(ConfigError, match="does not have"):
        stage_costs(other, pl, fraction=1.0)
