"""Seeded, replayable faults for model workers (the fault injector's in-worker half).

`FaultSpec.parse("pause=0.03,alpha=1.5,scale_ms=10,delay_ms=0,seed=1")`:
- `pause`: the probability that a request is preceded by a pause;
- `alpha`, `scale_ms`: the pause is Pareto-distributed, scale_ms * Pareto(alpha) ms (heavy
  tailed: alpha 1.5 has a finite mean and an infinite variance);
- `delay_ms`: a fixed extra delay on every request (a slowed link to this worker);
- `seed`: the draws depend only on the seed and the request's position in the worker's order,
  so a run replays exactly;
- `hog`: this many busy-looping processes started beside the worker (a noisy neighbour taking
  CPU from it and, on a small machine, from everything else); they exit with the worker.

A worker killed with SIGKILL is injected from outside (the benchmark does it through the
pids in `/v1/health`); the frontend restarts it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from legato.core.errors import ConfigError

__all__ = ["FaultSpec", "Faults", "start_hogs"]

_HOG = """
import os, sys, time
parent = int(sys.argv[1])
while os.getppid() == parent:
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        pass
"""


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    pause: float = 0.0
    alpha: float = 1.5
    scale_ms: float = 10.0
    delay_ms: float = 0.0
    seed: int = 0
    hog: int = 0

    @classmethod
    def parse(cls, text: str | None) -> "FaultSpec":
        """`"pause=0.03,alpha=1.5,scale_ms=10,delay_ms=0,seed=1"` (any subset; "" = none)."""
        if not text:
            return cls()
        values: dict = {}
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for item in text.split(","):
            key, sep, raw = item.strip().partition("=")
            if not sep or key not in fields:
                raise ConfigError(f"fault spec item {item!r} is not KEY=VALUE with KEY one of "
                                  f"{', '.join(fields)} (e.g. pause=0.03,alpha=1.5,seed=1)")
            try:
                values[key] = int(raw) if key in ("seed", "hog") else float(raw)
            except ValueError:
                raise ConfigError(f"fault spec {key}={raw!r} is not a number") from None
        spec = cls(**values)
        if (not 0 <= spec.pause <= 1 or spec.alpha <= 0 or spec.scale_ms < 0
                or spec.delay_ms < 0 or not 0 <= spec.hog <= 16):
            raise ConfigError(f"fault spec {text!r}: pause must be in [0, 1], alpha > 0, "
                              "scale_ms and delay_ms >= 0, hog in 0..16")
        return spec


    def with_seed(self, seed: int) -> "FaultSpec":
        return dataclasses.replace(self, seed=seed)

    def format(self) -> str:
        """The spec as `parse` reads it."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


class Faults:
    """Draws each request's extra delay (seconds) from a spec, in request order."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self._rng = np.random.default_rng(spec.seed)

    def next_delay_s(self) -> float:
        s = self.spec
        u, p = self._rng.random(), self._rng.pareto(s.alpha) + 1.0   # classic Pareto, x_m = 1
        pause = s.scale_ms * p if u < s.pause else 0.0
        return (pause + s.delay_ms) / 1000.0


def start_hogs(n: int) -> list:
    """Start n busy-looping processes beside this one; each exits within 0.2 s once this
    process is gone. Returns their Popen handles (kill them to stop earlier)."""
    import os
    import subprocess
    import sys

    return [subprocess.Popen([sys.executable, "-c", _HOG, str(os.getpid())],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]
