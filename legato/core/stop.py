"""Why a search stopped: one vocabulary for every bounded search in legato (after egg's
`StopReason`).

The rewrite search (`rewrite.search`), rule generation (`rewrite.generate`), the pipeline
planner (`pipeline.plan`, its state space and its sync objective) and the scheduler's online
tuner (`scheduler.tune.OnlineTuner`) each take explicit limits and return a `stop_reason`
that is one of these members. A member is a `str` whose value is its kebab-case name, so it
prints, compares (`result.stop_reason == "budget"`) and goes into JSON as that string.

Whether an answer is the best the search could give follows from the reason: after
`EXHAUSTED` or `CONVERGED` nothing was left out; after `BUDGET` or `TIME_LIMIT` a limit cut the
search short, and a larger limit may find a better answer.
"""

from __future__ import annotations

import enum

__all__ = ["StopReason"]

# values older versions wrote, read back as today's members
_LEGACY = {"done": "exhausted"}


class StopReason(str, enum.Enum):
    """Why a bounded search stopped (see the module docstring)."""

    def __new__(cls, value: str, doc: str) -> "StopReason":
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    EXHAUSTED = ("exhausted",
                 "Everything within the search's own bounds was explored: the rewrite queue ran "
                 "empty, every graph up to `max_ops` operators was enumerated, every cut point "
                 "was planned over, every candidate bound was tried.")
    CONVERGED = ("converged",
                 "The search proved that nothing left could beat its answer and stopped early "
                 "(the sync planner, once a larger bound on the slowest stage cannot win).")
    BUDGET = ("budget",
              "A count limit was reached (graphs explored, cut points, candidate bounds, "
              "tuning trials); what was left unexplored might hold a better answer.")
    TIME_LIMIT = ("time-limit",
                  "The wall-clock limit was reached; the answer is the best found by then.")

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def complete(self) -> bool:
        """True when no limit cut the search short (EXHAUSTED or CONVERGED)."""
        return self in (StopReason.EXHAUSTED, StopReason.CONVERGED)

    @classmethod
    def _missing_(cls, value: object) -> "StopReason | None":
        if isinstance(value, str):
            legacy = _LEGACY.get(value.strip().lower())
            if legacy is not None:
                return cls(legacy)
        raise ValueError(f"{value!r} is not a stop reason; known: "
                         f"{[m.value for m in cls]}")
