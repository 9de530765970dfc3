"""Settings chosen by the simulator at start-up (legato/core/scheduler/startup.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("optuna", reason="optuna is not installed (make setup installs it)")

from legato.core.scheduler.plan import CommTask  # noqa: E402
from legato.core.scheduler.policy import plan_for, resolve_config  # noqa: E402
from legato.core.scheduler.simulate import LayerCost, LinkModel, simulate  # noqa: E402
from legato.core.scheduler.startup import choose_by_simulation  # noqa: E402
from legato.core.scheduler.tune import _config, search_space  # noqa: E402

# A VGG-like model: small convolutions in front, large fully connected layers at the back.
SIZES = [7_000, 74_000, 295_000, 590_000, 1_180_000, 2_360_000, 16_800_000, 4_200_000, 41_000]
FWD = [0.004, 0.006, 0.006, 0.005, 0.004, 0.003, 0.002, 0.001, 0.0005]
LAYERS = [LayerCost(f"l{i}", f, 2 * f, 0.0003) for i, f in enumerate(FWD)]
TASKS = [CommTask(i, f"l{i}.weight", i, n) for i, n in enumerate(SIZES)]


def test_a_slow_link_gets_the_fastest_scheduled_setting_of_the_grid():
    """At 1000 Mbit/s communication is about twice forward plus backward: the choice is the
    grid's fastest bytescheduler setting by the simulator (checked here by simulating every
    one), well ahead of plain."""
    link = LinkModel(alpha_s=0.0004, bytes_per_s=1000e6 / 8)
    config, report = choose_by_simulation(TASKS, LAYERS, link)
    (plo, phi), (clo, chi) = search_space(max(SIZES))
    grid = [_config(lp, lc, None) for lp in range(plo, phi + 1) for lc in range(clo, chi + 1)]
    times = {c: simulate(plan_for(c, TASKS), LAYERS, c, link).step_s for c in grid}
    assert config.policy == "bytescheduler"
    assert times[config] == pytest.approx(min(times.values()))
    assert report["best_s"] < 0.98 * report["plain_s"]
    assert len(report["predicted_s"]) == len(grid) + 1
    assert report["chosen"] == config.describe()


def test_a_fast_link_keeps_plain_and_the_announcement_cost_counts():
    """A link far faster than the messages need: no setting beats plain by the margin. A
    per-message announcement cost is charged to the scheduled settings only."""
    fast = LinkModel(alpha_s=0.00005, bytes_per_s=40e9)
    config, report = choose_by_simulation(TASKS, LAYERS, fast)
    assert config == resolve_config("plain")
    slow = LinkModel(alpha_s=0.0004, bytes_per_s=1000e6 / 8)
    _, cheap = choose_by_simulation(TASKS, LAYERS, slow)
    _, dear = choose_by_simulation(TASKS, LAYERS, slow, announce_s=0.002)
    assert dear["plain_s"] == cheap["plain_s"] and dear["best_s"] > cheap["best_s"]
    merged, _ = choose_by_simulation(TASKS, LAYERS, slow, merge_bytes=4096)
    assert merged.merge_bytes == 4096


def test_candidates_limit_the_choice_to_one_setting_or_plain():
    """defaults='fixed-or-plain': only the given setting is weighed against plain; on a slow
    link it is kept, on a fast one plain wins."""
    fixed = resolve_config("bytescheduler")
    slow = LinkModel(alpha_s=0.0004, bytes_per_s=1000e6 / 8)
    config, report = choose_by_simulation(TASKS, LAYERS, slow, candidates=[fixed])
    assert config == fixed and len(report["predicted_s"]) == 2
    fast = LinkModel(alpha_s=0.00005, bytes_per_s=40e9)
    config, _ = choose_by_simulation(TASKS, LAYERS, fast, candidates=[fixed])
    assert config == resolve_config("plain")


def test_the_per_message_cost_makes_the_simulator_give_the_measured_step():
    """The charge per message that brings the simulated step of the measured setting to the
    measured time: found by bisection, 0 when the simulator is already as slow, capped."""
    from legato.core.scheduler.startup import per_message_cost

    link = LinkModel(alpha_s=0.0, bytes_per_s=1000e6 / 8)
    config = resolve_config("bytescheduler")
    plan = plan_for(config, TASKS)
    base = simulate(plan, LAYERS, config, link).step_s
    extra = per_message_cost(TASKS, LAYERS, link, config, base * 1.1)
    assert extra > 0
    charged = LinkModel(alpha_s=extra, bytes_per_s=link.bytes_per_s)
    assert simulate(plan, LAYERS, config, charged).step_s == pytest.approx(base * 1.1, rel=1e-3)
    assert per_message_cost(TASKS, LAYERS, link, config, base * 0.9) == 0.0
    assert per_message_cost(TASKS, LAYERS, link, config, base * 100, limit_s=0.01) == 0.01
    # charged that way, small partitions lose their edge over large ones
    small = _config(16, 0, None)
    big = _config(21, 1, None)
    cost = lambda c, lk: simulate(plan_for(c, TASKS), LAYERS, c, lk).step_s  # noqa: E731
    assert cost(small, charged) / cost(big, charged) > cost(small, link) / cost(big, link)
