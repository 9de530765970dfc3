"""The adaptive policy's choice between waiting, hedging and parity (no I/O here).

`TailModel` keeps each base worker's recent response times (sent to answered, queueing
included) and the share of queries each worker was given, and predicts the tail quantile
(p99.9 by default) of a query's latency under each mode:

- wait: the query is answered when its worker answers: miss(T) = sum_w share_w * S_w(T);
- hedge: a copy goes to an extra worker after the hedge delay d (the pooled p95, or the
  configured `--hedge-ms`): miss(T) = sum_w share_w * S_w(T) * S_not_w(T - d);
- parity: the query is rebuilt once the k other outputs of its group (k - 1 originals and the
  parity output, on other workers, sent after a group-forming wait g) are in:
  miss(T) = sum_w share_w * S_w(T) * (1 - (1 - S_not_w(T - g)) ** k).

S_w is worker w's empirical survival function (the fraction of its responses slower than T);
S_not_w pools the other workers, weighted by share, and stands in for the extra workers too.
Modelling workers apart matters when slowness belongs to a worker (a slowed link, a CPU hog):
a group's other members then run elsewhere, and the independence of a pooled model would
count that worker's slowness twice.

`AdaptiveChooser` re-predicts every `every` queries and keeps its mode unless another is
predicted 20% faster (`switch_gain`). This hysteresis matters: flapping between modes would
split coding groups and load the extra workers with both kinds of work. It waits rather than adds copies
when waiting is predicted within `wait_slack` of the best; it never codes when the parity
model's measured accuracy is too low; and until enough responses are seen it hedges.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

__all__ = ["AdaptiveChooser", "TailModel", "MODES"]

MODES = ("wait", "hedge", "parity")


class TailModel:
    def __init__(self, window: int = 500, quantile: float = 0.999) -> None:
        self.window, self.quantile = window, quantile
        self._ms: dict[int, collections.deque] = {}
        self._sent: collections.deque = collections.deque(maxlen=window * 4)

    def dispatched(self, worker: int) -> None:
        """A query was given to `worker` (the shares come from the last few thousand)."""
        self._sent.append(worker)

    def observe(self, worker: int, ms: float) -> None:
        self._ms.setdefault(worker, collections.deque(maxlen=self.window)).append(ms)

    @property
    def samples(self) -> int:
        return sum(len(d) for d in self._ms.values())

    def pooled_percentile(self, pct: float) -> float:
        return float(np.percentile(np.concatenate([np.asarray(d) for d in self._ms.values()]),
                                   pct))

    def predict(self, k: int, hedge_ms: float | None = None, group_wait_ms: float = 0.0
                ) -> dict[str, float]:
        """The predicted quantile (ms) of a query's latency under each mode."""
        workers = [w for w, d in self._ms.items() if d]
        if not workers:
            raise ValueError("no response times observed yet")
        counts = collections.Counter(w for w in self._sent if w in self._ms)
        share = np.array([counts.get(w, 0) + 1.0 for w in workers])   # +1: never-picked ones
        share /= share.sum()
        times = [np.sort(np.asarray(self._ms[w])) for w in workers]
        d = hedge_ms if hedge_ms is not None else self.pooled_percentile(95)
        # every miss function below steps only where T, T - d or T - g is an observed time
        seen = np.concatenate(times)
        grid = np.unique(np.concatenate([seen, seen + d, seen + group_wait_ms]))

        def surv(t: np.ndarray, at: np.ndarray) -> np.ndarray:
            return 1.0 - np.searchsorted(t, at, side="right") / len(t)

        own = np.stack([surv(t, grid) for t in times])                     # [W, T]
        late_h = np.stack([surv(t, grid - d) for t in times])
        late_g = np.stack([surv(t, grid - group_wait_ms) for t in times])
        miss = {"wait": np.zeros_like(grid), "hedge": np.zeros_like(grid),
                "parity": np.zeros_like(grid)}
        for i in range(len(workers)):
            rest = np.delete(np.arange(len(workers)), i)
            if len(rest):
                wts = share[rest] / share[rest].sum()
                other_h, other_g = wts @ late_h[rest], wts @ late_g[rest]
            else:
                other_h, other_g = late_h[i], late_g[i]
            miss["wait"] += share[i] * own[i]
            miss["hedge"] += share[i] * own[i] * np.where(grid - d < 0, 1.0, other_h)
            miss["parity"] += share[i] * own[i] * (1 - (1 - other_g) ** k)
        target = 1.0 - self.quantile
        return {m: float(grid[np.argmax(v <= target)]) for m, v in miss.items()}


@dataclasses.dataclass
class AdaptiveChooser:
    k: int
    parity_ok: bool = True
    every: int = 100
    min_samples: int = 200
    switch_gain: float = 0.8
    wait_slack: float = 1.02
    model: TailModel = dataclasses.field(default_factory=TailModel)
    mode: str = "hedge"
    predicted: dict = dataclasses.field(default_factory=dict)
    _count: int = 0

    def choose(self, hedge_ms: float | None = None, group_wait_ms: float = 0.0) -> str:
        """The mode for the next query."""
        self._count += 1
        if (self._count - 1) % self.every == 0:
            self._update(hedge_ms, group_wait_ms)
        return self.mode

    def _update(self, hedge_ms: float | None, group_wait_ms: float) -> None:
        if self.model.samples < self.min_samples:
            return
        pred = self.model.predict(self.k, hedge_ms, group_wait_ms)
        if not self.parity_ok:
            pred.pop("parity")
        self.predicted = pred
        best = min(pred, key=lambda m: (pred[m], MODES.index(m)))
        if pred["wait"] <= self.wait_slack * pred[best]:
            best = "wait"
        if best != self.mode and (self.mode not in pred or
                                  pred[best] < self.switch_gain * pred[self.mode] or
                                  best == "wait"):
            self.mode = best
