"""Layer profiles for pipeline planning: a DAG of layers with their costs, a JSON format, and an
importer for PipeDream's own `graph.txt` profiles.

A `LayerProfile` is what the planner, the simulator and the runtime share about a model: one
`LayerNode` per layer (forward time, backward time, split into input-gradient and
weight-gradient time where it was measured, output activation bytes, parameter bytes and
optimizer-state bytes) and the edges of the layer graph. Times are seconds and sizes bytes
throughout (PipeDream's files use milliseconds; the importer converts).

JSON (`LayerProfile.save` / `load`):

    {"format": "legato.pipeline.profile", "version": 1,
     "meta": {"model": "vgg16", "source": "...", "batch_size": 64},
     "nodes": [{"id": "node1", "desc": "Conv2d(3, 64, ...)", "forward_s": 0.0013,
                "backward_s": 0.0021, "backward_input_s": null, "backward_weight_s": null,
                "activation_bytes": 822083584, "activation_outputs": [822083584],
                "parameter_bytes": 7168, "optimizer_state_bytes": 0, "update_s": 0.0}, ...],
     "edges": [["node1", "node2"], ...]}

PipeDream's `graph.txt`: one line per node, `nodeK -- Description -- forward_compute_time=F,
backward_compute_time=B, activation_size=A, parameter_size=P` (times in ms; A is a number or,
for a node with several outputs, a list `[a; b; c]`), then one line per edge, indented,
`nodeI -- nodeJ`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from legato.core._files import atomic_json, read_text
from legato.core.errors import ConfigError

__all__ = ["FORMAT", "LayerNode", "LayerProfile", "ProfileError"]

FORMAT = "legato.pipeline.profile"
VERSION = 1
REQUIRED = ("forward_s", "backward_s", "activation_bytes", "parameter_bytes")


class ProfileError(ConfigError):
    """A profile file or graph that cannot be used; the message names the place and the fix."""


@dataclasses.dataclass(frozen=True)
class LayerNode:
    """One layer: its costs for one minibatch (seconds, bytes).

    `update_s` is the time of one optimizer step over the layer's parameters (0 when not
    measured, as in PipeDream's profiles).

    `backward_input_s` and `backward_weight_s` split `backward_s` when the profiler measured
    them separately (zero-bubble schedules need the split); None when it did not.
    """

    id: str
    desc: str = ""
    forward_s: float = 0.0
    backward_s: float = 0.0
    backward_input_s: float | None = None
    backward_weight_s: float | None = None
    activation_bytes: int = 0
    activation_outputs: tuple[int, ...] = ()
    parameter_bytes: int = 0
    optimizer_state_bytes: int = 0
    update_s: float = 0.0          # one optimizer step over the layer's parameters

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ProfileError(f"a layer node needs a non-empty string id, not {self.id!r}")
        for name in ("forward_s", "backward_s", "activation_bytes", "parameter_bytes",
                     "optimizer_state_bytes", "update_s", "backward_input_s",
                     "backward_weight_s"):
            value = getattr(self, name)
            if value is None and name.startswith("backward_") and name != "backward_s":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ProfileError(f"node {self.id!r}: {name}={value!r} is not a number")
            if not math.isfinite(value):
                raise ProfileError(f"node {self.id!r}: {name}={value} is not finite (a "
                                   "profiler that failed to time it?)")
            if value < 0:
                raise ProfileError(f"node {self.id!r}: {name}={value} is negative")
        for size in self.activation_outputs:
            if isinstance(size, bool) or not isinstance(size, numbers.Real) or \
                    not math.isfinite(size) or size < 0:
                raise ProfileError(f"node {self.id!r}: activation output size {size!r} is not "
                                   "a non-negative number of bytes")
        split = (self.backward_input_s, self.backward_weight_s)
        if (split[0] is None) != (split[1] is None):
            raise ProfileError(f"node {self.id!r}: give both backward_input_s and "
                               "backward_weight_s, or neither")

    @property
    def compute_s(self) -> float:
        """Forward plus backward time."""
        return self.forward_s + self.backward_s


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """A layer DAG with costs. Nodes keep the file's order; `topological_order()` gives a
    forward order (ties broken by that file order)."""

    nodes: tuple[LayerNode, ...]
    edges: tuple[tuple[str, str], ...]
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = [n.id for n in self.nodes]
        seen: set[str] = set()
        dupes = sorted({i for i in ids if i in seen or seen.add(i)})
        if dupes:
            raise ProfileError(f"node ids must be unique; repeated: {dupes[:5]}")
        unknown = sorted({x for e in self.edges for x in e if x not in seen})
        if unknown:
            raise ProfileError(f"edges refer to nodes that are not in the profile: "
                               f"{unknown[:5]}; every edge end must be a node id")
        self.topological_order()  # raises on a cycle

    # -- graph ---------------------------------------------------------------------------------
    def node(self, node_id: str) -> LayerNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def successors(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for a, b in self.edges:
            out[a].append(b)
        return out

    def predecessors(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for a, b in self.edges:
            out[b].append(a)
        return out

    def topological_order(self) -> list[str]:
        """Kahn's algorithm; among ready nodes, the one first in the file goes first."""
        import heapq

        position = {n.id: i for i, n in enumerate(self.nodes)}
        indegree = {n.id: 0 for n in self.nodes}
        succ: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for a, b in self.edges:
            succ[a].append(b)
            indegree[b] += 1
        ready = [(position[i], i) for i, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            _, node = heapq.heappop(ready)
            order.append(node)
            for nxt in succ[node]:
                indegree[nxt] -= 1
                if indegree[nxt] == 0:
                    heapq.heappush(ready, (position[nxt], nxt))
        if len(order) != len(self.nodes):
            stuck = sorted((i for i, d in indegree.items() if d > 0), key=position.get)
            raise ProfileError(f"the layer graph has a cycle through {stuck[:5]}; a profile "
                               "must be a DAG (forward order)")
        return order

    @property
    def is_chain(self) -> bool:
        """Whether the graph is one path (no branches)."""
        succ, pred = self.successors(), self.predecessors()
        return all(len(v) <= 1 for v in succ.values()) and all(len(v) <= 1
                                                                for v in pred.values())

    # -- totals --------------------------------------------------------------------------------
    @property
    def compute_s(self) -> float:
        return sum(n.compute_s for n in self.nodes)

    @property
    def parameter_bytes(self) -> int:
        return sum(n.parameter_bytes for n in self.nodes)

    def describe(self) -> str:
        kind = "chain" if self.is_chain else "DAG with branches"
        return (f"{len(self.nodes)} layers ({kind}), {len(self.edges)} edges, "
                f"{self.compute_s * 1e3:.1f} ms forward+backward, "
                f"{self.parameter_bytes / 2**20:.1f} MiB of parameters")

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        nodes = []
        for n in self.nodes:
            d = dataclasses.asdict(n)
            d["activation_outputs"] = list(n.activation_outputs)
            nodes.append(d)
        return {"format": FORMAT, "version": VERSION, "meta": dict(self.meta), "nodes": nodes,
                "edges": [list(e) for e in self.edges]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a temporary file renamed over the target)."""
        return atomic_json(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict, *, where: str = "profile") -> "LayerProfile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{where} is not a legato pipeline profile (no \"format\": "
                               f"\"{FORMAT}\"); for PipeDream's graph.txt use "
                               "LayerProfile.from_pipedream (CLI: --from-pipedream)")
        if data.get("version") != VERSION:
            raise ProfileError(f"{where} has version {data.get('version')!r}; this legato "
                               f"reads version {VERSION}")
        fields = {f.name for f in dataclasses.fields(LayerNode)}
        nodes = []
        if not isinstance(data.get("nodes"), list):
            raise ProfileError(f"{where}: \"nodes\" is {type(data.get('nodes')).__name__}, not a "
                               "list of node objects")
        if not isinstance(data.get("edges", []), list):
            raise ProfileError(f"{where}: \"edges\" is {type(data.get('edges')).__name__}, not a "
                               "list of [from, to] pairs")
        if not isinstance(data.get("meta") or {}, dict):
            raise ProfileError(f"{where}: \"meta\" is {type(data.get('meta')).__name__}, not an "
                               "object")
        for i, raw in enumerate(data["nodes"]):
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
                raise ProfileError(f"{where}: node #{i} is not an object with a string \"id\"")
            missing = [k for k in REQUIRED if k not in raw]
            if missing:
                raise ProfileError(f"{where}: node {raw['id']!r} lacks {missing}; every node "
                                   f"needs {list(REQUIRED)} (times in seconds, sizes in bytes)")
            extra = sorted(set(raw) - fields)
            if extra:
                raise ProfileError(f"{where}: node {raw['id']!r} has unknown fields {extra}; "
                                   f"known: {sorted(fields)}")
            raw = dict(raw)
            outputs = raw.get("activation_outputs") or ()
            if not isinstance(outputs, (list, tuple)):
                raise ProfileError(f"{where}: node {raw['id']!r}: activation_outputs is "
                                   f"{outputs!r}, not a list of byte counts")
            raw["activation_outputs"] = tuple(outputs)
            try:
                nodes.append(LayerNode(**raw))
            except TypeError as err:
                raise ProfileError(f"{where}: node {raw['id']!r}: {err}") from err
            except ProfileError as err:
                raise ProfileError(f"{where}: {err}") from err
        if not nodes:
            raise ProfileError(f"{where} has no nodes")
        if "edges" not in data and len(nodes) > 1:
            raise ProfileError(f"{where} has {len(nodes)} layers but no \"edges\": without "
                               "them every layer would be planned as independent of the others; "
                               "list the layer graph's edges as [[\"from\", \"to\"], ...] (a "
                               "chain: each layer to the next), or [] for layers that really "
                               "share no data")
        edges = []
        for e in data.get("edges") or []:
            if not (isinstance(e, (list, tuple)) and len(e) == 2
                    and all(isinstance(x, str) for x in e)):
                raise ProfileError(f"{where}: edge {e!r} is not a [from, to] pair of node ids")
            edges.append((str(e[0]), str(e[1])))
        return cls(tuple(nodes), tuple(edges), dict(data.get("meta") or {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerProfile":
        p = Path(path)
        text = read_text(p, ProfileError, what="the profile ",
                         kind="a profile is JSON written by a legato profiler")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProfileError(f"{p} is not JSON ({err.msg} at line {err.lineno}); for "
                               "PipeDream's graph.txt use --from-pipedream") from err
        return cls.from_json(data, where=str(p))

    # -- PipeDream -----------------------------------------------------------------------------
    @classmethod
    def from_pipedream(cls, path: str | os.PathLike, *, model: str | None = None
                       ) -> "LayerProfile":
        """Read PipeDream's `graph.txt` (see the module docstring); ms become seconds."""
        p = Path(path)
        lines = read_text(p, ProfileError, what="",
                          kind="PipeDream's graph.txt is text").splitlines()
        nodes, edges = _parse_pipedream(lines, str(p))
        meta = {"model": model or p.parent.name, "source": f"PipeDream graph.txt ({p.name})",
                "time_unit_in_source": "ms"}
        return cls(tuple(nodes), tuple(edges), meta)


_NODE = re.compile(r"^(?P<id>\S+) -- (?P<desc>.*) -- (?P<attrs>forward_compute_time=.*)$")
_EDGE = re.compile(r"^\s+(?P<a>\S+) -- (?P<b>\S+)\s*$")


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError as err:
        raise ProfileError(f"{where}: {text!r} is not a number") from err


def _parse_pipedream(lines: Sequence[str] | Iterable[str], where: str
                     ) -> tuple[list[LayerNode], list[tuple[str, str]]]:
    nodes: list[LayerNode] = []
    edges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"{where}:{lineno}"
        if (m := _EDGE.match(line)) is not None:
            edges.append((m["a"], m["b"]))
            continue
        m = _NODE.match(line)
        if m is None:
            raise ProfileError(f"{at}: not a PipeDream node or edge line: {line[:80]!r}; "
                               "expected 'nodeK -- Desc -- forward_compute_time=..., ...' or an "
                               "indented 'nodeI -- nodeJ'")
        attrs: dict[str, str] = {}
        # values are numbers or bracketed lists "[a; b]" (no commas inside)
        for part in re.finditer(r"(\w+)=(\[[^\]]*\]|[^,]+)", m["attrs"]):
            attrs[part[1]] = part[2].strip()
        missing = [k for k in ("forward_compute_time", "backward_compute_time",
                               "activation_size", "parameter_size") if k not in attrs]
        if missing:
            raise ProfileError(f"{at}: node {m['id']} lacks {missing}")
        act = attrs["activation_size"]
        if act.startswith("["):
            outputs = tuple(int(round(_number(x.strip(), at)))
                            for x in act.strip("[]").split(";") if x.strip())
        else:
            outputs = (int(round(_number(act, at))),)
        nodes.append(LayerNode(
            id=m["id"], desc=m["desc"].strip(),
            forward_s=_number(attrs["forward_compute_time"], at) / 1e3,
            backward_s=_number(attrs["backward_compute_time"], at) / 1e3,
            activation_bytes=sum(outputs), activation_outputs=outputs,
            parameter_bytes=int(round(_number(attrs["parameter_size"], at)))))
    if not nodes:
        raise ProfileError(f"{where} has no PipeDream node lines")
    return nodes, edges
