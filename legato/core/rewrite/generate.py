"""Rule generation (TASO section 3): enumerate small operator graphs, pair the ones that compute
the same function, prune redundant pairs, and emit verified rules.

    >>> result = generate_rules(2, ops=["Add", "MatMul", "Transpose"], seed=0)
    >>> print(result.summary())           # the count after every stage
    >>> save_rules("rules.json", result.rules, meta=result.meta())

Stages (each count is printed by `summary()`; see [Note: pruning]):
  graphs -> fingerprint classes -> candidate pairs -> constant -> single root -> renaming
  -> common subgraph -> trivial -> implied -> numeric verification.

The search space (pattern variables, shape environments, enumeration, fingerprints) is
described in `_enumerate.py`; the operator menu in [Note: operator menu] below.

[Note: operator menu] Every operator of `ops.OPS` takes part, with this fixed attribute menu:
Add, Sub, Mul, Div, MatMul (two inputs); Relu, Sigmoid, Tanh, Sqrt, Neg, Reciprocal, Identity;
Gemm with transB 0 or 1, with or without C (alpha = beta = 1, transA = 0); Conv 1x1 (pads 0),
3x3 (pads 1) and 3x3 group 2 (pads 1), stride 1, each with or without bias; MaxPool and
AveragePool 3x3, pads 1, stride 1; BatchNormalization (inference, default epsilon) whose four
parameters are its own variables; Concat of two inputs on axis 0 or 1; Split into two equal
halves on axis 0 or 1 (opset-13 form: no `split` input); Transpose with perm (1, 0),
(0, 1, 3, 2), (0, 2, 3, 1) or (0, 3, 1, 2); Reshape to (-1) or (0, -1); ReduceSum over axis 0 or
1 with keepdims = 1. Constant operands (Reshape's shape, ReduceSum's axes) are `Constant` nodes
in the patterns. Conv and pooling list kernel_shape, pads, strides (and dilations, group) as
exporters write them. Identity graphs only ever give trivial rules: a bare variable as a
target is written `Identity(x)` because a pattern's root must be an operator.

[Note: pruning] A bucket (one fingerprint) with several graphs yields one candidate per graph
after the first: the graph (source) -> the earliest, hence smallest, other graph of the bucket
whose variables it binds (target), as TASO pairs each graph with the first of its hash. Then:
- constant: both sides compute a constant (Sub(x, x)): dropped as degenerate.
- single root: a source whose root is a multi-output node (a Split half) would leave the
  other half dangling when rewritten; dropped.
- renaming: variables are renamed x0, x1, ... in order of first occurrence (source, then
  target); pairs with the same renamed source, target and preconditions are one rule.
- common subgraph: source and target share an operator node, the same operator applied to the
  same inputs (hash-consing makes this node identity); TASO drops these because abstracting the
  shared node into a variable gives a smaller rule that covers the pair.
- trivial: identical source and target (Identity(x) -> x, written Identity(x) -> Identity(x)).
- implied: the roots are the same operator on inputs that are pairwise equal (congruence with
  smaller rules), or another rule has the same patterns with weaker preconditions (a rule
  found on x-kind and on t-kind variables); graphs with a non-representative subgraph were
  never built (see [Note: enumeration] in `_enumerate.py`).
- numeric: `verify_numeric` in float64 on every shape environment; failures are reported and
  dropped. Where float64 gives NaN on both sides at the same places (Sqrt or
  BatchNormalization of a negative), a NaN-aware comparison decides instead (see `_numeric`).

Preconditions: each variable's rank, and `dim_eq` for every dimension that its kind's template
shares with another (the same symbol, or the same fixed size), so a rule applies exactly to the
shape relations it was found on; it may be narrower than necessary, never wider.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np

from legato.core.errors import ConfigError
from legato.core.rewrite._enumerate import Instance, Kind, Progress, Space, menu
from legato.core.rewrite._opshapes import ShapeFault
from legato.core.rewrite.ops import DEFAULT_PRIME, OPS, check_prime
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.verify import pattern_model, verify_numeric

__all__ = ["DEFAULT_ENVS", "DEFAULT_KINDS", "GenerateResult", "GenerationError",
           "generate_rules", "parse_shapes"]


class GenerationError(ConfigError):
    """Invalid generation settings (unknown operator, bad shape environment)."""


DEFAULT_KINDS: tuple[Kind, ...] = (
    Kind("x", ("a", "b"), 3), Kind("y", ("b", "c"), 3), Kind("z", ("c", "d"), 2),
    Kind("v", ("c",), 1),
    Kind("t", ("n", "k", "h", "w"), 3), Kind("u", ("k", "k", 1, 1), 2),
    Kind("f", ("k", "k", 3, 3), 2), Kind("g", ("k", "k/2", 3, 3), 1), Kind("e", ("k",), 1),
    *(Kind(name, ("k",), 1, ("BatchNormalization", i + 1))
      for i, name in enumerate(("scale", "bias", "mean", "var"))),
)
"""Matrices x (a, b), y (b, c), z (c, d) and a row vector v (c,); NCHW tensors t, 1x1, 3x3 and
group-2 3x3 conv weights, a channel vector e; BatchNormalization's parameters."""

SYMBOLS = ("a", "b", "c", "d", "n", "k", "h", "w")
DEFAULT_ENVS: tuple[Mapping[str, int], ...] = (
    {"a": 2, "b": 4, "c": 6, "d": 3, "n": 2, "k": 4, "h": 3, "w": 5},
    {"a": 4, "b": 6, "c": 2, "d": 5, "n": 4, "k": 2, "h": 5, "w": 3},
    {"a": 6, "b": 2, "c": 4, "d": 3, "n": 2, "k": 6, "h": 4, "w": 3},
)
"""Three shape environments; symbols differ within each (a dimension equality is never an
accident) and change across them. Even a, b, c, n, k let Split halve them."""


def parse_shapes(spec: str) -> tuple[dict[str, int], ...]:
    """Shape environments from text: `"a=2,b=4,...;a=4,b=6,..."`, one group per environment.

    Every symbol of `SYMBOLS` must be given in each group; k must be even (group-2 weights
    have k/2 input channels).
    """
    envs = []
    for i, group in enumerate(g for g in spec.split(";") if g.strip()):
        env: dict[str, int] = {}
        for item in group.split(","):
            name, eq, value = item.partition("=")
            name = name.strip()
            if not eq or name not in SYMBOLS:
                raise GenerationError(f"shape environment {i}: {item.strip()!r} is not "
                                      f"SYMBOL=SIZE with SYMBOL one of {', '.join(SYMBOLS)}")
            try:
                env[name] = int(value)
            except ValueError:
                raise GenerationError(f"shape environment {i}: {name}={value.strip()!r} is not "
                                      "an integer") from None
        _check_env(env, i)
        envs.append(env)
    if not envs:
        raise GenerationError(f"--shapes {spec!r} gives no environment; pass e.g. "
                              f"{_format_env(DEFAULT_ENVS[0])}")
    return tuple(envs)


def _format_env(env: Mapping[str, int]) -> str:
    return ",".join(f"{k}={env[k]}" for k in SYMBOLS)


def _check_env(env: Mapping[str, int], i: int) -> None:
    missing = [s for s in SYMBOLS if s not in env]
    if missing:
        raise GenerationError(f"shape environment {i} lacks {', '.join(missing)}; give every "
                              f"symbol, e.g. {_format_env(DEFAULT_ENVS[0])}")
    bad = {k: v for k, v in env.items() if v < 1}
    if bad:
        raise GenerationError(f"shape environment {i}: sizes {bad} must be >= 1")
    if env["k"] % 2:
        raise GenerationError(f"shape environment {i}: k={env['k']} must be even (group-2 "
                              "conv weights have k/2 input channels)")


def _resolve_ops(ops: Sequence[str] | None) -> list[str]:
    if ops is None:
        return sorted(OPS)
    names = [o.strip() for o in ops if o.strip()]
    unknown = [o for o in names if o not in OPS]
    if unknown:
        raise GenerationError(f"unknown operator(s) {unknown}; known: {', '.join(sorted(OPS))}")
    if not names:
        raise GenerationError(f"no operators given; pass some of {', '.join(sorted(OPS))}")
    return sorted(set(names), key=names.index)


@dataclasses.dataclass
class GenerateResult:
    """Generated rules, the count after every stage, and how the run ended."""

    rules: list[Rule]
    stages: list[tuple[str, int, str]]       # (stage, count, what it counts)
    failed: list[tuple[Rule, dict]]          # candidates dropped by numeric verification
    stop_reason: str                         # "done" or "time-limit"
    seconds: dict[str, float]
    config: dict[str, Any]

    def count(self, stage: str) -> int:
        for name, n, _ in self.stages:
            if name == stage:
                return n
        raise KeyError(f"no stage {stage!r}; stages: {[s for s, _, _ in self.stages]}")

    def summary(self) -> str:
        width = max(len(s) for s, _, _ in self.stages)
        lines = [f"{name:<{width}}  {n:>9}  {what}" for name, n, what in self.stages]
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        lines.append(f"stop: {self.stop_reason}; {times}")
        return "\n".join(lines)

    def meta(self) -> dict[str, Any]:
        return {"what": "rules generated by `legato rules generate` (TASO section 3)",
                "config": self.config, "stop_reason": self.stop_reason,
                "stages": {name: n for name, n, _ in self.stages},
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "numeric_failures": [r.name for r, _ in self.failed]}


def generate_rules(max_ops: int = 3, *, ops: Sequence[str] | None = None, seed: int = 0,
                   envs: Sequence[Mapping[str, int]] | None = None, max_vars: int = 4,
                   kinds: Sequence[Kind] | None = None, time_limit_s: float | None = None,
                   verify: bool = True, formal: bool = False, p: int = DEFAULT_PRIME,
                   progress: Progress | None = None) -> GenerateResult:
    """Enumerate graphs of up to `max_ops` operators and return the rules they give.

    Args:
        max_ops: largest graph, in operator nodes (TASO: 3 or 4).
        ops: operator names (default: every operator of `ops.OPS`).
        seed: seed of the random residues; the same seed gives the same rules, names, order.
        envs: shape environments (symbol -> size, see `parse_shapes`); default `DEFAULT_ENVS`.
        max_vars: most distinct variables in one graph (BatchNormalization parameters aside).
        kinds: variable kinds (default `DEFAULT_KINDS`).
        time_limit_s: stop enumerating after this many seconds (stop_reason "time-limit");
            the rules found so far are still paired, pruned and verified.
        verify: run `verify_numeric` on each rule and drop failures.
        formal: also record `prove.verify_formal` (Z3) on each rule; otherwise "not run".
        p: the prime of the fingerprints.
        progress: called as progress(stage, done, total) while enumerating and verifying.
    Returns:
        A `GenerateResult`.
    """
    if not isinstance(max_ops, int) or max_ops < 1:
        raise GenerationError(f"max_ops={max_ops!r} is invalid; pass an integer >= 1 (TASO "
                              "uses 3 or 4)")
    if max_vars < 1:
        raise GenerationError(f"max_vars={max_vars} is invalid; pass >= 1")
    check_prime(p)
    names = _resolve_ops(ops)
    envs = tuple(dict(e) for e in (envs or DEFAULT_ENVS))
    for i, env in enumerate(envs):
        _check_env(env, i)
    kinds = tuple(kinds or DEFAULT_KINDS)
    instances = [inst for name in names for inst in menu(name)]
    start = time.monotonic()
    deadline = None if time_limit_s is None else start + time_limit_s
    space = Space(instances, kinds, envs, seed=seed, p=p, max_vars=max_vars)
    stop = space.run(max_ops, deadline=deadline, progress=progress)
    t_enum = time.monotonic()
    stages, kept = _prune(space)
    t_prune = time.monotonic()
    rules, failed = _emit(space, kept, verify=verify, formal=formal, progress=progress)
    if verify:
        stages.append(("numeric", len(rules), "rules that pass float64 verification"))
    t_end = time.monotonic()
    config = {"max_ops": max_ops, "ops": names, "seed": seed, "max_vars": max_vars, "p": p,
              "envs": [dict(e) for e in envs],
              "kinds": {k.name: [list(k.dims), k.copies] for k in kinds}}
    return GenerateResult(rules, stages, failed, stop,
                          {"enumerate": t_enum - start, "prune": t_prune - t_enum,
                           "verify": t_end - t_prune, "total": t_end - start}, config)


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
    pre += [{"dim_eq": pos} for pos in classes.values() if len(pos) > 1]
    return pre, token_of


# ---- pairing and pruning -----------------------------------------------------------------------

@dataclasses.dataclass
class _Candidate:
    source: int
    target: int
    key: tuple = ()                     # (source text, target text, preconditions)
    rule: dict = dataclasses.field(default_factory=dict)
    tokens: dict = dataclasses.field(default_factory=dict)   # (name, axis) -> template dim
    examples: list = dataclasses.field(default_factory=list)
    variables: dict = dataclasses.field(default_factory=dict)  # name -> variable id
    occurrences: tuple = ()             # variable names in text order, source then target


_VAR = re.compile(r"(?<![A-Za-z])x[0-9]+")


def _prune(space: Space) -> tuple[list[tuple[str, int, str]], list[_Candidate]]:
    stages = [("graphs", space.graphs, "graphs enumerated (valid on every shape environment)"),
              ("classes", len(space.first) - len(space.var_kind),
               "distinct fingerprints among them")]
    pairs: list[_Candidate] = []
    for fp, more in space.more.items():
        masks: dict[int, int] = {}
        for m in (space.first[fp], *more):
            vm = space.t_vars[m]
            if space.t_size[m] > 0:
                partner = min((t for mask, t in masks.items() if not mask & ~vm), default=None)
                if partner is not None:
                    pairs.append(_Candidate(m, partner))
            masks.setdefault(vm, m)
    stages.append(("candidates", len(pairs),
                   "graph -> earliest equal graph over a subset of its variables"))

    pairs = [c for c in pairs if space.t_fp[c.source] not in space.constant]
    stages.append(("constant", len(pairs), "after dropping constant-valued pairs"))

    def multi(t: int) -> bool:
        return space.instances[space.n_inst[space.t_node[t]]].num_outputs > 1
    pairs = [c for c in pairs if not multi(c.source)]
    stages.append(("single root", len(pairs), "after dropping sources rooted at a Split half"))

    seen: dict[tuple, _Candidate] = {}
    for c in pairs:
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
    pairs = list(seen.values())
    stages.append(("renaming", len(pairs), "after merging pairs equal up to variable names"))

    pairs = [c for c in pairs if space.nodes(c.source).isdisjoint(space.nodes(c.target))]
    stages.append(("common subgraph", len(pairs), "after dropping pairs sharing an operator"))

    pairs = [c for c in pairs if c.key[0] != c.key[1]]
    stages.append(("trivial", len(pairs), "after dropping identical source and target"))

    pairs = [c for c in pairs if not _congruent(space, c)]
    pairs = _drop_instances(pairs)
    stages.append(("implied", len(pairs), "after dropping pairs implied by a smaller or more "
                                          "general rule"))

    pairs = [c for c in pairs if _survives_resizing(space, c)]
    stages.append(("resized", len(pairs), "after dropping rules that fail once one dimension "
                                          "takes another size"))
    pairs.sort(key=lambda c: (space.t_size[c.source], space.t_size[c.target], c.key))
    return stages, pairs


def _congruent(space: Space, c: _Candidate) -> bool:
    """Same root operator and output, inputs pairwise equal functions."""
    a, b = space.t_node[c.source], space.t_node[c.target]
    if b < 0 or space.n_inst[a] != space.n_inst[b] or space.t_out[c.source] != \
            space.t_out[c.target]:
        return False
    return all(space.t_fp[x] == space.t_fp[y]
               for x, y in zip(space.n_children[a], space.n_children[b]))


def _drop_instances(pairs: list[_Candidate]) -> list[_Candidate]:
    """Drop a rule that is an instance of a kept one: the same operators, with a substitution
    of the kept rule's variables (which may identify several) giving this rule's variables,
    and the kept rule's rank and dimension preconditions entailed by this rule's."""
    groups: dict[str, list[_Candidate]] = {}
    for c in pairs:
        groups.setdefault(_VAR.sub("_", c.key[0] + " -> " + c.key[1]), []).append(c)
    dropped: set[int] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda c: (-len(c.variables), _n_equal(c.tokens), c.key))
        kept: list[_Candidate] = []
        for c in group:
            general = next((k for k in kept if _instance_of(c, k)), None)
            if general is None:
                kept.append(c)
                continue
            dropped.add(id(c))
            if general.occurrences == c.occurrences:      # the same variables: keep its shapes
                general.examples += [e for e in c.examples if e not in general.examples]
    return [c for c in pairs if id(c) not in dropped]


def _instance_of(specific: _Candidate, general: _Candidate) -> bool:
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


def _survives_resizing(space: Space, c: _Candidate) -> bool:
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


# ---- emitting and verifying -------------------------------------------------------------------

def _emit(space: Space, pairs: list[_Candidate], *, verify: bool, formal: bool,
          progress: Progress | None) -> tuple[list[Rule], list[tuple[Rule, dict]]]:
    prove = _formal() if formal else None
    rules, failed = [], []
    for i, c in enumerate(pairs):
        if progress is not None and (i % 16 == 0 or i == len(pairs) - 1):
            progress("verify", i + 1, len(pairs))
        digest = hashlib.sha1(repr(c.key).encode()).hexdigest()[:10]
        d = {"name": f"gen-{digest}", "origin": "generated", **c.rule,
             "examples": c.examples,
             "verification": {"fingerprint": f"equal mod {space.p} on {len(space.envs)} "
                                             "shape environments",
                              "z3": "not run"}}
        rule = Rule.from_json(d)
        if verify:
            record = _numeric(rule)
            rule = rule.with_verification(numeric=record["numeric"],
                                          numeric_detail=record.get("detail", ""))
            if record["numeric"] != "passed":
                failed.append((rule, record))
                continue
        if prove is not None:
            rule = rule.with_verification(**prove(rule))
        rules.append(rule)
    return rules, failed


def _formal() -> Any:
    try:
        from legato.core.rewrite.prove import verify_formal
    except ImportError:
        return None
    return verify_formal


def _numeric(rule: Rule) -> dict[str, Any]:
    """`verify_numeric`, and where it fails, a float64 check that counts NaN == NaN.

    verify_numeric feeds standard normals and compares with np.allclose, so a rule over Sqrt
    (or BatchNormalization's variance) fails on NaN == NaN even when both sides are NaN at the
    same places; those rules are decided by the NaN-aware check below.
    """
    record = verify_numeric(rule)
    if record["numeric"] == "passed" or "nan" not in str(record.get("detail", "")).lower():
        return record
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    for ex in rule.examples:
        shapes = dict(ex)
        src = ReferenceEvaluator(pattern_model(rule.source, shapes))
        dst = ReferenceEvaluator(pattern_model(rule.target, shapes))
        for _ in range(3):
            feed = {v: rng.standard_normal(shapes[v]) for v in rule.source.inputs}
            want = src.run(None, feed)
            got = dst.run(None, {v: feed[v] for v in rule.target.inputs})
            for w, g in zip(want, got):
                if np.shape(w) != np.shape(g) or not np.allclose(g, w, rtol=1e-9, atol=1e-12,
                                                                 equal_nan=True):
                    return record
    return {"numeric": "passed",
            "detail": f"{len(rule.examples)} shapes x 3 random inputs, float64, NaN where "
                      "both sides are NaN (verify_numeric counts NaN != NaN)"}
