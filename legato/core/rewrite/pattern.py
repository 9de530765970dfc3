"""Rewrite rules as data: source and target patterns over pattern variables, preconditions, and
the record of how the rule was verified.

A `Pattern` is a small operator DAG. Its `inputs` are pattern variables (tensors the rule does
not look inside); each `PNode` is an ONNX operator whose inputs name variables or other nodes
(`"n1"` for a node's first output, `"n1:2"` for its third); its `outputs` are the roots. A rule
says: wherever `source` matches, its roots can be replaced by the roots of `target`, in order.
Several roots let one rule merge parallel branches that share an input (two MatMuls of one `x`
become one MatMul of `x` with concatenated weights, then a Split).

Attribute values in a pattern:
- a JSON value (`1`, `[1, 1]`, `"NOTSET"`): in a source, the graph's attribute must equal it;
  in a target, it is set;
- `"$name"`: in a source, binds the graph's value (equal wherever it recurs); in a target, uses it;
- `{"dim": ["w", -1]}`: (target) a dimension of a bound variable's static shape; lists may mix
  these (`[{"dim": ["w1", -1]}, {"dim": ["w2", -1]}]`);
- `{"compose": ["$p", "$q"]}`: (target) the perm of Transpose(Transpose(x, $p), $q);
- `{"band": ["x", "$size", "$alpha"]}`: (target, only as a Constant's `value`) LRN's channel
  window as the weight of a 1x1 Conv, a (C, C, 1, ..., 1) tensor of x's dtype (C = dim 1 of
  x, one 1 per spatial axis of x) with W[c, i] = alpha / size where
  max(0, c - floor((size - 1) / 2)) <= i <= min(C - 1, c + ceil((size - 1) / 2)), else 0;
  `Conv(Mul(x, x), W)` is then alpha / size times LRN's square sum. Size and alpha are
  `"$name"`s or numbers; x's rank and dim 1 must be known (`min_rank`, `static_dim`).
Attributes a source node does not list must be absent from the graph node (or at their ONNX
default), so a rule never matches a variant it was not verified for.

Preconditions (`{"constant": "w"}`, `{"rank": ["x", 4]}`, `{"min_rank": ["x", 3]}`,
`{"static_shape": "x"}`, `{"static_dim": ["x", 1]}`, `{"same_shape": ["a", "b"]}`,
`{"dim_eq": [["w1", 0], ["w2", 0]]}`, `{"dtype": ["x", "FLOAT"]}`) restrict where a rule
applies.

Two optional fields serve rules that merge k interchangeable branches:
- `"ordered_roots": true`: the matcher takes the roots' nodes in graph order, so a set of k
  branches is matched once instead of k! times (a match is a correct instance either way; this
  only prunes repeats);
- `"family": "merge-parallel-matmul"`: rules of one family with different numbers of roots; the
  search tries the largest first and skips a smaller member's match whose roots a larger match
  already covers, so k branches are merged in one step instead of k - 1 (`search.py`).

JSON form: `Rule.to_json()` / `Rule.from_json()`,
`load_rules(path)` / `save_rules(path, rules)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from legato.core._files import atomic_json, read_text
from legato.core.errors import ConfigError

__all__ = ["PNode", "Pattern", "Rule", "RuleError", "load_rules", "save_rules"]

RULES_FORMAT = "legato.rewrite.rules"
PRECONDITIONS = ("constant", "rank", "min_rank", "static_shape", "static_dim", "same_shape",
                 "dim_eq", "dtype")
DERIVED = ("dim", "compose", "band")     # attribute values a target computes from the match
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class RuleError(ConfigError):
    """A rule or rule file that cannot be used; the message names the rule and the fix."""


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw_attr(value: Any) -> Any:
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and
                                                  isinstance(v[0], str) for v in value) \
            and value[0][0] in ("band", "compose", "dim", "positive", "value"):
        return {k: _thaw_attr(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw_attr(v) for v in value]
    return value


def _check_forms(where: str, value: Any) -> None:
    """A dict in an attribute value must be one derived form (it would be read back as a list
    of pairs otherwise)."""
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in DERIVED:
            raise ValueError(f"{where}: {value} is not a derived value; use one key of "
                             f"{list(DERIVED)}")
        value = next(iter(value.values()))
    if isinstance(value, list):
        for v in value:
            _check_forms(where, v)


def _check_target_value(where: str, value: Any, variables: set[str], bound: set[str], *,
                        band_ok: bool) -> None:
    """Raise RuleError unless a target attribute value can be resolved from a match: its
    "$name"s bound by the source, its derived forms (`DERIVED`) well-formed."""
    if isinstance(value, str) and value.startswith("$") and value not in bound:
        raise RuleError(f"{where}: {value} is not bound by any source attribute")
    if isinstance(value, list):
        for v in value:
            _check_target_value(where, v, variables, bound, band_ok=False)
        return
    if not isinstance(value, dict):
        return
    if len(value) != 1 or next(iter(value)) not in DERIVED:
        raise RuleError(f"{where}: {value} is not a derived value; use one key of "
                        f"{list(DERIVED)}")
    (form, args), = value.items()
    if form == "band":
        if not band_ok:
            raise RuleError(f"{where}: a band is a tensor; it can only be a Constant's value")
        if not isinstance(args, list) or len(args) != 3 or args[0] not in variables:
            raise RuleError(f"{where}: band takes [variable, size, alpha] with a source "
                            f"variable first, e.g. [\"x\", \"$size\", \"$alpha\"]; got {args}")
        size, alpha = args[1], args[2]
        for arg, ok in ((size, isinstance(size, int) and not isinstance(size, bool)
                         and size >= 1),
                        (alpha, isinstance(alpha, (int, float)) and not isinstance(alpha, bool))):
            if not ok and not (isinstance(arg, str) and arg.startswith("$")):
                raise RuleError(f"{where}: band's size and alpha are \"$name\"s or numbers "
                                f"(size >= 1); got {arg!r}")
            _check_target_value(where, arg, variables, bound, band_ok=False)
    elif form == "dim":
        if not isinstance(args, list) or len(args) != 2 or args[0] not in variables \
                or not isinstance(args[1], int):
            raise RuleError(f"{where}: dim takes [source variable, axis]; got {args}")
    elif not isinstance(args, list) or len(args) != 2:
        raise RuleError(f"{where}: compose takes two perms; got {args}")
    else:
        for v in args:
            _check_target_value(where, v, variables, bound, band_ok=False)


def split_ref(ref: str) -> tuple[str, int]:
    """`"n1:2"` -> ("n1", 2); `"n1"` -> ("n1", 0)."""
    name, _, index = ref.partition(":")
    return name, int(index) if index else 0


@dataclasses.dataclass(frozen=True)
class PNode:
    """One operator of a pattern."""

    id: str
    op: str
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    num_outputs: int = 1

    @property
    def attributes(self) -> dict[str, Any]:
        return {k: _thaw_attr(v) for k, v in self.attrs}

    def to_json(self) -> dict:
        d: dict[str, Any] = {"id": self.id, "op": self.op, "inputs": list(self.inputs)}
        if self.attrs:
            d["attrs"] = self.attributes
        if self.num_outputs != 1:
            d["outputs"] = self.num_outputs
        return d

    @classmethod
    def from_json(cls, d: dict) -> "PNode":
        for name, value in (d.get("attrs") or {}).items():
            _check_forms(f"node {d.get('id')!r} attribute {name!r}", value)
        return cls(str(d["id"]), str(d["op"]), tuple(d.get("inputs", ())),
                   tuple(sorted((k, _freeze(v)) for k, v in (d.get("attrs") or {}).items())),
                   int(d.get("outputs", 1)))


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Pattern variables, operators in topological order, and the roots."""

    inputs: tuple[str, ...]
    nodes: tuple[PNode, ...]
    outputs: tuple[str, ...]

    def check(self, where: str) -> None:
        """Raise RuleError unless every reference resolves, in order, and ids are unique."""
        known = set(self.inputs)
        if len(known) != len(self.inputs):
            raise RuleError(f"{where}: repeated pattern variables in {list(self.inputs)}")
        arity: dict[str, int] = {}
        for n in self.nodes:
            if n.id in known or n.id in arity:
                raise RuleError(f"{where}: node id {n.id!r} is used twice")
            for ref in n.inputs:
                self._check_ref(ref, known, arity, f"{where}: node {n.id!r}")
            arity[n.id] = n.num_outputs
        if not self.outputs:
            raise RuleError(f"{where}: a pattern needs at least one output (root)")
        for ref in self.outputs:
            name, _ = split_ref(ref)
            if name not in arity:
                raise RuleError(f"{where}: output {ref!r} is not a node of the pattern (a root "
                                "must be an operator, not a bare variable)")
            self._check_ref(ref, known, arity, f"{where}: outputs")

    @staticmethod
    def _check_ref(ref: str, known: set, arity: dict, where: str) -> None:
        name, index = split_ref(ref)
        if name in known and index == 0 and ":" not in ref:
            return
        if name not in arity:
            raise RuleError(f"{where} reads {ref!r}, which is neither a pattern variable nor an "
                            "earlier node (list nodes in topological order)")
        if index >= arity[name]:
            raise RuleError(f"{where} reads output {index} of {name!r}, which has "
                            f"{arity[name]} outputs")

    def node(self, node_id: str) -> PNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def to_json(self) -> dict:
        return {"inputs": list(self.inputs), "nodes": [n.to_json() for n in self.nodes],
                "outputs": list(self.outputs)}

    @classmethod
    def from_json(cls, d: dict) -> "Pattern":
        return cls(tuple(d.get("inputs", ())), tuple(PNode.from_json(n) for n in d["nodes"]),
                   tuple(d["outputs"]))


@dataclasses.dataclass(frozen=True)
class Rule:
    """`source` may be replaced by `target` (roots in order) where `preconditions` hold."""

    name: str
    source: Pattern
    target: Pattern
    preconditions: tuple[tuple[str, Any], ...] = ()
    origin: str = "hand-written"            # or "generated"
    verification: tuple[tuple[str, Any], ...] = ()   # e.g. (("z3", "proved"), ("numeric", ...))
    doc: str = ""
    # shapes (variable -> dims) and attribute values ("$name" -> value) to check the rule on
    examples: tuple[tuple[tuple[str, Any], ...], ...] = ()
    family: str = ""
    ordered_roots: bool = False

    def __post_init__(self) -> None:
        where = f"rule {self.name!r}"
        if not _NAME.match(self.name):
            raise RuleError(f"{where}: names are kebab-case (fuse-conv-bn)")
        self.source.check(f"{where} source")
        self.target.check(f"{where} target")
        if len(self.source.outputs) != len(self.target.outputs):
            raise RuleError(f"{where}: source has {len(self.source.outputs)} roots, target "
                            f"{len(self.target.outputs)}; they pair up in order")
        extra = set(self.target.inputs) - set(self.source.inputs)
        if extra:
            raise RuleError(f"{where}: target variables {sorted(extra)} are not bound by the "
                            "source")
        bound = {v for n in self.source.nodes for v in n.attributes.values()
                 if isinstance(v, str) and v.startswith("$")}
        for ex in self.examples:
            missing = (set(self.source.inputs) | bound) - {k for k, _ in ex}
            if missing:
                raise RuleError(f"{where}: an example lacks {sorted(missing)} (give a shape "
                                "per variable and a value per $attribute)")
        for kind, _ in self.preconditions:
            if kind not in PRECONDITIONS:
                raise RuleError(f"{where}: unknown precondition {kind!r}; known: "
                                f"{list(PRECONDITIONS)}")
        for n in self.target.nodes:
            for attr, value in n.attributes.items():
                _check_target_value(f"{where} target node {n.id!r} attribute {attr!r}", value,
                                    set(self.source.inputs), bound,
                                    band_ok=n.op == "Constant" and attr == "value")

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.verification)

    @property
    def verified(self) -> bool:
        s = self.status
        return s.get("z3") == "proved" and s.get("numeric") == "passed"

    def with_verification(self, **record: Any) -> "Rule":
        merged = {**self.status, **record}
        return dataclasses.replace(self, verification=tuple(sorted(merged.items())))

    def to_json(self) -> dict:
        d = {"name": self.name, "origin": self.origin, "source": self.source.to_json(),
             "target": self.target.to_json(),
             "preconditions": [{k: _thaw_attr(v)} for k, v in self.preconditions],
             "verification": self.status}
        if self.family:
            d["family"] = self.family
        if self.ordered_roots:
            d["ordered_roots"] = True
        if self.doc:
            d["doc"] = self.doc
        if self.examples:
            d["examples"] = [{k: _thaw_attr(v) for k, v in ex} for ex in self.examples]
        return d

    @classmethod
    def from_json(cls, d: dict, *, where: str = "rule") -> "Rule":
        if not isinstance(d, dict):
            raise RuleError(f"{where}: a rule is a JSON object, not {type(d).__name__}; see "
                            "legato/core/rewrite/pattern.py for the format")
        try:
            pre = []
            for item in d.get("preconditions", ()):
                (k, v), = item.items()
                pre.append((k, _freeze(v)))
            return cls(str(d["name"]), Pattern.from_json(d["source"]),
                       Pattern.from_json(d["target"]), tuple(pre), d.get("origin", "hand-written"),
                       tuple(sorted((d.get("verification") or {}).items())), d.get("doc", ""),
                       tuple(tuple(sorted((k, _freeze(v)) for k, v in ex.items()))
                             for ex in d.get("examples", ())),
                       str(d.get("family", "")), bool(d.get("ordered_roots", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise RuleError(f"{where}: malformed rule ({type(err).__name__}: {err}); see "
                            "legato/core/rewrite/pattern.py for the format") from err


def save_rules(path: str | os.PathLike, rules: Iterable[Rule], *, meta: dict | None = None
               ) -> Path:
    """Write rules as JSON, atomically."""
    return atomic_json(path, {"format": RULES_FORMAT, "version": 1, "meta": meta or {},
                              "rules": [r.to_json() for r in rules]})


def load_rules(path: str | os.PathLike) -> list[Rule]:
    """Read a rule file written by `save_rules` (or by hand)."""
    p = Path(path)
    text = read_text(p, RuleError, what="the rule file ", kind="a rule file is JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RuleError(f"{p} is not JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict) or data.get("format") != RULES_FORMAT:
        raise RuleError(f"{p} is not a legato rule file (no \"format\": \"{RULES_FORMAT}\")")
    if not isinstance(data.get("rules"), list):
        raise RuleError(f"{p}: \"rules\" is {type(data.get('rules')).__name__}, not a list of "
                        "rule objects")
    rules = [Rule.from_json(r, where=f"{p} rule #{i}") for i, r in enumerate(data["rules"])]
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RuleError(f"{p}: rule names must be unique; repeated: {dupes[:5]}")
    return rules
