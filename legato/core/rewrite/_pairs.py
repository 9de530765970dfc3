"""Pairing fingerprint-equal graphs into candidate rules and pruning them (TASO section 3.2);
the stages are described in [Note: pruning] in `generate.py`.

A candidate is (source term, target term) in a `Space`; `prune` renders the survivors as rule
JSON (patterns, preconditions, examples) for `generate.py` to verify and emit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from legato.core.rewrite._enumerate import Instance, Kind, Progress, Space
from legato.core.rewrite._opshapes import ShapeFault

__all__ = ["Candidate", "prune"]


# ---- rendering ---------------------------------------------------------------------------------

class _Names:
    """Variable names x0, x1, ... in order of first occurrence."""

    def __init__(self) -> None:
        self.of: dict[int, str] = {}

    def __call__(self, vid: int) -> str:
        name = self.of.get(vid)
        if name is None:
            name = self.of[vid] = f"x{len(self.of)}"
        return name


def _text(space: Space, tid: int, names: _Names) -> str:
    node = space.t_node[tid]
    if node < 0:
        return names(tid)
    inst = space.instances[space.n_inst[node]]
    inner = ",".join(_text(space, c, names) for c in space.n_children[node])
    suffix = f"#{space.t_out[tid]}" if inst.num_outputs > 1 else ""
    return f"{inst.label}({inner}){suffix}"


def _root_text(space: Space, tid: int, names: _Names) -> str:
    text = _text(space, tid, names)
    return f"Identity({text})" if space.is_variable(tid) else text


def _pattern(space: Space, tid: int, names: _Names) -> dict:
    nodes: list[dict] = []
    made: dict[int, str] = {}
    used: list[str] = []

    def ref(t: int) -> str:
        node = space.t_node[t]
        if node < 0:
            name = names(t)
            if name not in used:
                used.append(name)
            return name
        if node not in made:
            inst: Instance = space.instances[space.n_inst[node]]
            inputs = [ref(c) for c in space.n_children[node]]
            for index, value in inst.consts:
                cid = f"c{len(nodes)}"
                nodes.append({"id": cid, "op": "Constant", "inputs": [],
                              "attrs": {"value_ints": list(value)}})
                inputs.insert(index, cid)
            nid = made[node] = f"n{len(nodes)}"
            d = {"id": nid, "op": inst.op.name, "inputs": inputs}
            if inst.attrs:
                d["attrs"] = dict(inst.attrs)
            if inst.num_outputs != 1:
                d["outputs"] = inst.num_outputs
            nodes.append(d)
        nid = made[node]
        return nid if space.instances[space.n_inst[node]].num_outputs == 1 \
            else f"{nid}:{space.t_out[t]}"

    root = ref(tid)
    if space.is_variable(tid):
        nodes.append({"id": "n0", "op": "Identity", "inputs": [root]})
        root = "n0"
    order = sorted(used, key=lambda n: int(n[1:]))
    return {"inputs": order, "nodes": nodes, "outputs": [root]}


def _preconditions(space: Space, names: _Names, source_vars: list[str]
                   ) -> tuple[list[dict], dict[tuple[str, int], Any]]:
    """Rank of every variable, and dim_eq over positions that share a template dimension."""
    by_name = {name: vid for vid, name in names.of.items()}
    pre: list[dict] = []
    classes: dict[Any, list[list]] = {}
    token_of: dict[tuple[str, int], Any] = {}
    for name in source_vars:
        kind = space.var_kind[by_name[name]]
        pre.append({"rank": [name, len(kind.dims)]})
        for axis, dim in enumerate(kind.dims):
            classes.setdefault(dim, []).append([name, axis])
            token_of[(name, axis)] = dim
    # pairwise (first position, another): the matcher reads any length, the prover pairs
    pre += [{"dim_eq": [pos[0], other]} for pos in classes.values() for other in pos[1:]]
    return pre, token_of


# ---- pairing and pruning -----------------------------------------------------------------------

@dataclasses.dataclass
class Candidate:
    """A pair of equal graphs and, once it survives renaming, its rule in JSON form."""

    source: int
    target: int
    key: tuple = ()                     # (source text, target text, preconditions)
    rule: dict = dataclasses.field(default_factory=dict)
    tokens: dict = dataclasses.field(default_factory=dict)   # (name, axis) -> template dim
    examples: list = dataclasses.field(default_factory=list)
    variables: dict = dataclasses.field(default_factory=dict)  # name -> variable id
    occurrences: tuple = ()             # variable names in text order, source then target


_VAR = re.compile(r"(?<![A-Za-z])x[0-9]+")


def prune(space: Space, progress: Progress | None = None
           ) -> tuple[list[tuple[str, int, str]], list[Candidate]]:
    stages = [("graphs", space.graphs, "graphs enumerated (valid on every shape environment)"),
              ("classes", len(space.first) - len(space.var_kind),
               "distinct fingerprints among them")]
    pairs: list[Candidate] = []
    for fp, more in space.more.items():
        masks: dict[int, int] = {}
        for m in (space.first[fp], *more):
            vm = space.t_vars[m]
            if space.t_size[m] > 0:
                partner = min((t for mask, t in masks.items() if not mask & ~vm), default=None)
                if partner is not None:
                    pairs.append(Candidate(m, partner))
            masks.setdefault(vm, m)
    stages.append(("candidates", len(pairs),
                   "graph -> earliest equal graph over a subset of its variables"))

    pairs = [c for c in pairs if space.t_fp[c.source] not in space.constant]
    stages.append(("constant", len(pairs), "after dropping constant-valued pairs"))

    def multi(t: int) -> bool:
        return space.instances[space.n_inst[space.t_node[t]]].num_outputs > 1
    pairs = [c for c in pairs if not multi(c.source)]
    stages.append(("single root", len(pairs), "after dropping sources rooted at a Split half"))

    seen: dict[tuple, Candidate] = {}
    step = max(1, len(pairs) // 200)
    for i, c in enumerate(pairs):
        if progress is not None and i % step == 0:
            progress("prune", i, len(pairs))
        names = _Names()
        src, tgt = _text(space, c.source, names), _root_text(space, c.target, names)
        source = _pattern(space, c.source, names)
        pre, tokens = _preconditions(space, names, source["inputs"])
        c.key = (src, tgt, repr(pre))
        if c.key in seen:
            continue
        c.rule = {"source": source, "target": _pattern(space, c.target, names),
                  "preconditions": pre, "doc": f"{src} -> {tgt}"}
        c.tokens = tokens
        c.variables = {n: v for v, n in names.of.items()}
        c.occurrences = tuple(_VAR.findall(src + " " + tgt))
        c.examples = [{n: list(space.sigs[space.t_sig[c.variables[n]]][e])
                       for n in source["inputs"]} for e in range(len(space.envs))]
        seen[c.key] = c
    if progress is not None:
        progress("prune", len(pairs), len(pairs))
    pairs = list(seen.values())
    stages.append(("renaming", len(pairs), "after merging pairs equal up to variable names"))

    pairs = [c for c in pairs if space.nodes(c.source).isdisjoint(space.nodes(c.target))]
    stages.append(("common subgraph", len(pairs), "after dropping pairs sharing an operator"))

    pairs = [c for c in pairs if c.key[0] != c.key[1]]
    stages.append(("trivial", len(pairs), "after dropping identical source and target"))

    pairs = [c for c in pairs if not _congruent(space, c)]
    pairs = _drop_instances(pairs)
    pairs.sort(key=lambda c: (space.t_size[c.source], space.t_size[c.target], c.key))
    first_target: dict[tuple, Candidate] = {}
    for c in pairs:                   # the same source and preconditions: one (smallest) target
        first_target.setdefault((c.key[0], c.key[2]), c)
    pairs = list(first_target.values())
    stages.append(("implied", len(pairs), "after dropping pairs implied by a smaller or more "
                                          "general rule"))

    pairs = [c for c in pairs if _survives_resizing(space, c)]
    stages.append(("resized", len(pairs), "after dropping rules that fail once one dimension "
                                          "takes another size"))
    return stages, pairs


def _congruent(space: Space, c: Candidate) -> bool:
    """Same root operator and output, inputs pairwise equal functions."""
    a, b = space.t_node[c.source], space.t_node[c.target]
    if b < 0 or space.n_inst[a] != space.n_inst[b] or space.t_out[c.source] != \
            space.t_out[c.target]:
        return False
    return all(space.t_fp[x] == space.t_fp[y]
               for x, y in zip(space.n_children[a], space.n_children[b]))


def _drop_instances(pairs: list[Candidate]) -> list[Candidate]:
    """Drop a rule that is an instance of a kept one: the same operators, with a substitution
    of the kept rule's variables (which may identify several) giving this rule's variables,
    and the kept rule's rank and dimension preconditions entailed by this rule's."""
    groups: dict[str, list[Candidate]] = {}
    for c in pairs:
        groups.setdefault(_VAR.sub("_", c.key[0] + " -> " + c.key[1]), []).append(c)
    dropped: set[int] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda c: (-len(c.variables), _n_equal(c.tokens), c.key))
        kept: list[Candidate] = []
        for c in group:
            general = next((k for k in kept if _instance_of(c, k)), None)
            if general is None:
                kept.append(c)
                continue
            dropped.add(id(c))
            if general.occurrences == c.occurrences:      # the same variables: keep its shapes
                general.examples += [e for e in c.examples if e not in general.examples]
    return [c for c in pairs if id(c) not in dropped]


def _instance_of(specific: Candidate, general: Candidate) -> bool:
    sub: dict[str, str] = {}
    for g, s in zip(general.occurrences, specific.occurrences):
        if sub.setdefault(g, s) != s:
            return False
    rank = {}
    for name, axis in specific.tokens:
        rank[name] = max(rank.get(name, 0), axis + 1)
    for name, axis in general.tokens:
        if (sub[name], axis) not in specific.tokens:
            return False
    if any(rank[sub[name]] != sum(1 for n, _ in general.tokens if n == name) for name in sub):
        return False
    first: dict[Any, Any] = {}
    for (name, axis), tok in general.tokens.items():
        mapped = specific.tokens[(sub[name], axis)]
        if first.setdefault(tok, mapped) != mapped:
            return False
    return True


def _n_equal(tokens: dict) -> int:
    classes: dict[Any, int] = {}
    for tok in tokens.values():
        classes[tok] = classes.get(tok, 0) + 1
    return sum(n - 1 for n in classes.values())


def _survives_resizing(space: Space, c: Candidate) -> bool:
    """Re-fingerprint the rule on the first environment with one dimension class resized.

    A symbol (all its occurrences, and k/2 with k) or a fixed size (the 1s of 1x1 weights) is
    set to a fresh size at a time; wherever the source is still well-shaped the target must be
    too, and equal. This drops rules that hold only because a size is 1 (Transpose of two
    unit axes is the identity), which rank and dim_eq preconditions cannot express.
    """
    kinds = {n: space.var_kind[v] for n, v in c.variables.items()}
    base = dict(space.envs[0])
    fresh = max(max(e.values()) for e in space.envs) + 1
    symbols = sorted(set().union(*(k.symbols() for k in kinds.values())))
    fixed = sorted({d for k in kinds.values() for d in k.dims if isinstance(d, int)})
    trials = [("symbol", s) for s in symbols] + [("fixed", d) for d in fixed]
    for i, (what, which) in enumerate(trials):
        env = dict(base)
        if what == "symbol":
            env[which] = fresh + (fresh % 2 if which == "k" else 0)
        size = fresh + 2 + i

        def shape(kind: Kind) -> tuple[int, ...]:
            s = kind.shape(env)
            if what == "fixed":
                s = tuple(size if isinstance(d, int) and d == which else x
                          for d, x in zip(kind.dims, s))
            return s
        rng = np.random.default_rng(i)
        values = {v: rng.integers(0, space.p, size=shape(kinds[n]), dtype=np.int64)
                  for n, v in c.variables.items()}
        src = _evaluate(space, c.source, values, {})
        if src is None:
            continue
        dst = _evaluate(space, c.target, values, {})
        if dst is None or dst.shape != src.shape or not np.array_equal(dst, src):
            return False
    return True


def _evaluate(space: Space, tid: int, values: dict[int, np.ndarray], memo: dict
              ) -> np.ndarray | None:
    """A term's residues for the given variable values; None if a node is ill-shaped."""
    node = space.t_node[tid]
    if node < 0:
        return values[tid]
    if node not in memo:
        inst = space.instances[space.n_inst[node]]
        xs = [_evaluate(space, ch, values, memo) for ch in space.n_children[node]]
        out = None
        if all(x is not None for x in xs):
            try:
                inst.op.shape_fn([x.shape for x in xs], inst.norm)
                out = inst.op.mod_fn(xs, inst.norm, space.p)
            except ShapeFault:
                out = None
        memo[node] = out
    out = memo[node]
    return None if out is None else out[space.t_out[tid]]
