"""The adaptive policy's predictions and choices, on synthetic response times whose right
answer is known: independent rare stragglers (hedge), one slow worker (parity), no stragglers
(wait), an inaccurate parity model (never parity)."""

import numpy as np
import pytest

from legato.core.parity.adaptive import AdaptiveChooser, TailModel


def responses(model, n=4000, workers=8, pause=0.0, slow_worker=None, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        w = i % workers
        model.dispatched(w)
        ms = 20 + rng.exponential(2)
        if rng.random() < pause:
            ms += 40 * (rng.pareto(1.5) + 1)
        if w == slow_worker:
            ms += 200
        model.observe(w, ms)
    return model


@pytest.mark.parametrize("k", [2, 4])
def test_rare_independent_stragglers_are_best_hedged(k):
    """A 3% chance of a Pareto pause on every request: a hedged copy is late only if it also
    pauses (p^2), a rebuilt answer if any of k others does (about k p^2)."""
    pred = responses(TailModel(), pause=0.03).predict(k, None, 5.0)
    assert pred["hedge"] < pred["parity"] < pred["wait"] / 3, pred


@pytest.mark.parametrize("k", [2, 4])
def test_one_slow_worker_is_best_coded(k):
    """One worker of 8 answers 200 ms late: its share (1/8) is above 5%, so the p95 hedge
    delay lands in its slowness and hedging cannot help; its group's other members run on
    other workers and rebuild its answers."""
    pred = responses(TailModel(), slow_worker=0).predict(k, None, 5.0)
    assert pred["parity"] < 60 < 200 < pred["hedge"] <= pred["wait"], pred


def test_the_chooser_hedges_while_warming_up_then_follows_the_predictions():
    chooser = AdaptiveChooser(k=2, min_samples=200, every=1)
    assert chooser.choose() == "hedge"                   # nothing seen yet
    responses(chooser.model, slow_worker=0)
    assert chooser.choose(group_wait_ms=5.0) == "parity"
    assert chooser.predicted["parity"] < chooser.predicted["hedge"]


def test_without_stragglers_it_waits():
    chooser = AdaptiveChooser(k=2, min_samples=100, every=1)
    responses(chooser.model, n=2000)
    # a rebuilt answer can beat a slightly late original, but not by the 20% a switch needs
    assert chooser.choose(group_wait_ms=5.0) in ("wait", "hedge")
    chooser = AdaptiveChooser(k=2, min_samples=100, every=1, mode="wait")
    responses(chooser.model, n=2000)
    assert chooser.choose(group_wait_ms=5.0) == "wait"


def test_an_inaccurate_parity_model_is_never_used():
    chooser = AdaptiveChooser(k=2, parity_ok=False, min_samples=100, every=1)
    responses(chooser.model, slow_worker=0)
    assert chooser.choose(group_wait_ms=5.0) != "parity"
    assert "parity" not in chooser.predicted


def test_hysteresis_keeps_the_mode_for_a_small_predicted_gain():
    """One slow worker: parity is predicted about 6x faster than hedging. A chooser that
    switches only for a 10x gain keeps hedging; one that switches for 2x codes."""
    for gain, mode in ((0.1, "hedge"), (0.5, "parity")):
        chooser = AdaptiveChooser(k=2, min_samples=100, every=1, switch_gain=gain)
        responses(chooser.model, slow_worker=0)
        assert chooser.choose(group_wait_ms=5.0) == mode, chooser.predicted


def test_predicting_before_any_response_is_an_error():
    with pytest.raises(ValueError, match="no response"):
        TailModel().predict(2)
