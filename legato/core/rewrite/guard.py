"""The no-regression guard: candidates from the search are measured against the original as
whole models, and only one measured faster, twice, with equal outputs comes back; where the
measurements contradict the cost model's prediction, the cost entries behind it are suspect.

`judge` takes the original and a few candidates (the best predicted one and the unsure ones
the search handed back), loads each in onnxruntime, compares its outputs with the original's
on the same inputs, and times all that agree together with the original in interleaved rounds
(one A/B for all, so drift hits all alike). The fastest candidate at least `min_speedup` faster
(median of the per-round ratios) and faster in at least three rounds of four (their lower
quartile at least 1) is confirmed by a second A/B with fresh sessions in the opposite order,
held to the same two conditions. For each candidate
the predicted gain (original's predicted time over the candidate's) is set against the
measured one; when they differ by more than the measurement's own noise plus the
prediction's error (and 5%), the candidate *disagrees*, and the cost entries its prediction
rested on are listed for re-measuring.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable

from legato.core.rewrite.measure import ab_time, compare_outputs, session

__all__ = ["Offer", "Verdict", "judge"]


@dataclasses.dataclass
class Offer:
    """A candidate for the guard: what the search predicted and how to run it."""

    label: str
    applied: list[str]
    predicted_s: float
    error_s: float
    runnable: Any                        # a ModelProto or a path onnxruntime can load
    keys: frozenset[str] = frozenset()   # cost entries its prediction used
    payload: Any = None                  # handed back with the verdict (the finished model)
    # filled by `judge`
    equal: bool | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    measured_s: float | None = None
    ratio: float | None = None           # original time / this one's, median of rounds
    noise: float | None = None           # relative spread of the per-round ratios
    low: float | None = None             # their lower quartile
    why: str = ""                        # why it was not taken

    def to_json(self) -> dict:
        return {"label": self.label, "rules": len(self.applied),
                "rules_applied": sorted(set(self.applied)),
                "predicted_ms": self.predicted_s * 1e3, "error_ms": self.error_s * 1e3,
                "measured_ms": None if self.measured_s is None else self.measured_s * 1e3,
                "ratio": self.ratio, "noise": self.noise, "equal": self.equal,
                "max_abs_error": self.max_abs, "why": self.why}


@dataclasses.dataclass
class Verdict:
    """What the guard decided and measured."""

    chosen: Offer | None
    original_s: float | None
    offers: list[Offer]
    first: float | None = None           # the chosen one's ratio in the first A/B
    second: float | None = None          # and in the confirmation
    disagree: list[Offer] = dataclasses.field(default_factory=list)
    reason: str = ""


def _ratio_stats(orig: list[float], cand: list[float]) -> tuple[float, float, float]:
    """Per round, original time over the candidate's (a round runs both, so drift cancels):
    (median, relative spread (IQR over median), lower quartile)."""
    ratios = [a / b for a, b in zip(orig, cand) if b > 0]
    med = statistics.median(ratios)
    if len(ratios) >= 4:
        q = statistics.quantiles(ratios, n=4)
        return med, (q[2] - q[0]) / med, q[0]
    return med, (max(ratios) - min(ratios)) / med, min(ratios)


def judge(original: Any, offers: list[Offer], *, predicted_original_s: float,
          original_error_s: float, feeds: list[dict], level: str, threads: int,
          rounds: int, rtol: float, atol: float, min_speedup: float,
          on_error: Callable[[Offer, Exception], None] | None = None) -> Verdict:
    """Measure `offers` against `original` (see the module docstring)."""
    try:
        base = session(original, level=level, threads=threads)
    except Exception as err:  # noqa: BLE001 (the reason is the answer)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        verdict = Verdict(None, None, offers)
        verdict.reason = (f"onnxruntime cannot run the original model here ({first}), so no "
                          "rewrite can be checked or timed against it")
        for offer in offers:
            offer.why = verdict.reason
        return verdict
    live: dict[str, Any] = {}
    for offer in offers:
        try:
            sess = session(offer.runnable, level=level, threads=threads)
        except Exception as err:  # noqa: BLE001 (a broken candidate never comes back)
            offer.why = f"did not load ({type(err).__name__}: {str(err).splitlines()[0]})"
            if on_error is not None:
                on_error(offer, err)
            continue
        same = compare_outputs(base, sess, feeds, rtol=rtol, atol=atol)
        offer.equal, offer.max_abs, offer.max_rel = same["equal"], same["max_abs"], same["max_rel"]
        if not same["equal"]:
            offer.why = (f"outputs differ beyond rtol={rtol}, atol={atol} (max abs error "
                         f"{same['max_abs']:.3g})")
            continue
        live[offer.label] = sess
    verdict = Verdict(None, None, offers)
    if not live:
        verdict.reason = "; ".join(f"{o.label}: {o.why}" for o in offers) or "no candidate"
        return verdict
    timed = ab_time({"original": base, **live}, feeds[0], rounds=rounds)
    verdict.original_s = timed["original"]["median_s"]
    for offer in offers:
        if offer.label not in live:
            continue
        offer.measured_s = timed[offer.label]["median_s"]
        offer.ratio, offer.noise, offer.low = _ratio_stats(timed["original"]["times"],
                                                           timed[offer.label]["times"])
        if offer.predicted_s > 0:
            predicted = predicted_original_s / offer.predicted_s
            rel_error = math.hypot(offer.error_s / offer.predicted_s,
                                   original_error_s / max(predicted_original_s, 1e-12))
            allowed = 0.05 + offer.noise + rel_error
            if abs(math.log(offer.ratio / predicted)) > math.log1p(allowed):
                verdict.disagree.append(offer)
    ranked = sorted((o for o in offers if o.label in live), key=lambda o: -o.ratio)
    best = ranked[0]
    for o in ranked:
        if o is not best:
            o.why = o.why or f"measured {o.ratio:.3f}x, {best.label} was faster"
    floor = min(1.0, min_speedup)    # asked for less than 1x: slower rounds are allowed
    if best.ratio >= min_speedup and best.low < floor:
        best.why = (f"not measured faster beyond this machine's noise: a median of "
                    f"{best.ratio:.3f}x, but slower in more than a quarter of the {rounds} "
                    f"rounds (lower quartile {best.low:.3f}x)")
        verdict.reason = best.why
        return verdict
    if best.ratio < min_speedup:
        what = (f"not measured faster by {min_speedup:.2f}x" if min_speedup >= 1 else
                f"measured below the {min_speedup:.2f}x asked")
        best.why = (f"{what} ({best.measured_s * 1e3:.3f} ms against "
                    f"{verdict.original_s * 1e3:.3f} ms, {best.ratio:.3f}x, median of {rounds} "
                    "rounds)")
        verdict.reason = best.why
        return verdict
    # confirm with fresh sessions in the opposite order: a first win can be drift or noise
    again = ab_time({"rewritten": session(best.runnable, level=level, threads=threads),
                     "original": session(original, level=level, threads=threads)},
                    feeds[0], rounds=rounds)
    second, _, second_low = _ratio_stats(again["original"]["times"],
                                         again["rewritten"]["times"])
    verdict.first, verdict.second = best.ratio, second
    if second < min_speedup or second_low < floor:
        best.why = (f"not measured faster on confirmation: a first A/B measured "
                    f"{best.ratio:.3f}x, fresh sessions in the opposite order {second:.3f}x "
                    f"(lower quartile {second_low:.3f}x; {min_speedup:.2f}x asked, and faster "
                    "in three rounds of four)")
        verdict.reason = best.why
        return verdict
    verdict.original_s = (verdict.original_s + again["original"]["median_s"]) / 2
    best.measured_s = (best.measured_s + again["rewritten"]["median_s"]) / 2
    verdict.chosen = best
    speedup = verdict.original_s / best.measured_s
    verdict.reason = (f"measured {speedup:.3f}x {'faster' if speedup >= 1 else 'as fast'} with "
                      f"equal outputs (two A/B runs: {best.ratio:.3f}x, {second:.3f}x)")
    return verdict
