"""Coding groups as the serving frontend keeps them (no I/O here; the frontend drives them).

`GroupFormer` collects queries from different users into groups of k. A group closes when k
queries are in, or when its oldest query has waited `timeout_s`. A partial group is padded with
the zero query, whose prediction the frontend knows in advance (`pad_output`), so it never has
to be computed.

`CodingGroup` tracks the k originals and the parity query of one group:
- `answer(i, output)` records an original's prediction;
- `answer_parity(output)` records the parity model's;
- as soon as any k of the k + 1 outputs are in, `decodable()` names the one original still
  missing, and `decode()` rebuilds it;
- `useless()` says which pending work can be cancelled: the parity query once every original is
  in, or an original once it was rebuilt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from legato.core.errors import ConfigError
from legato.core.parity.codes import Encoder, SubtractionDecoder

__all__ = ["CodingGroup", "GroupFormer", "PARITY"]

PARITY = -1
"""The slot of the parity query in a group (originals are 0 .. k - 1)."""


@dataclasses.dataclass
class _Member:
    query: np.ndarray
    tag: Any                       # the frontend's handle for the user's request
    padding: bool = False


class CodingGroup:
    """One group of k queries and its parity query."""

    def __init__(self, gid: int, members: list[_Member], encoder: Encoder,
                 pad_output: np.ndarray | None) -> None:
        self.gid = gid
        self.k = encoder.k
        self.members = members
        self.parity_query = encoder.encode(np.stack([m.query for m in members]))
        self._outputs: dict[int, np.ndarray] = {}
        self._parity: np.ndarray | None = None
        self._rebuilt: dict[int, np.ndarray] = {}
        self._decoder = SubtractionDecoder(self.k)
        for i, m in enumerate(members):
            if m.padding:
                if pad_output is None:
                    raise ConfigError("a padded group needs pad_output, the base model's "
                                      "prediction for the zero query")
                self._outputs[i] = np.asarray(pad_output)

    @property
    def tags(self) -> list[Any]:
        return [m.tag for m in self.members if not m.padding]

    def real_positions(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if not m.padding]

    def answer(self, i: int, output: np.ndarray) -> None:
        if not 0 <= i < self.k or self.members[i].padding:
            raise ConfigError(f"group {self.gid} has no real query at position {i}")
        self._outputs.setdefault(i, np.asarray(output))

    def answer_parity(self, output: np.ndarray) -> None:
        if self._parity is None:
            self._parity = np.asarray(output)

    def decodable(self) -> int | None:
        """The one original still missing, if the other k outputs (parity included) are in."""
        missing = [i for i in range(self.k) if i not in self._outputs and i not in self._rebuilt]
        if self._parity is not None and len(missing) == 1:
            return missing[0]
        return None

    def decode(self) -> tuple[int, np.ndarray]:
        """Rebuild the missing original: (its position, the rebuilt prediction)."""
        i = self.decodable()
        if i is None:
            raise ConfigError(f"group {self.gid} cannot decode: it needs the parity output and "
                              f"all but one original ({sorted(self._outputs)} are in)")
        out = self._decoder.decode({j: self._outputs[j] for j in range(self.k) if j != i},
                                   self._parity, i)
        self._rebuilt[i] = out
        return i, out

    def useless(self) -> list[int]:
        """Slots whose pending work no longer matters: the parity query once every original is
        in; an original once it was rebuilt (its late answer may still be used)."""
        out = [i for i in self._rebuilt if i not in self._outputs]
        if all(i in self._outputs for i in range(self.k)) and self._parity is None:
            out.append(PARITY)
        return out

    def done(self) -> bool:
        """Every real query has an answer, original or rebuilt."""
        return all(i in self._outputs or i in self._rebuilt for i in self.real_positions())


class GroupFormer:
    """Forms coding groups of k queries across users, in arrival order, with a timeout."""

    def __init__(self, encoder: Encoder, timeout_s: float, *,
                 pad_output: np.ndarray | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if timeout_s < 0:
            raise ConfigError(f"timeout_s={timeout_s} is invalid; pass >= 0")
        import time

        self.encoder, self.timeout_s, self.pad_output = encoder, float(timeout_s), pad_output
        self._clock = clock or time.monotonic
        self._waiting: list[tuple[float, _Member]] = []
        self._next_gid = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, query: np.ndarray, tag: Any) -> CodingGroup | None:
        """Add a query; returns the group it completed, if any."""
        self._waiting.append((self._clock(), _Member(np.asarray(query), tag)))
        if len(self._waiting) >= self.encoder.k:
            return self._close()
        return None

    def deadline(self) -> float | None:
        """When the oldest waiting query's group must close (None: nothing waits)."""
        return self._waiting[0][0] + self.timeout_s if self._waiting else None

    def poll(self) -> CodingGroup | None:
        """Close a partial group whose oldest query has waited `timeout_s`."""
        if self._waiting and self._clock() >= self._waiting[0][0] + self.timeout_s:
            return self._close()
        return None

    def _close(self) -> CodingGroup:
        k = self.encoder.k
        if len(self._waiting) < k and self.pad_output is None:   # checked before anything moves
            raise ConfigError("a partial group needs pad_output, the base model's prediction "
                              "for the zero query; pass it to GroupFormer")
        taken, self._waiting = self._waiting[:k], self._waiting[k:]
        members = [m for _, m in taken]
        while len(members) < k:
            members.append(_Member(np.zeros_like(members[0].query), None, padding=True))
        gid, self._next_gid = self._next_gid, self._next_gid + 1
        return CodingGroup(gid, members, self.encoder, self.pad_output)
