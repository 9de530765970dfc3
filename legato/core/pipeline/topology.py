"""Machine topologies for the planner, and the unit parsing its CLI needs.

A topology is a list of levels, innermost first (as PipeDream's `-n`/`-b` flags): level 1 is
`workers` accelerators joined at `bandwidth_Bps` (say, 4 GPUs on NVLink in one server); level 2
is that many level-1 units joined at its own bandwidth (4 servers on 10 GbE), and so on.
`Topology.parse("4x4", "10GB/s,1.25GB/s")` is that example: 16 workers.
"""

from __future__ import annotations

import dataclasses
import math
import re

from legato.core.errors import ConfigError

__all__ = ["Level", "Topology", "parse_bandwidth", "parse_bytes"]

_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8}


def parse_bytes(text: str | float | int, *, what: str = "size") -> float:
    """`16GiB`, `16GB`, `512MiB` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m[2].lower() if m else None
        if m is None or unit not in _BYTES:
            raise ConfigError(f"{what} {text!r} is not a size; write e.g. 16GiB, 16GB, 512MiB "
                              "or a number of bytes")
        value = float(m[1]) * _BYTES[unit]
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{what} {text!r} must be positive")
    return value


def parse_bandwidth(text: str | float | int) -> float:
    """Bytes per second from `10GB/s`, `1.25GB/s`, `10Gbit/s`, `100MiB/s` or a number (B/s)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)(?:/s|ps)?\s*",
                         str(text))
        unit = m[2].lower() if m else None
        if unit in ("gbps", "mbps", "kbps"):      # 10Gbps = bits, as network people write it
            unit = unit[:-3] + "bit"
        if m is None or (unit not in _BYTES and unit not in _BITS):
            raise ConfigError(f"bandwidth {text!r} is not understood; write e.g. 10GB/s "
                              "(bytes), 10Gbit/s (bits), 100MiB/s, or a number of bytes/s")
        value = float(m[1]) * (_BYTES.get(unit) or _BITS[unit])
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"bandwidth {text!r} must be positive")
    return value


@dataclasses.dataclass(frozen=True)
class Level:
    """`workers` units of the level below (or accelerators, at level 1) at `bandwidth_Bps`."""

    workers: int
    bandwidth_Bps: float

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers={self.workers!r} per level must be an integer >= 1")
        if not (self.bandwidth_Bps > 0 and math.isfinite(self.bandwidth_Bps)):
            raise ConfigError(f"bandwidth_Bps={self.bandwidth_Bps!r} must be positive")


@dataclasses.dataclass(frozen=True)
class Topology:
    """Levels innermost first; `workers` is their product."""

    levels: tuple[Level, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ConfigError("a topology needs at least one level")

    @property
    def workers(self) -> int:
        return math.prod(level.workers for level in self.levels)

    @classmethod
    def flat(cls, workers: int, bandwidth: str | float = "1GB/s") -> "Topology":
        return cls((Level(int(workers), parse_bandwidth(bandwidth)),))

    @classmethod
    def parse(cls, shape: str, bandwidths: str) -> "Topology":
        """`"4x4"` and `"10GB/s,1.25GB/s"`: workers and bandwidth per level, innermost first."""
        try:
            counts = [int(x) for x in str(shape).lower().split("x")]
        except ValueError:
            raise ConfigError(f"topology {shape!r} is not like 4x4 (workers per level, "
                              "innermost first)") from None
        rates = [parse_bandwidth(b) for b in str(bandwidths).split(",") if b.strip()]
        if len(rates) == 1 and len(counts) > 1:
            rates = rates * len(counts)
        if len(rates) != len(counts):
            raise ConfigError(f"topology {shape!r} has {len(counts)} levels but "
                              f"{len(rates)} bandwidths were given ({bandwidths!r}); give one "
                              "per level, innermost first, e.g. --bandwidth 10GB/s,1.25GB/s")
        return cls(tuple(Level(c, r) for c, r in zip(counts, rates)))

    def describe(self) -> str:
        parts = [f"{lv.workers} at {lv.bandwidth_Bps / 1e9:g} GB/s" for lv in self.levels]
        return f"{self.workers} workers ({' x '.join(parts)}, innermost first)"

    def to_json(self) -> list[dict]:
        return [{"workers": lv.workers, "bandwidth_Bps": lv.bandwidth_Bps} for lv in self.levels]
