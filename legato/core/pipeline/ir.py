"""The pipeline schedule IR: one list of actions per rank, printable and parseable exactly.

An `Action` is `(stage, kind, microbatch)` plus, for sends and receives, the peer rank and, for
a forward that must use an older weight version, that version. Its text form is

    <stage><KIND><microbatch>[@<peer>][v<version>]

with every number in decimal without leading zeros: `2F0` (stage 2 forward of microbatch 0),
`1B3`, `0I2` and `0W2` (input-gradient and weight-gradient halves of a backward),
`1SEND_F0@3` (stage 1 sends its output for microbatch 0 to rank 3), `2RECV_B1@4` (stage 2
receives the gradient of its output for microbatch 1 from rank 4), `0ALLREDUCE1` and `0STEP1`
(round 1 of stage 0's gradient all-reduce and optimizer step), `1STASH5`, `1RESTORE5`, and
`1F5v2` (stage 1 forward of microbatch 5 with weight version 2). `Action.parse(str(a)) == a`.

[Note: semantics the runtime follows and the verifier and simulator model]

- `stage` is the (virtual) stage whose module runs the action; the rank must host it
  (`Schedule.stage_ranks`). A microbatch of a replicated stage goes to replica
  `microbatch % replicas`, i.e. rank `stage_ranks[stage][microbatch % replicas]`.
- `F`/`B`: forward and full backward of one microbatch. `I` then `W` split the backward: `I`
  computes the gradient of the stage's input (what `SEND_B` sends), `W` the weight gradient.
  Gradients accumulate until the stage's next `STEP`.
- `SEND_F s,i @d` sends stage s's output for microbatch i to rank d, which runs the matching
  `RECV_F s+1,i @src`; `SEND_B s,i @d` sends the gradient of stage s's input to rank d, which
  runs `RECV_B s-1,i @src`. Sends are asynchronous (isend: never block, buffered). A receive
  blocks until the matching send has been issued (and, in the simulator, its data arrived).
  Messages are matched by (kind, stage, microbatch, ranks), not by order. A stage hosted on the
  same rank as its neighbour needs no send: the data stays local.
- `ALLREDUCE s,k`: round k of the gradient all-reduce over every rank of stage s (its
  replicas); it blocks until all of them reach their `ALLREDUCE s,k`. `STEP s,k`: the k-th
  local optimizer step of stage s (k counts from 0). After k steps a stage's weights are
  version k; a replicated stage runs `ALLREDUCE s,k` before `STEP s,k`.
- `F` uses the latest weights, or version `v` when it carries one (vertical sync, 2BW): the
  runtime keeps a version while a later action still needs it. `STASH s,i` records the
  version that `F s,i` used; `RESTORE s,i` makes it the weights of the next `B`/`I` of
  `s,i`, after which the latest weights are current again and `STEP` updates them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Iterable, Mapping

from legato.core.errors import ConfigError

__all__ = ["Action", "ActionKind", "Schedule", "ScheduleError", "format_grid"]


class ScheduleError(ConfigError):
    """A schedule that is malformed, would deadlock, or breaks a dependency.

    Attributes `rank`, `step` and `action` locate the failure when it has a place.
    """

    def __init__(self, message: str, *, rank: int | None = None, step: int | None = None,
                 action: Action | None = None) -> None:
        super().__init__(message)
        self.rank, self.step, self.action = rank, step, action


class ActionKind(str, enum.Enum):
    """What an action does; the value is its text form."""

    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    ALLREDUCE = "ALLREDUCE"
    STEP = "STEP"
    STASH = "STASH"
    RESTORE = "RESTORE"

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_send(self) -> bool:
        return self in (ActionKind.SEND_F, ActionKind.SEND_B)

    @property
    def is_recv(self) -> bool:
        return self in (ActionKind.RECV_F, ActionKind.RECV_B)


_COMPUTE = frozenset({ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT,
                      ActionKind.BACKWARD_WEIGHT})
_NUM = r"(0|[1-9][0-9]*)"
# longest kinds first so that e.g. STASH is not read as S + ...
_KINDS = sorted((k.value for k in ActionKind), key=len, reverse=True)
_ACTION_RE = re.compile(rf"{_NUM}({'|'.join(_KINDS)}){_NUM}(?:@{_NUM})?(?:v{_NUM})?")
_FORM = ("<stage><KIND><microbatch>[@<peer>][v<version>], e.g. '2F0', '1SEND_F0@3', '1F5v2'; "
         f"kinds: {' '.join(k.value for k in ActionKind)}")


@dataclasses.dataclass(frozen=True)
class Action:
    """One step of one rank: `kind` on `stage` for `microbatch` (the round for ALLREDUCE/STEP).

    Args:
        stage: the (virtual) stage index.
        kind: an `ActionKind` or its text ("F", "SEND_B", ...).
        microbatch: the microbatch, or the round index of ALLREDUCE and STEP.
        peer: the other rank of a SEND_*/RECV_* (required there, forbidden elsewhere).
        version: for F only, the weight version to use (None: the latest).
    """

    stage: int
    kind: ActionKind
    microbatch: int
    peer: int | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        try:
            kind = ActionKind(self.kind)
        except ValueError:
            raise ScheduleError(f"unknown action kind {self.kind!r}; known: "
                                f"{', '.join(k.value for k in ActionKind)}") from None
        object.__setattr__(self, "kind", kind)
        for name in ("stage", "microbatch", "peer", "version"):
            value = getattr(self, name)
            if value is None and name in ("peer", "version"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ScheduleError(f"action {kind.value}: {name}={value!r} must be an int >= 0")
        comm = kind.is_send or kind.is_recv
        if comm and self.peer is None:
            raise ScheduleError(f"{self.stage}{kind.value}{self.microbatch} needs the peer rank "
                                f"(e.g. '{self.stage}{kind.value}{self.microbatch}@1')")
        if not comm and self.peer is not None:
            raise ScheduleError(f"{kind.value} takes no peer (got peer={self.peer}); only "
                                "SEND_F, SEND_B, RECV_F and RECV_B do")
        if self.version is not None and kind is not ActionKind.FORWARD:
            raise ScheduleError(f"{kind.value} takes no weight version (got version="
                                f"{self.version}); only F does")

    def __str__(self) -> str:
        text = f"{self.stage}{self.kind.value}{self.microbatch}"
        if self.peer is not None:
            text += f"@{self.peer}"
        if self.version is not None:
            text += f"v{self.version}"
        return text

    __repr__ = __str__

    def message_key(self, rank: int) -> tuple[str, int, int, int, int]:
        """The message a SEND_*/RECV_* on `rank` sends or receives: (direction "F" or "B",
        receiving stage, microbatch, sending rank, receiving rank). A send and the receive that
        matches it have the same key; the verifier and the simulators pair messages by it.

        Raises:
            ScheduleError: the action is not a send or receive.
        """
        k = self.kind
        if k is ActionKind.SEND_F:
            return ("F", self.stage + 1, self.microbatch, rank, self.peer)
        if k is ActionKind.SEND_B:
            return ("B", self.stage - 1, self.microbatch, rank, self.peer)
        if k is ActionKind.RECV_F:
            return ("F", self.stage, self.microbatch, self.peer, rank)
        if k is ActionKind.RECV_B:
            return ("B", self.stage, self.microbatch, self.peer, rank)
        raise ScheduleError(f"{self} is not a send or receive; only SEND_*/RECV_* carry a "
                            "message")

    @classmethod
    def parse(cls, text: str) -> Action:
        """The action whose text form is `text` (the inverse of `str`).

        Raises:
            ScheduleError: `text` is not an action; the message gives the form.
        """
        m = _ACTION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise ScheduleError(f"malformed action {text!r}; expected {_FORM}")
        stage, kind, mb, peer, version = m.groups()
        return cls(int(stage), ActionKind(kind), int(mb),
                   None if peer is None else int(peer),
                   None if version is None else int(version))


@dataclasses.dataclass
class Schedule:
    """A pipeline schedule: each rank's actions in program order, and the stage layout.

    Args:
        name: the generator or a label ("1f1b").
        actions: rank -> actions (Action objects or their text), run in order.
        stage_ranks: for each (virtual) stage, the ranks that host it (its replicas).
        num_microbatches: microbatches 0..num_microbatches-1 each pass every stage once.
        meta: generator parameters (num_stages, virtual_stages, replicas, ...), for reports.
    """

    name: str
    actions: dict[int, list[Action]]
    stage_ranks: list[tuple[int, ...]]
    num_microbatches: int
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stage_ranks = [tuple(int(r) for r in ranks) for ranks in self.stage_ranks]
        if not self.stage_ranks:
            raise ScheduleError(f"schedule {self.name!r} has no stages; give stage_ranks")
        for s, ranks in enumerate(self.stage_ranks):
            if not ranks or len(set(ranks)) != len(ranks) or min(ranks) < 0:
                raise ScheduleError(f"schedule {self.name!r}: stage {s} has ranks {ranks}; "
                                    "each stage needs one or more distinct ranks >= 0")
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ScheduleError(f"num_microbatches={self.num_microbatches!r} must be >= 1")
        hosts = {r for ranks in self.stage_ranks for r in ranks}
        actions: dict[int, list[Action]] = {r: [] for r in sorted(hosts)}
        for rank, acts in self.actions.items():
            if rank not in hosts:
                raise ScheduleError(f"schedule {self.name!r} has actions for rank {rank}, which "
                                    f"hosts no stage (stage_ranks={self.stage_ranks})",
                                    rank=rank)
            actions[rank] = [a if isinstance(a, Action) else Action.parse(a) for a in acts]
            for step, a in enumerate(actions[rank]):
                if a.stage >= len(self.stage_ranks):
                    raise ScheduleError(f"rank {rank} step {step}: {a} names stage {a.stage} "
                                        f"but the schedule has {len(self.stage_ranks)}",
                                        rank=rank, step=step, action=a)
        self.actions = actions

    # -- layout --------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Number of (virtual) stages."""
        return len(self.stage_ranks)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.actions)

    @property
    def num_ranks(self) -> int:
        return len(self.actions)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages that `rank` hosts, in order."""
        return tuple(s for s, ranks in enumerate(self.stage_ranks) if rank in ranks)

    def replicas(self, stage: int) -> int:
        return len(self.stage_ranks[stage])

    def rank_for(self, stage: int, microbatch: int) -> int:
        """The rank that runs `microbatch` on `stage` (round-robin over the replicas)."""
        ranks = self.stage_ranks[stage]
        return ranks[microbatch % len(ranks)]

    def relabel(self, rank_map: Mapping[int, int]) -> Schedule:
        """The same schedule with each rank r renamed rank_map[r] (e.g. onto a plan's ranks).

        Args:
            rank_map: old rank -> new rank, for every rank, one-to-one.
        Returns:
            A new schedule; replica order within each stage (round-robin) is kept.
        """
        new = [rank_map.get(r) for r in self.ranks]
        if None in new or len(set(new)) != len(new):
            raise ScheduleError(f"rank_map={dict(rank_map)} must map each of the ranks "
                                f"{self.ranks} to a distinct rank")

        def move(a: Action) -> Action:
            return a if a.peer is None else dataclasses.replace(a, peer=rank_map[a.peer])

        return Schedule(self.name, {rank_map[r]: [move(a) for a in acts]
                                    for r, acts in self.actions.items()},
                        [tuple(rank_map[r] for r in ranks) for ranks in self.stage_ranks],
                        self.num_microbatches, dict(self.meta))

    # -- text and JSON -------------------------------------------------------------------------
    def to_text(self) -> str:
        """A line-based text form (goldens); `Schedule.from_text` reads it back exactly."""
        lines = ["# legato pipeline schedule v1", f"name: {self.name}",
                 f"num_microbatches: {self.num_microbatches}",
                 "stage_ranks: " + " | ".join(",".join(map(str, r)) for r in self.stage_ranks),
                 f"meta: {json.dumps(self.meta, sort_keys=True)}"]
        lines += [f"{r}: {' '.join(map(str, acts))}".rstrip() for r, acts in
                  sorted(self.actions.items())]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Schedule:
        head: dict[str, str] = {}
        actions: dict[int, list[str]] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise ScheduleError(f"schedule text line {lineno}: {line[:60]!r} is not "
                                    "'key: value' or 'rank: actions'")
            if key.strip().isdigit():
                actions[int(key)] = value.split()
            else:
                head[key.strip()] = value.strip()
        missing = [k for k in ("name", "num_microbatches", "stage_ranks") if k not in head]
        if missing:
            raise ScheduleError(f"schedule text lacks {missing}; see Schedule.to_text")
        stage_ranks = [tuple(int(x) for x in part.split(",")) for part in
                       head["stage_ranks"].split("|")]
        return cls(head["name"], actions, stage_ranks, int(head["num_microbatches"]),
                   json.loads(head.get("meta") or "{}"))

    def to_json(self) -> dict:
        return {"format": "legato.pipeline.schedule", "version": 1, "name": self.name,
                "num_microbatches": self.num_microbatches,
                "stage_ranks": [list(r) for r in self.stage_ranks], "meta": dict(self.meta),
                "actions": {str(r): [str(a) for a in acts] for r, acts in self.actions.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> Schedule:
        if not isinstance(data, Mapping) or data.get("format") != "legato.pipeline.schedule":
            raise ScheduleError("not a legato pipeline schedule (no \"format\": "
                                "\"legato.pipeline.schedule\"); write it with Schedule.to_json")
        return cls(data["name"], {int(r): list(a) for r, a in data["actions"].items()},
                   [tuple(r) for r in data["stage_ranks"]], int(data["num_microbatches"]),
                   dict(data.get("meta") or {}))

    def __str__(self) -> str:
        return format_grid(self)


def format_grid(schedule: Schedule, mark: tuple[int, int] | None = None, *,
                note: str = "<-- ERROR HERE", context: int = 6) -> str:
    """The step x rank grid of a schedule, with cell `mark` = (rank, step) flagged.

    Args:
        schedule: the schedule to draw.
        mark: (rank, step) to flag, or None.
        note: the text put after the marked row.
        context: with a mark, rows shown either side of it (all rows without one).
    Returns:
        Multi-line text: one row per step, one column per rank.
    """
    ranks = schedule.ranks
    depth = max((len(a) for a in schedule.actions.values()), default=0)
    rows: Iterable[int] = range(depth)
    if mark is not None:
        rows = range(max(0, mark[1] - context), min(depth, mark[1] + context + 1))
    cells = {(r, i): str(a) for r, acts in schedule.actions.items() for i, a in enumerate(acts)}
    if mark is not None:
        cells[mark] = f">{cells.get(mark, '')}<"
    width = max([len(c) for c in cells.values()] + [7])
    out = ["step  " + " ".join(f"rank {r}".ljust(width) for r in ranks)]
    for i in rows:
        line = f"{i:<5} " + " ".join(cells.get((r, i), "").ljust(width) for r in ranks)
        if mark is not None and i == mark[1]:
            line += f"  {note}"
        out.append(line.rstrip())
    return "\n".join(out)

