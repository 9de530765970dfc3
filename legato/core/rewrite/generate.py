"""Rule generation (TASO section 3): enumerate small operator graphs, pair the ones that compute
the same function, prune redundant pairs, and emit verified rules.

    >>> result = generate_rules(2, ops=["Add", "MatMul", "Transpose"], seed=0)
    >>> print(result.summary())           # the count after every stage
    >>> save_rules("rules.json", result.rules, meta=result.meta())

Stages (each count is printed by `summary()`; see [Note: pruning]):
  graphs -> fingerprint classes -> candidate pairs -> constant -> single root -> renaming
  -> common subgraph -> trivial -> implied -> resized -> numeric verification.

The search space (pattern variables, shape environments, enumeration, fingerprints) is
described in `_enumerate.py`; the operator menu in [Note: operator menu] below.

[Note: operator menu] Every operator of `ops.OPS` but LRN takes part (LRN's one rule is
hand-written: its target needs a derived weight the enumeration does not build), with this
fixed attribute menu:
Add, Sub, Mul, Div of equal shapes or with a vector broadcast along the last axis; MatMul of
matrices and vectors (rank <= 2); Relu, Sigmoid, Tanh, Sqrt, Neg, Reciprocal, Identity;
Gemm with transB 0 or 1, with or without C (alpha = beta = 1, transA = 0); Conv 1x1 (pads 0),
3x3 (pads 1) and 3x3 group 2 (pads 1), stride 1, each with or without bias; MaxPool and
AveragePool 3x3, pads 1, stride 1; BatchNormalization (inference, default epsilon) whose four
parameters are its own variables; Concat of two inputs on axis 0 or 1; Split into two equal
halves on axis 0 or 1 (opset-13 form: no `split` input); Transpose with perm (1, 0),
(0, 1, 3, 2), (0, 2, 3, 1) or (0, 3, 1, 2); Reshape to (-1) or (0, -1); ReduceSum over axis 0 or
1 with keepdims = 1. Constant operands (Reshape's shape, ReduceSum's axes) are `Constant` nodes
in the patterns. Conv and pooling list kernel_shape, pads, strides (and dilations, group) as
exporters write them. Identity graphs only ever give trivial rules: a bare variable as a
target is written `Identity(x)` because a pattern's root must be an operator. As in TASO's
generator (NO_SAME_INPUTS), an operator never takes the same term at two inputs (no Add(x, x));
the data input of Conv, pooling and BatchNormalization depends on a non-weight variable.

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
  smaller rules), or the rule is an instance of another: the same operators, and a
  substitution of the other's variables (possibly identifying several) gives this one, whose
  preconditions entail the other's; or a rule with the same source and preconditions has a
  smaller (or earlier) target, an equal graph; graphs with a non-representative subgraph were
  never built (see [Note: enumeration] in `_enumerate.py`).
- resized: fingerprinted again with one dimension class at a fresh size
  (`_survives_resizing` in `_pairs.py`).
- numeric: `verify_numeric` in float64 on every shape environment; failures are reported and
  dropped. Where float64 gives NaN on both sides at the same places (Sqrt or
  BatchNormalization of a negative), a NaN-aware comparison decides instead (see `_numeric`).

Preconditions: each variable's rank, and `dim_eq` for every dimension that its kind's template
shares with another (the same symbol, or the same fixed size), so a rule applies exactly to the
shape relations it was found on (it may be narrower than necessary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from legato.core.errors import ConfigError
from legato.core.rewrite._enumerate import Kind, Progress, Space, menu
from legato.core.rewrite._pairs import Candidate, prune
from legato.core.rewrite.ops import DEFAULT_PRIME, OPS, check_prime
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.verify import pattern_model, verify_numeric
from legato.core.stop import StopReason

__all__ = ["DEFAULT_ENVS", "DEFAULT_KINDS", "GenerateResult", "GenerationError",
           "generate_rules", "parse_shapes"]


class GenerationError(ConfigError):
    """Invalid generation settings (unknown operator, bad shape environment)."""


DEFAULT_KINDS: tuple[Kind, ...] = (
    Kind("x", ("a", "b"), 3), Kind("y", ("b", "c"), 3), Kind("z", ("c", "d"), 2),
    Kind("v", ("c",), 1),
    Kind("t", ("n", "k", "h", "w"), 3), Kind("u", ("k", "k", 1, 1), 2, weight=True),
    Kind("f", ("k", "k", 3, 3), 2, weight=True), Kind("g", ("k", "k/2", 3, 3), 1, weight=True),
    Kind("e", ("k",), 1),
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


def _on_menu(name: str) -> bool:
    try:
        menu(name)
    except KeyError:
        return False
    return True


MENU_OPS = tuple(o for o in sorted(OPS) if _on_menu(o))
"""The operators generation enumerates: every one of `ops.OPS` with a menu entry."""


def _resolve_ops(ops: Sequence[str] | None) -> list[str]:
    if ops is None:
        return list(MENU_OPS)
    names = [o.strip() for o in ops if o.strip()]
    unknown = [o for o in names if o not in MENU_OPS]
    if unknown:
        off_menu = [o for o in unknown if o in OPS]
        why = (f" ({', '.join(off_menu)} has semantics but no generation menu: its rules are "
               "hand-written)" if off_menu else "")
        raise GenerationError(f"unknown operator(s) {unknown}{why}; known: "
                              f"{', '.join(MENU_OPS)}")
    if not names:
        raise GenerationError(f"no operators given; pass some of {', '.join(MENU_OPS)}")
    return sorted(set(names), key=names.index)


@dataclasses.dataclass
class GenerateResult:
    """Generated rules, the count after every stage, and how the run ended."""

    rules: list[Rule]
    stages: list[tuple[str, int, str]]       # (stage, count, what it counts)
    failed: list[tuple[Rule, dict]]          # candidates dropped by numeric verification
    stop_reason: StopReason                  # EXHAUSTED or TIME_LIMIT
    seconds: dict[str, float]
    config: dict[str, Any]

    def count(self, stage: str) -> int:
        for name, n, _ in self.stages:
            if name == stage:
                return n
        raise KeyError(f"no stage {stage!r}; stages: {[s for s, _, _ in self.stages]}")

    def keep_shippable(self) -> None:
        """Keep only the rules legato ships: proved with Z3, passed in float64, and never
        growing a graph (fewer operators in the target, Identity not counted), so that they
        can only simplify what the search explores; adds a "shippable" stage."""
        self.rules = [r for r in self.rules if r.verified and shrinks(r)]
        self.stages.append(("shippable", len(self.rules),
                            "proved with Z3, passed in float64, fewer operators in the target"))

    def summary(self) -> str:
        width = max(len(s) for s, _, _ in self.stages)
        lines = [f"{name:<{width}}  {n:>9}  {what}" for name, n, what in self.stages]
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        lines.append(f"stop: {self.stop_reason}; {times}")
        return "\n".join(lines)

    def meta(self) -> dict[str, Any]:
        """What `save_rules` stores beside the rules: settings, stage counts, failures (no
        timings, so that one seed always writes the same file)."""
        return {"what": "rules generated by `legato rules generate` (TASO section 3)",
                "config": self.config, "stop_reason": self.stop_reason,
                "stages": {name: n for name, n, _ in self.stages},
                "numeric_failures": [r.name for r, _ in self.failed]}


def shrinks(rule: Rule) -> bool:
    """The target has fewer operators than the source (an Identity counts as none)."""
    return (sum(n.op != "Identity" for n in rule.target.nodes)
            < sum(n.op != "Identity" for n in rule.source.nodes))


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
        time_limit_s: stop enumerating after this many seconds (stop_reason TIME_LIMIT);
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
    stages, kept = prune(space, progress)
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


# ---- emitting and verifying -------------------------------------------------------------------

def _emit(space: Space, pairs: list[Candidate], *, verify: bool, formal: bool,
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
            try:
                record = prove(rule)
            except Exception as err:  # noqa: BLE001 (one rule the prover cannot read)
                record = {"z3": "error", "z3_detail": f"{type(err).__name__}: {err}"}
            rule = rule.with_verification(**record)
        rules.append(rule)
    return rules, failed


def _formal() -> Any:
    try:
        from legato.core.rewrite.prove import verify_formal
    except ImportError:
        return None
    return verify_formal


def _numeric(rule: Rule) -> dict[str, Any]:
    """`_numeric_checked` without numpy's warnings (NaN from Sqrt of a negative is expected)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _numeric_checked(rule)


def _numeric_checked(rule: Rule) -> dict[str, Any]:
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
