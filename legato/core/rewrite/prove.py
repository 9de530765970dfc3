"""Formal verification of rewrite rules with Z3: source == target under the operator axioms.

    >>> prove_rule(rule)                  # rule: a `Rule` from pattern.py
    {'z3': 'proved', 'detail': 'source == target for 2 root(s); axioms used: ...', 'seconds': 0.1}

Each root of a rule's source and target becomes a term (`_terms.E`): pattern variables are
tensor constants, ONNX operators map to the axioms' operators (Gemm -> `gemm`, Conv ->
`conv`/`convb`, n-ary Concat and Split -> nested binary ones, Identity -> its input), negative
axes become `rank(t) + axis`, `"$name"` attributes become symbolic constants and
`{"dim": [v, axis]}` becomes `dim(v, axis)`, BatchNormalization -> `bn`, Div -> `tdiv`, a
Reshape of a vector to [-1, 1, ..., 1] -> `chan`, LRN -> `lrn`, a Constant whose value is
`{"band": [v, size, alpha]}` -> `band(dim(v, 1), size, alpha, rank(v) - 2)`. Operators
without axioms (Sigmoid, other Reshapes, ...) and known operators with attributes the
translation does not read become uninterpreted functions named by op and attributes: that is
sound (only congruence is known about them), and the detail lists them when the proof fails.

Z3 then checks that `not (src_1 == tgt_1 and ...)` is unsatisfiable together with
- every axiom (quantified, with its trigger),
- the rule's preconditions (`rank`, `min_rank`, `dim_eq`, `same_shape`; the others do not
  bear on values),
- the facts of the concrete permutations the rule mentions (and their compositions),
- typing facts of every source and target node: what ONNX requires for it to be defined
  (MatMul's inner dims agree, Gemm's C broadcasts to its output, Concat's inputs share a rank,
  Split's sizes add up, Conv's bias has one value per output channel). A proof therefore says:
  wherever the rule's source and target are both well-shaped, they are equal (as TASO's).

"proved": E-matching made the negation unsat within the timeout, and the facts alone (with
the same terms) are not unsat, so the proof is not vacuous. "refuted": a concrete model of the
axioms contradicts the rule: on one of the rule's example shapes the real operators (which
`validate_axioms` checks against every axiom) satisfy every fact and give different roots; or,
with `refute_s > 0`, Z3's model-based instantiation found an abstract model (rare: it seldom
finishes over these theories). "unknown": everything else, including timeouts; never "proved".
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

import numpy as np

from legato.core.errors import ConfigError
from legato.core.rewrite import axioms as A
from legato.core.rewrite._terms import (OPS, E, Signature, TermError, Undefined, const,
                                         evaluate, mk, opaque, same_value, var)
from legato.core.rewrite.pattern import Pattern, PNode, Rule, split_ref

__all__ = ["prove_rule", "rule_terms", "verify_formal"]

_MAX_PERMS = 64   # closure of the rule's permutations under composition stops here
_REVERSALS = 6    # Transpose without perm: reversal facts for ranks 1.._REVERSALS


class _Unsupported(Exception):
    """The rule uses something the translation cannot express; the proof is "unknown"."""


def _key(attrs: dict[str, Any]) -> tuple:
    def freeze(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, freeze(x)) for k, x in v.items()))
        return v
    return tuple(sorted((k, freeze(v)) for k, v in attrs.items()))


class _Side:
    """One pattern translated to terms, with the typing facts of its nodes."""

    def __init__(self, pattern: Pattern, facts: list[E], notes: set[str],
                 flags: set[str]) -> None:
        self.facts, self.notes, self.flags = facts, notes, flags
        self.values: dict[str, list[E]] = {v: [var(v)] for v in pattern.inputs}
        self.ints: dict[str, list[E]] = {}
        for node in pattern.nodes:
            self.values[node.id] = self._node(node)
        self.roots = [self.ref(r) for r in pattern.outputs]

    def ref(self, ref: str) -> E:
        name, index = split_ref(ref)
        return self.values[name][index]

    # attribute values ----------------------------------------------------------------------
    def axis(self, value: Any, t: E) -> E:
        """An axis attribute, normalized against the rank of `t`."""
        if isinstance(value, str) and value.startswith("$"):
            k = var(value, "Int")
            return mk("ite", mk("<", k, 0), mk("rank", t) + k, k)
        if isinstance(value, int) and not isinstance(value, bool):
            return const(value, "Int") if value >= 0 else mk("rank", t) + value
        raise _Unsupported(f"axis {value!r} is neither an int nor a \"$name\"")

    def int_value(self, value: Any) -> E:
        if isinstance(value, dict) and "dim" in value:
            name, axis = value["dim"]
            if name not in self.values or name in self.ints:
                raise _Unsupported(f"{{'dim': {value['dim']}}} names no pattern variable")
            return mk("dim", var(name), self.axis(axis, var(name)))
        if isinstance(value, str) and value.startswith("$"):
            return var(value, "Int")
        if isinstance(value, int) and not isinstance(value, bool):
            return const(value, "Int")
        raise _Unsupported(f"int attribute value {value!r} is not understood")

    def real_value(self, value: Any) -> E:
        if isinstance(value, str) and value.startswith("$"):
            return var(value, "Real")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return const(float(value), "Real")
        raise _Unsupported(f"float attribute value {value!r} is not understood")

    # operators -----------------------------------------------------------------------------
    def _opaque(self, node: PNode, ins: list[E], why: str = "") -> list[E]:
        self.notes.add(node.op + (f" ({why})" if why else ""))
        label = f"{node.op}{_key(node.attributes)}"
        return [opaque(f"{label}#{i}", ins) for i in range(node.num_outputs)]

    def _node(self, node: PNode) -> list[E]:
        ins = [self.ref(r) for r in node.inputs]
        attrs = node.attributes
        handler = getattr(self, f"_op_{node.op.lower()}", None)
        if handler is None:
            return self._opaque(node, ins)
        try:
            return handler(node, ins, attrs)
        except _Unsupported as err:
            return self._opaque(node, ins, str(err))

    def _need(self, node: PNode, ins: list, allowed: Sequence[str], arity: Sequence[int]) -> None:
        extra = sorted(set(node.attributes) - set(allowed))
        if extra:
            raise _Unsupported(f"attributes {extra} are not read")
        if len(ins) not in arity or node.num_outputs != 1 and node.op != "Split":
            raise _Unsupported(f"{len(ins)} inputs / {node.num_outputs} outputs")

    def _op_identity(self, node, ins, attrs):
        self._need(node, ins, (), (1,))
        return ins

    def _elementwise(self, node, ins, arity):
        self._need(node, ins, (), (arity,))
        return [mk(node.op.lower(), *ins)]

    _op_add = _op_mul = _op_sub = lambda self, n, ins, a: self._elementwise(n, ins, 2)
    _op_neg = _op_relu = _op_sqrt = lambda self, n, ins, a: self._elementwise(n, ins, 1)

    def _op_div(self, node, ins, attrs):
        self._need(node, ins, (), (2,))
        return [mk("tdiv", *ins)]

    def _op_batchnormalization(self, node, ins, attrs):
        """Inference BatchNormalization (momentum only matters in training)."""
        self._need(node, ins, ("epsilon", "momentum"), (5,))
        y = ins[0]
        self.facts.append(mk("<=", 2, mk("rank", y)))
        for v in ins[1:]:       # scale, bias, mean, variance: one value per channel (axis 1)
            self.facts += [mk("==", mk("rank", v), 1),
                           mk("==", mk("dim", v, 0), mk("dim", y, 1))]
        return [mk("bn", self.real_value(attrs.get("epsilon", 1e-5)), *ins)]

    def _op_lrn(self, node, ins, attrs):
        self._need(node, ins, ("alpha", "beta", "bias", "size"), (1,))
        if "size" not in attrs:
            raise _Unsupported("LRN without size")
        size = self.int_value(attrs["size"])
        self.facts += [mk("<=", 2, mk("rank", ins[0])), mk("<=", 1, size)]
        al, be, bi = (self.real_value(attrs.get(n, d))
                      for n, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
        return [mk("lrn", al, be, bi, size, ins[0])]

    def _op_reshape(self, node, ins, attrs):
        """Only the per-channel shaping of a vector, Reshape(v, [-1, 1, ..., 1])."""
        self._need(node, ins, (), (2,))
        shape = self.ints.get(split_ref(node.inputs[1])[0])
        if not isinstance(shape, list) or not shape:
            raise _Unsupported("the shape is not a Constant with value_ints")
        values = [s.args[0] if s.op == "const" else None for s in shape]
        if values[0] != -1 or any(v != 1 for v in values[1:]):
            raise _Unsupported(f"shape {values} is not [-1, 1, ..., 1]")
        return [mk("chan", ins[0], len(values) - 1)]

    def _op_matmul(self, node, ins, attrs):
        self._need(node, ins, (), (2,))
        self.facts += A.ok_matmul(*ins)
        return [mk("matmul", *ins)]

    def _perm(self, value: Any, t: E) -> E:
        if value is None:
            self.flags.add("reversal")
            return mk("prev", mk("rank", t))
        if isinstance(value, str) and value.startswith("$"):
            return var(value, "Perm")
        if isinstance(value, dict) and set(value) == {"compose"} and len(value["compose"]) == 2:
            inner, outer = (self._perm(v, t) for v in value["compose"])
            return mk("pcomp", inner, outer)
        if isinstance(value, list) and sorted(value) == list(range(len(value))):
            return const(tuple(value), "Perm")
        raise _Unsupported(f"perm {value!r} is not a permutation")

    def _op_transpose(self, node, ins, attrs):
        self._need(node, ins, ("perm",), (1,))
        p = self._perm(attrs.get("perm"), ins[0])
        self.facts += A.ok_transpose(p, ins[0])
        return [mk("transpose", p, ins[0])]

    def _op_concat(self, node, ins, attrs):
        self._need(node, ins, ("axis",), range(1, 1 << 16))
        if "axis" not in attrs:
            raise _Unsupported("Concat without axis")
        k = self.axis(attrs["axis"], ins[0])
        out = ins[-1]
        for t in reversed(ins[:-1]):
            self.facts += A.ok_concat(k, t, out)
            out = mk("concat", k, t, out)
        return [out]

    def _op_constant(self, node, ins, attrs):
        if set(attrs) == {"value_float"}:
            return [mk("sc", self.real_value(attrs["value_float"]))]
        band = attrs.get("value") if set(attrs) == {"value"} else None
        if isinstance(band, dict) and set(band) == {"band"}:
            name, size, alpha = band["band"]
            x = var(name)
            return [mk("band", mk("dim", x, 1), self.int_value(size), self.real_value(alpha),
                       mk("rank", x) - 2)]
        if set(attrs) == {"value_ints"} and isinstance(attrs["value_ints"], list):
            self.ints[node.id] = [self.int_value(v) for v in attrs["value_ints"]]
        elif set(attrs) == {"value_ints"} and isinstance(attrs["value_ints"], str):
            self.ints[node.id] = attrs["value_ints"]   # "$name": sized by its reader
        return [opaque(f"Constant{_key(attrs)}#0", [])]

    def _op_split(self, node, ins, attrs):
        self._need(node, ins, ("axis", "split", "num_outputs"), (1, 2))
        t, n = ins[0], node.num_outputs
        k = self.axis(attrs.get("axis", 0), t)
        sizes: Any = attrs.get("split")
        if len(node.inputs) == 2:
            sizes = self.ints.get(split_ref(node.inputs[1])[0])
            if sizes is None:
                raise _Unsupported("split sizes come from a node other than a Constant "
                                   "with value_ints")
        if isinstance(sizes, str):
            sizes = [var(f"{sizes}[{i}]", "Int") for i in range(n)]
        elif sizes is not None:
            sizes = [s if isinstance(s, E) else self.int_value(s) for s in sizes]
        else:
            chunk = mk("dim", t, k) + (n - 1)
            chunk = mk("div", chunk, n)
            sizes = [chunk] * (n - 1)
            sizes.append(mk("dim", t, k) - _sum(sizes))
        if len(sizes) != n:
            raise _Unsupported(f"{len(sizes)} split sizes for {n} outputs")
        outs, rest = [], t
        for i in range(n - 1):
            tail = _sum(sizes[i + 1:])
            self.facts += A.ok_split(k, sizes[i], tail, rest)
            outs.append(mk("split0", k, sizes[i], tail, rest))
            rest = mk("split1", k, sizes[i], tail, rest)
        return outs + [rest]

    def _op_conv(self, node, ins, attrs):
        self._need(node, ins, ("auto_pad", "dilations", "group", "kernel_shape", "pads",
                               "strides"), (2, 3))
        g = self.int_value(attrs.get("group", 1))
        rest = {k: v for k, v in attrs.items() if k != "group"
                and not (k == "auto_pad" and v == "NOTSET")}
        ca = const(_key(rest), "Conv")
        x, w = ins[:2]
        self.facts += A.ok_conv(g, x, w)
        if g.op == "const":
            self.facts.append(mk("==", mk("dim", x, 1), mk("*", mk("dim", w, 1), g)))
        if len(ins) == 2:
            return [mk("conv", ca, g, x, w)]
        b = ins[2]
        self.facts += [mk("==", mk("rank", b), 1), mk("==", mk("dim", b, 0), mk("dim", w, 0))]
        return [mk("convb", ca, g, x, w, b)]

    def _op_gemm(self, node, ins, attrs):
        self._need(node, ins, ("alpha", "beta", "transA", "transB"), (2, 3))
        al, be = (self.real_value(attrs.get(n, 1.0)) for n in ("alpha", "beta"))
        pa, pb = (const((1, 0) if attrs.get(n, 0) == 1 else (0, 1), "Perm")
                  if attrs.get(n, 0) in (0, 1) else _raise(_Unsupported(f"{n}={attrs[n]!r}"))
                  for n in ("transA", "transB"))
        a, b = ins[:2]
        ta, tb = mk("transpose", pa, a), mk("transpose", pb, b)
        rows, cols = mk("dim", ta, 0), mk("dim", tb, 1)
        self.facts += [mk("==", mk("rank", a), 2), mk("==", mk("rank", b), 2),
                       mk("==", mk("dim", ta, 1), mk("dim", tb, 0))]
        if len(ins) == 2:
            return [mk("gemmnc", al, pa, pb, a, b)]
        c = ins[2]
        rc = mk("rank", c)
        last, first = mk("dim", c, rc - 1), mk("dim", c, 0)
        self.facts += [mk("<=", rc, 2),
                       mk("or", mk("<", rc, 1), mk("==", last, 1), mk("==", last, cols)),
                       mk("or", mk("<", rc, 2), mk("==", first, 1), mk("==", first, rows))]
        return [mk("gemm", al, be, pa, pb, a, b, c)]


def _raise(err: Exception) -> Any:
    raise err


def _sum(terms: Sequence[E]) -> E:
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def rule_terms(rule: Rule) -> tuple[list[E], list[E], list[E], set[str], set[str]]:
    """Translate a rule: (source roots, target roots, facts, ops without axioms, flags).

    Args:
        rule: the rule.
    Returns:
        Root terms of source and target (paired in order), the facts (preconditions and typing
        facts, Bool terms), the operators handled as uninterpreted functions, and translation
        flags ("reversal" when a Transpose has no perm).
    """
    facts: list[E] = []
    notes: set[str] = set()
    flags: set[str] = set()
    src = _Side(rule.source, facts, notes, flags)
    dst = _Side(rule.target, facts, notes, flags)
    for kind, arg in rule.preconditions:
        if kind == "rank":
            facts.append(mk("==", mk("rank", var(arg[0])), int(arg[1])))
        elif kind == "min_rank":
            facts.append(mk("<=", int(arg[1]), mk("rank", var(arg[0]))))
        elif kind == "dim_eq":
            (v1, a1), *others = arg
            for v2, a2 in others:
                facts.append(mk("==", mk("dim", var(v1), src.axis(a1, var(v1))),
                                mk("dim", var(v2), src.axis(a2, var(v2)))))
        elif kind == "same_shape":
            first = var(arg[0])
            for other in arg[1:]:
                facts += [mk("==", mk("shp", first), mk("shp", var(other))),
                          mk("==", mk("rank", first), mk("rank", var(other)))]
                flags.add(f"same_shape:{arg[0]}:{other}")
    return src.roots, dst.roots, facts, notes, flags


def _perm_facts(sig: Signature, reversal: bool) -> list[Any]:
    """Facts about every concrete permutation registered in `sig`, closed under composition."""
    z3 = sig.z3
    perms = {v for (s, v) in sig.consts if s == "Perm"}
    if reversal:
        perms |= {tuple(range(n - 1, -1, -1)) for n in range(1, _REVERSALS + 1)}
    frontier = set(perms)
    while frontier and len(perms) < _MAX_PERMS:
        new = {tuple(p[i] for i in q) for p, q in itertools.product(perms, frontier)
               if len(p) == len(q)} | {tuple(p[i] for i in q) for p, q in
                                       itertools.product(frontier, perms) if len(p) == len(q)}
        frontier = new - perms
        perms |= frontier
    f = {n: sig.func(n, OPS[n].args, OPS[n].result) for n in
         ("pat", "pinv", "plen", "isid", "isswap", "pcomp", "prev")}
    c = {p: sig.const(p, "Perm") for p in sorted(perms)}
    out = [z3.Distinct(*c.values())] if len(c) > 1 else []
    for p, cp in c.items():
        out += [f["plen"](cp) == len(p), f["isid"](cp) == (p == tuple(range(len(p)))),
                f["isswap"](cp) == (len(p) >= 2 and p == tuple(range(len(p) - 2)) +
                                    (len(p) - 1, len(p) - 2))]
        out += [f["pat"](cp, i) == v for i, v in enumerate(p)]
        out += [f["pinv"](cp, v) == i for i, v in enumerate(p)]
        for q, cq in c.items():
            r = tuple(p[i] for i in q) if len(p) == len(q) else None
            if r in c:
                out.append(f["pcomp"](cp, cq) == c[r])
        if reversal and p == tuple(range(len(p) - 1, -1, -1)):
            out.append(f["prev"](z3.IntVal(len(p))) == cp)
    return out


def prove_rule(rule: Rule, *, axioms: Sequence[A.Axiom] | None = None,
               timeout_s: float = 10.0, refute_s: float = 0.0) -> dict[str, Any]:
    """Try to prove that a rule's source and target roots are equal under the axioms.

    [Note: proof phases] Z3 runs with E-matching only (no model-based quantifier
    instantiation, no auto-configuration): instances come from the axioms' triggers, so a
    proof takes milliseconds and a failed one ends as soon as no trigger matches. A proof is
    re-checked without the negated goal (same terms, same facts): if that is unsat too, the
    facts contradict the axioms and the proof is vacuous. A failed proof is then tried on the
    rule's example shapes with the real operators (a concrete counter-model), and, if
    `refute_s > 0`, with Z3's model-based instantiation for that long.

    Args:
        rule: the rule.
        axioms: the axioms to use (default: `axioms.AXIOMS`, all validated).
        timeout_s: Z3's time limit for the proof.
        refute_s: time for the search for a counter-model after a failed proof (0: skip).
    Returns:
        {"z3": "proved" | "refuted" | "unknown", "detail": str, "seconds": float}.
    """
    if not timeout_s > 0 or not refute_s >= 0:
        raise ConfigError(f"timeout_s={timeout_s!r}, refute_s={refute_s!r} are invalid; pass "
                          "timeout_s > 0 and refute_s >= 0 seconds, e.g. 10 and 0")
    start = time.perf_counter()

    def done(status: str, detail: str) -> dict[str, Any]:
        return {"z3": status, "detail": detail, "seconds": round(time.perf_counter() - start, 4)}

    axioms = A.AXIOMS if axioms is None else tuple(axioms)
    try:
        src, dst, facts, notes, flags = rule_terms(rule)
    except (_Unsupported, TermError, KeyError, ValueError, TypeError) as err:
        return done("unknown", f"cannot translate rule {rule.name!r}: {err}")
    uncovered = (f"; operators without axioms (uninterpreted): {sorted(notes)}" if notes
                 else "")
    sig = Signature()
    z3 = sig.z3
    try:
        goals = [sig.to_z3(s) == sig.to_z3(t) for s, t in zip(src, dst)]
        ground = [sig.to_z3(f) for f in facts] + _same_shape(sig, flags)
        ground += _perm_facts(sig, "reversal" in flags)
        seen = z3.Function("seen", sig.sorts["T"], z3.BoolSort())   # roots in the E-graph
        ground += [seen(sig.to_z3(r)) for r in (*src, *dst)]
        solver = z3.Solver()
        solver.set("auto_config", False)
        solver.set("mbqi", False)
        solver.set("timeout", max(1, int(timeout_s * 1000)))
        tracked = {}
        for ax in axioms:
            label = z3.Bool(f"axiom:{ax.name}")
            tracked[label.get_id()] = ax.name
            solver.assert_and_track(ax.formula(sig), label)
        solver.add(*ground)
        solver.push()
        solver.add(z3.Not(z3.And(*goals)))
        result = solver.check()
        if result == z3.unsat:
            used = sorted(tracked[c.get_id()] for c in solver.unsat_core()
                          if c.get_id() in tracked)
            solver.pop()
            if solver.check() == z3.unsat:
                return done("unknown", "the rule's preconditions and the shape facts of its "
                            "source and target contradict the axioms (they are never all "
                            "well-shaped together), so the proof is vacuous")
            return done("proved", f"source == target for {len(goals)} root(s); axioms used: "
                        f"{', '.join(used)}")
        reason = solver.reason_unknown()
        witness = _counterexample(rule, src, dst, facts)
        if witness:
            return done("refuted", witness)
        budget = min(refute_s, timeout_s - (time.perf_counter() - start))
        if budget > 0:
            solver.set("mbqi", True)
            solver.set("timeout", max(1, int(budget * 1000)))
            if solver.check() == z3.sat:
                model = solver.model()
                bad = [i for i, g in enumerate(goals) if z3.is_false(model.eval(g, True))]
                return done("refuted", f"Z3 found a model of the {len(axioms)} axioms where "
                            f"root(s) {bad or '?'} differ: the axioms do not imply this rule (it "
                            f"is wrong, or needs an axiom legato lacks){uncovered}")
        return done("unknown", f"Z3 could not prove it ({reason}) in "
                    f"{time.perf_counter() - start:.2f} s{uncovered}")
    except z3.Z3Exception as err:
        return done("unknown", f"Z3 failed on rule {rule.name!r}: {err}{uncovered}")


def _counterexample(rule: Rule, src: list[E], dst: list[E], facts: list[E], seed: int = 0
                    ) -> str | None:
    """A concrete refutation: an example shape where the real operators (a model of the
    axioms, as `validate_axioms` checks) satisfy the facts and give different roots."""
    rng = np.random.default_rng(seed)
    for example in rule.examples:
        env = {}
        for v, given in example:
            if v.startswith("$"):
                continue                 # attribute values: the terms hold them symbolically
            if isinstance(given, tuple) and given and isinstance(given[0], tuple):
                env[v] = np.asarray(dict(given).get("value", ()), dtype=np.int64)
            else:
                env[v] = rng.standard_normal(given)
        try:
            if not all(evaluate(f, env) for f in facts):
                continue
            pairs = [(evaluate(s, env), evaluate(t, env)) for s, t in zip(src, dst)]
        except (Undefined, TermError, IndexError, ValueError):
            continue   # outside the rule's scope, or symbolic / uninterpreted parts
        for i, (want, got) in enumerate(pairs):
            if not same_value(want, got):
                diff = (f"shape {np.shape(got)} instead of {np.shape(want)}"
                        if np.shape(got) != np.shape(want) else
                        f"max abs error {float(np.max(np.abs(got - want))):.3g}")
                return (f"counterexample: with shapes {dict(example)} the real operators (a "
                        f"model of the axioms) satisfy every fact but root {i} differs ({diff})")
    return None


def _same_shape(sig: Signature, flags: set[str]) -> list[Any]:
    """`same_shape` preconditions: every dim equal (quantified over the axis)."""
    z3, out = sig.z3, []
    dim = sig.func("dim", ("T", "Int"), "Int")
    for flag in sorted(f for f in flags if f.startswith("same_shape:")):
        _, a, b = flag.split(":", 2)
        ta, tb = sig.to_z3(var(a)), sig.to_z3(var(b))
        j = z3.Int(f"{flag}.j")
        out += [z3.ForAll([j], dim(ta, j) == dim(tb, j), patterns=[dim(ta, j)]),
                z3.ForAll([j], dim(ta, j) == dim(tb, j), patterns=[dim(tb, j)])]
    return out


def verify_formal(rule: Rule, *, timeout_s: float = 10.0, refute_s: float = 0.0
                  ) -> dict[str, Any]:
    """`prove_rule` as a verification record: {"z3", "z3_detail", "z3_seconds"}.

    Args:
        rule: the rule.
        timeout_s: Z3's time limit for the proof.
        refute_s: time for the counter-model search after a failed proof.
    Returns:
        A dict to merge with `rule.with_verification(**record)`.
    """
    r = prove_rule(rule, timeout_s=timeout_s, refute_s=refute_s)
    return {"z3": r["z3"], "z3_detail": r["detail"], "z3_seconds": r["seconds"]}
