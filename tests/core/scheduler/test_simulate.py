"""The step simulator against closed forms and the bounds of data-parallel training."""

from __future__ import annotations

import json

import pytest

from legato.core.errors import ConfigError
from legato.core.scheduler.plan import CommTask, make_plan
from legato.core.scheduler.policy import resolve_config
from legato.core.scheduler.simulate import LayerCost, LinkModel, simulate

MB = 1_000_000


def setup(policy, sizes, f, b, u=0.0, **settings):
    layers = [LayerCost(f"l{i}", f, b, u) for i in range(len(sizes))]
    tasks = [CommTask(i, f"l{i}.weight", i, n) for i, n in enumerate(sizes)]
    config = resolve_config(policy, **settings)
    plan = make_plan(tasks, partition_bytes=config.partition_bytes,
                     merge_bytes=config.merge_bytes)
    return plan, layers, config


def test_free_network_step_is_forward_plus_backward():
    plan, layers, config = setup("fifo", [4 * MB] * 4, f=0.01, b=0.02)
    link = LinkModel(alpha_s=0.0, bytes_per_s=1e15)
    for overlap in (False, True):
        result = simulate(plan, layers, config, link, steps=5, overlap=overlap)
        assert result.step_s == pytest.approx(0.12, rel=1e-6)


def test_fifo_with_barrier_closed_form():
    """Each layer's 4 MB message (10.5 ms) is sent as its backward ends; the last one (layer 0)
    goes at F + B = 120 ms, then 4 updates of 1 ms: 134.5 ms."""
    plan, layers, config = setup("fifo", [4 * MB] * 4, f=0.01, b=0.02, u=0.001)
    link = LinkModel(alpha_s=0.0005, bytes_per_s=400 * MB)
    result = simulate(plan, layers, config, link, steps=5, overlap=False)
    assert result.step_s == pytest.approx(0.1345, rel=1e-6)
    assert result.step_times_s == pytest.approx([0.1345] * 4, rel=1e-6)


def test_communication_bound_step_is_the_link_time():
    """Compute is negligible: every schedule is bounded by sending all bytes, C."""
    plan, layers, config = setup("bytescheduler", [8 * MB] * 3, f=1e-6, b=1e-6,
                                 partition_bytes=1 << 20, credit_bytes=2 << 20)
    link = LinkModel(alpha_s=0.0, bytes_per_s=100 * MB, world=2)
    comm = 3 * 8 * MB / (100 * MB)  # ring factor 2(n-1)/n = 1 for two ranks
    result = simulate(plan, layers, config, link, steps=5)
    assert result.step_s == pytest.approx(comm, rel=0.01)


def test_priority_and_partitions_approach_the_bound_where_fifo_does_not():
    """Communication about equal to compute: bytescheduler with dependency proxies overlaps
    the next forward with the remaining messages; fifo with a barrier cannot."""
    sizes = [2 * MB, 2 * MB, 2 * MB, 6 * MB, 8 * MB]
    f, b = 0.006, 0.012
    link = LinkModel(alpha_s=0.0002, bytes_per_s=200 * MB)
    fifo = simulate(*setup("fifo", sizes, f, b), link, overlap=False, steps=8)
    plan, layers, config = setup("bytescheduler", sizes, f, b, partition_bytes=1 << 20,
                                 credit_bytes=2 << 20)
    bs = simulate(plan, layers, config, link, overlap=True, steps=8)
    compute = len(sizes) * (f + b)
    comm = sum(link.message_s(c.nbytes) for c in plan.chunks)
    bound = max(compute, comm)
    # Layer 0's gradient comes last; its messages wait behind at most one credit window.
    first_layer = sum(link.message_s(c.nbytes) for c in plan.chunks if c.layer == 0)
    slack = first_layer + link.message_s(config.credit_bytes)
    assert bs.step_s < fifo.step_s * 0.9
    assert bound <= bs.step_s <= bound + slack
    assert fifo.step_s >= bound


@pytest.mark.parametrize("policy", ["fifo", "priority", "bytescheduler"])
def test_more_bandwidth_is_never_slower(policy):
    settings = dict(partition_bytes=1 << 20, credit_bytes=4 << 20) if policy == "bytescheduler" \
        else {}
    plan, layers, config = setup(policy, [3 * MB, 1 * MB, 5 * MB, 2 * MB], 0.004, 0.008,
                                 0.0005, **settings)
    times = [simulate(plan, layers, config, LinkModel(0.0003, bw * MB), steps=6).step_s
             for bw in (50, 100, 200, 400, 800, 1600)]
    assert times == sorted(times, reverse=True)


def test_timeline_has_every_lane():
    plan, layers, config = setup("priority", [1 * MB] * 3, 0.001, 0.002, 0.0001)
    result = simulate(plan, layers, config, LinkModel(0.0001, 100 * MB), steps=3)
    events = result.timeline()
    assert {e["cat"] for e in events} == {"compute", "comm", "update"}
    json.dumps(events)
    assert all(e["dur"] >= 0 for e in events)


def test_bad_input():
    plan, layers, config = setup("fifo", [MB, MB], 0.001, 0.001)
    with pytest.raises(ConfigError, match="steps=1 is too few"):
        simulate(plan, layers, config, LinkModel(0.0, MB), steps=1)
    with pytest.raises(ConfigError, match="tasks in layer 1 but only 1 layer costs"):
        simulate(plan, layers[:1], config, LinkModel(0.0, MB))
    with pytest.raises(ConfigError, match="invalid link model"):
        LinkModel(alpha_s=0.0, bytes_per_s=0)
    with pytest.raises(ConfigError, match="algorithm='tree'"):
        LinkModel(0.0, MB, algorithm="tree")


def test_fit_link_recovers_alpha_and_bandwidth():
    from legato.core.scheduler.simulate import fit_link

    truth = LinkModel(alpha_s=0.0003, bytes_per_s=12.5 * MB, world=4)
    samples = [(n, truth.message_s(n)) for n in (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)]
    fit = fit_link(samples, world=4)
    assert fit.link.alpha_s == pytest.approx(0.0003, rel=1e-6)
    assert fit.link.bytes_per_s == pytest.approx(12.5 * MB, rel=1e-6)
    assert fit.max_rel_error < 1e-9
    assert "Mbit/s per rank" in fit.describe()


def test_fit_link_trusts_large_messages_over_a_token_bucket_burst():
    """Small messages pass a tbf at line rate (they fit its burst): the bandwidth must come
    from the large ones, which dominate a step's communication time."""
    from legato.core.scheduler.simulate import fit_link

    rate = 12.5 * MB
    samples = [(1 << 12, 0.0002), (1 << 14, 0.0003), (1 << 16, 0.0004),
               (1 << 20, (1 << 20) / rate), (1 << 22, (1 << 22) / rate),
               (1 << 23, (1 << 23) / rate)]
    fit = fit_link(samples, world=2)
    assert fit.link.bytes_per_s == pytest.approx(rate, rel=0.01)


def test_fit_link_rejects_too_little_data():
    from legato.core.scheduler.simulate import fit_link

    with pytest.raises(ConfigError, match="at least 2 message sizes"):
        fit_link([(1000, 0.001), (1000, 0.002)], world=2)
    with pytest.raises(ConfigError, match="does not grow"):
        fit_link([(1000, 0.002), (2000, 0.001)], world=2)
    with pytest.raises(ConfigError, match="one-rank"):
        fit_link([(1000, 0.001), (2000, 0.002)], world=1)
