"""Settings chosen by the simulator at start-up (the defaults that pay without tuning).

A job that gives no sizes starts on the fixed defaults; after a few steps each rank knows its
layers' forward, backward and update times from those live steps (compute slowed by the
communication beside it, as it will be), the ranks time a few all-reduces to fit the link
(`fit_link`), and rank 0 simulates every setting the tuner would search (partition sizes
from 64 KiB to the largest gradient, windows of 1 to 16 partitions) and `plain`, and keeps the
fastest; `plain` unless a scheduled setting is predicted at least `margin` faster (the
pass-through rule). What a message costs beyond the wire is fitted first (`per_message_cost`):
the per-message charge that makes the simulator reproduce the step time the start-up steps
measured under the fixed defaults; without it an all-reduce-fitted link, whose alpha is near 0
on a shaped link, ranked 128 KiB partitions first, which measured 0.6-0.9x DDP. The adapters do
the measuring and the switch; this module decides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from legato.core.scheduler.plan import ChunkPlan, CommTask
from legato.core.scheduler.policy import SchedulerConfig, plan_for, resolve_config
from legato.core.scheduler.simulate import LayerCost, LinkModel, simulate
from legato.core.scheduler.tune import _config, search_space

__all__ = ["choose_by_simulation", "per_message_cost"]


def _charged(link: LinkModel, extra_s: float) -> LinkModel:
    """`link` with `extra_s` more per message."""
    return dataclasses.replace(link, alpha_s=link.alpha_s + extra_s)


def _step_s(plan: ChunkPlan, layers: Sequence[LayerCost], config: SchedulerConfig,
            link: LinkModel, steps: int) -> float:
    """The simulated step time of `config` (plain runs without proxies, as the adapters do)."""
    return simulate(plan, layers, config, link, steps=steps,
                    overlap=config.policy != "plain").step_s


def per_message_cost(tasks: Sequence[CommTask], layers: Sequence[LayerCost], link: LinkModel,
                     config: SchedulerConfig, measured_s: float, *, steps: int = 6,
                     limit_s: float = 0.05) -> float:
    """The cost per message, on top of the link's alpha, that makes the simulator give the
    step time measured under `config` (bisection; 0 when the simulator is already as slow).
    What a message costs beyond the wire (the scheduler's Python, the leader's announcement,
    gloo's threads on shared cores) is what ranks small partitions against large ones."""
    plan = plan_for(config, tasks)

    def step(extra: float) -> float:
        return _step_s(plan, layers, config, _charged(link, extra), steps)

    if step(0.0) >= measured_s:
        return 0.0
    lo, hi = 0.0, limit_s
    if step(hi) <= measured_s:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step(mid) < measured_s else (lo, mid)
    return (lo + hi) / 2


def choose_by_simulation(tasks: Sequence[CommTask], layers: Sequence[LayerCost],
                         link: LinkModel, *, merge_bytes: int | None = None,
                         announce_s: float = 0.0, margin: float = 0.02,
                         steps: int = 6, candidates: Sequence[SchedulerConfig] | None = None
                         ) -> tuple[SchedulerConfig, dict[str, Any]]:
    """The setting the simulator predicts fastest for these measurements.

    Args:
        tasks: the model's gradients (as the adapter plans them).
        layers: per layer, forward, backward and update seconds of the live steps.
        link: the fitted link.
        merge_bytes: the merge size of the scheduled settings (None: the default).
        announce_s: what the leader's announcement of each message costs (scheduled
            settings with a window pay it on top of the link's alpha).
        margin: `plain` is kept unless a scheduled setting is predicted this much faster.
        candidates: the scheduled settings to weigh against `plain` (default: the tuner's grid
            of partition sizes and windows; defaults="fixed-or-plain" gives the fixed one).
    Returns:
        (the setting, a report: every setting's predicted step time, the choice).
    """
    plain = resolve_config("plain")
    if candidates is not None:
        scheduled = list(candidates)
    else:
        (plo, phi), (clo, chi) = search_space(max(t.nbytes for t in tasks))
        scheduled = [_config(lp, lc, merge_bytes) for lp in range(plo, phi + 1)
                     for lc in range(clo, chi + 1)]
    announced = _charged(link, announce_s)
    predicted = {config: _step_s(plan_for(config, tasks), layers, config,
                                 link if config.policy == "plain" else announced, steps)
                 for config in [plain, *scheduled]}
    best = min(scheduled, key=lambda c: (predicted[c], c.partition_bytes, c.credit_bytes))
    choice = best if predicted[best] <= predicted[plain] * (1 - margin) else plain
    report = {"chosen": choice.describe(),
              "predicted_s": {c.describe(): t for c, t in predicted.items()},
              "best_scheduled": best.describe(), "plain_s": predicted[plain],
              "best_s": predicted[best]}
    return choice, report
