"""Operator axioms for formal rule verification, as TASO does, each validated on real tensors.

An `Axiom` is `forall vars: hyps -> lhs == rhs` (or another Bool conclusion) over the term
language of `_terms.py`, with a Z3 trigger (the lhs unless given) and example bindings.
`AXIOMS` covers the algebra of Add/Mul/Relu, MatMul (associativity, distributivity, concat along
output columns, rows or the contraction), Transpose (composition, identity, through MatMul,
Concat, Add, Mul, Relu), Concat/Split round trips, Conv (linear in input and weights, merging
weights along output channels, with and without bias), Gemm as MatMul/Transpose/Add, LRN with
beta = 0.75 as a banded 1x1 Conv of x * x (`lrn-def`), and the shape axioms (`rank-*`,
`dim-*`) the side conditions are discharged with. `validate_axioms()`
evaluates both sides of every axiom in float64 (through `legato.core.rewrite.ops`) on random
tensors of each example's shapes; an example must satisfy the hypotheses and make both sides
defined, so a wrong axiom (or a vacuous example) fails before it proves anything.

[Note: shapes in the axioms] As in TASO, the tensor sort carries no shape: an axiom states an
identity that holds wherever both of its sides are defined. Where well-shaped instances can
still differ in value, or where the shape axioms would otherwise assign ranks and dims to
ill-shaped terms and so contradict each other, the axiom carries side conditions written with
`rank(t)`, `dim(t, i)` and `shp(t)`: the `ok_*` conditions each ONNX operator needs (axes in
range, equal ranks, inner dims equal, split sizes positive and adding up), axes that line up
(`k == rank(b) - 1` for MatMul's output columns), split sizes equal to the parts' dims,
`group == 1` for merging Conv weights (TASO's validator caught a wrong grouped-conv merge), and
equal shapes for distributivity (broadcast summands differ). Axes are non-negative here; the
prover turns ONNX's negative axes into `rank(t) + axis`. `dim-positive` excludes empty tensors
(as TASO does). Concat and Split are binary (`concat(k, a, b)`, `split0/split1(k, n0, n1, t)`
for the parts of sizes n0 and n1); the prover nests them for more inputs or outputs.
Permutations are opaque values; the prover states `pat`, `pinv`, `plen`, `pcomp`, `isid` and
`isswap` for the concrete permutations a rule mentions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from legato.core.rewrite._terms import (E, Signature, TermError, Undefined, const, evaluate,
                                         mk, variables)
from legato.core.rewrite._terms import var as _var

__all__ = ["AXIOMS", "Axiom", "AxiomError", "axiom", "get_axiom", "ok_concat", "ok_conv",
           "ok_matmul", "ok_split", "ok_transpose", "validate_axiom", "validate_axioms"]


class AxiomError(TermError):
    """A malformed axiom (trigger missing variables, example missing a binding)."""


# ---- axioms -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Axiom:
    """`forall vars: hyps -> concl`, with a Z3 trigger and example bindings for validation.

    Attributes:
        name: kebab-case name.
        concl: a Bool term, usually `lhs == rhs`.
        hyps: Bool side conditions.
        trigger: the term(s) whose appearance instantiates the axiom (default: the lhs); they
            must mention every variable.
        examples: bindings for validation: a shape tuple per T variable, a value for the rest.
    """

    name: str
    concl: E
    hyps: tuple[E, ...] = ()
    trigger: tuple[E, ...] = ()
    examples: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.concl.sort != "Bool" or any(h.sort != "Bool" for h in self.hyps):
            raise AxiomError(f"axiom {self.name!r}: conclusion and hypotheses must be Bool")
        if not self.trigger:
            if self.concl.op != "==":
                raise AxiomError(f"axiom {self.name!r}: give a trigger (not an equality)")
            object.__setattr__(self, "trigger", (self.concl.args[0],))
        missing = set(self.variables) - set(variables(*self.trigger))
        if missing:
            raise AxiomError(f"axiom {self.name!r}: trigger {self.trigger} does not mention "
                             f"{sorted(missing)}; Z3 could never instantiate them")

    @property
    def variables(self) -> dict[str, str]:
        return variables(self.concl, *self.hyps)

    def formula(self, sig: Signature) -> Any:
        """The axiom as a quantified Z3 formula with its trigger."""
        z3 = sig.z3
        env = {n: z3.Const(f"{self.name}.{n}", sig.sorts[s]) for n, s in self.variables.items()}
        body = sig.to_z3(self.concl, env)
        if self.hyps:
            body = z3.Implies(z3.And(*(sig.to_z3(h, env) for h in self.hyps)), body)
        trig = [sig.to_z3(t, env) for t in self.trigger]
        pattern = trig[0] if len(trig) == 1 else z3.MultiPattern(*trig)
        return z3.ForAll(list(env.values()), body, patterns=[pattern], qid=self.name)

    def __str__(self) -> str:
        hyps = " & ".join(map(repr, self.hyps))
        return f"{self.name}: {hyps + ' -> ' if hyps else ''}{self.concl!r}"


def axiom(name: str, lhs: E, rhs: E, *, when: Sequence[E] = (), examples: Sequence[dict] = (),
          trigger: Sequence[E] = ()) -> Axiom:
    """`when -> lhs == rhs`, triggered by `lhs` unless `trigger` is given."""
    return Axiom(name, mk("==", lhs, rhs), tuple(when), tuple(trigger), tuple(examples))


def _fn(op: str) -> Callable[..., E]:
    return lambda *args: mk(op, *args)


add, mul, sub, neg, relu, matmul = map(_fn, ("add", "mul", "sub", "neg", "relu", "matmul"))
transpose, concat, split0, split1 = map(_fn, ("transpose", "concat", "split0", "split1"))
conv, convb, gemm, gemmnc, sc = map(_fn, ("conv", "convb", "gemm", "gemmnc", "sc"))
rank, dim, shp, pat, pinv, plen = map(_fn, ("rank", "dim", "shp", "pat", "pinv", "plen"))
pcomp, isid, isswap, imax = map(_fn, ("pcomp", "isid", "isswap", "max"))
tdiv, sqrt, bn, chan, lrn, band = map(_fn, ("tdiv", "sqrt", "bn", "chan", "lrn", "band"))
eq, le, lt, ite, and_, or_, not_ = map(_fn, ("==", "<=", "<", "ite", "and", "or", "not"))

a, b, c, t, x, w, w1, w2 = (_var(n) for n in ("a", "b", "c", "t", "x", "w", "w1", "w2"))
a1, a2, b1, b2, s, x1, x2 = (_var(n) for n in ("a1", "a2", "b1", "b2", "s", "x1", "x2"))
k, k1, k2, j, n0, n1, m0, m1, g = (_var(n, "Int")
                                   for n in ("k", "k1", "k2", "j", "n0", "n1", "m0", "m1", "g"))
m, vv = _var("m"), _var("vv")
p, q, pa, pb = (_var(n, "Perm") for n in ("p", "q", "pa", "pb"))
_ZERO = const(0, "Int")
ca, al, be, v = _var("ca", "Conv"), _var("al", "Real"), _var("be", "Real"), _var("v", "Real")


def ok_concat(axis: E, first: E, second: E) -> list[E]:
    """Int conditions Concat(first, second, axis) needs (other dims are not compared)."""
    return [le(0, axis), lt(axis, rank(first)), eq(rank(first), rank(second))]


def ok_split(axis: E, size0: E, size1: E, whole: E) -> list[E]:
    """Int conditions Split(whole, [size0, size1], axis) needs (no empty parts)."""
    return [le(0, axis), lt(axis, rank(whole)), le(1, size0), le(1, size1),
            eq(size0 + size1, dim(whole, axis))]


def ok_matmul(left: E, right: E) -> list[E]:
    """Int conditions MatMul(left, right) needs (batch broadcasting is not checked)."""
    rr = rank(right)
    return [le(1, rank(left)), le(1, rr),
            eq(dim(left, rank(left) - 1), dim(right, ite(le(2, rr), rr - 2, _ZERO)))]


def ok_transpose(perm: E, data: E) -> list[E]:
    """Int conditions Transpose(data, perm) needs."""
    return [eq(plen(perm), rank(data))]


def ok_conv(group: E, data: E, weight: E) -> list[E]:
    """Int conditions Conv(data, weight, group) needs (channel counts are not checked)."""
    return [le(1, group), eq(rank(data), rank(weight)), le(3, rank(data))]


_SAME3 = ({"a": (2, 3), "b": (2, 3), "c": (2, 3)}, {"a": (2, 1, 4), "b": (3, 1), "c": (4,)})
_PAIRS = ({"a": (2, 3), "b": (2, 3)}, {"a": (2, 3, 4), "b": (4,)}, {"a": (3, 1), "b": (1, 4)})


def _elementwise() -> list[Axiom]:
    out = [axiom("sub-def", sub(a, b), add(a, neg(b)), examples=_PAIRS),
           axiom("mul-one", mul(sc(v), a), a, when=[eq(v, 1.0)],
                 examples=[{"v": 1.0, "a": (2, 3)}, {"v": 1.0, "a": ()}]),
           axiom("mul-add-distrib", mul(a, add(b, c)), add(mul(a, b), mul(a, c)),
                 examples=[_SAME3[0], {"a": (), "b": (2, 3), "c": (3,)}]),
           axiom("relu-idempotent", relu(relu(a)), relu(a), examples=[{"a": (2, 3)}, {"a": (4,)}])]
    for name, f in (("add", add), ("mul", mul)):
        out += [axiom(f"{name}-comm", f(a, b), f(b, a), examples=_PAIRS),
                axiom(f"{name}-assoc", f(f(a, b), c), f(a, f(b, c)), examples=_SAME3)]
    return out


def _matmul() -> list[Axiom]:
    r2 = lambda e: le(2, rank(e))  # noqa: E731
    return [
        axiom("matmul-assoc", matmul(matmul(a, b), c), matmul(a, matmul(b, c)),
              when=[or_(eq(rank(b), 2), and_(r2(a), r2(b), r2(c)))],
              examples=[{"a": (2, 3), "b": (3, 4), "c": (4, 5)},
                        {"a": (3,), "b": (3, 4), "c": (4,)},
                        {"a": (5, 2, 3), "b": (3, 4), "c": (1, 4, 2)},
                        {"a": (2, 3), "b": (5, 3, 4), "c": (1, 4, 2)}]),
        axiom("matmul-add-right", matmul(a, add(b, c)), add(matmul(a, b), matmul(a, c)),
              when=[eq(shp(b), shp(c))],
              examples=[{"a": (2, 3), "b": (3, 4), "c": (3, 4)},
                        {"a": (3,), "b": (2, 3, 4), "c": (2, 3, 4)},
                        {"a": (2, 3), "b": (3,), "c": (3,)}]),
        axiom("matmul-add-left", matmul(add(a, b), c), add(matmul(a, c), matmul(b, c)),
              when=[eq(shp(a), shp(b))],
              examples=[{"a": (2, 3), "b": (2, 3), "c": (3, 4)},
                        {"a": (2, 2, 3), "b": (2, 2, 3), "c": (3,)}]),
        axiom("matmul-concat-cols", matmul(a, concat(k, b1, b2)),
              concat(rank(matmul(a, b1)) - 1, matmul(a, b1), matmul(a, b2)),
              when=[r2(b1), eq(k, rank(b1) - 1), *ok_concat(k, b1, b2), *ok_matmul(a, b1)],
              examples=[{"a": (2, 3), "b1": (3, 4), "b2": (3, 5), "k": 1},
                        {"a": (3,), "b1": (3, 2), "b2": (3, 1), "k": 1},
                        {"a": (2, 5, 3), "b1": (2, 3, 4), "b2": (2, 3, 2), "k": 2}]),
        axiom("matmul-concat-rows", matmul(concat(k, a1, a2), b),
              concat(rank(matmul(a1, b)) - 2, matmul(a1, b), matmul(a2, b)),
              when=[r2(a1), r2(b), eq(k, rank(a1) - 2), *ok_concat(k, a1, a2),
                    *ok_matmul(a1, b)],
              examples=[{"a1": (2, 3), "a2": (4, 3), "b": (3, 5), "k": 0},
                        {"a1": (2, 1, 3), "a2": (2, 2, 3), "b": (3, 4), "k": 1},
                        {"a1": (1, 3), "a2": (2, 3), "b": (4, 3, 2), "k": 0}]),
        axiom("matmul-concat-inner", matmul(concat(k1, a1, a2), concat(k2, b1, b2)),
              add(matmul(a1, b1), matmul(a2, b2)),
              when=[r2(a1), r2(b1), eq(k1, rank(a1) - 1), eq(k2, rank(b1) - 2),
                    eq(dim(a1, k1), dim(b1, k2)), *ok_concat(k1, a1, a2),
                    *ok_concat(k2, b1, b2)],
              examples=[{"a1": (2, 3), "a2": (2, 4), "b1": (3, 5), "b2": (4, 5), "k1": 1,
                         "k2": 0},
                        {"a1": (2, 2, 3), "a2": (2, 2, 1), "b1": (3, 5), "b2": (1, 5), "k1": 2,
                         "k2": 0}]),
        axiom("matmul-scalar-left", matmul(mul(a, s), b), mul(matmul(a, b), s),
              when=[eq(rank(s), 0)],
              examples=[{"a": (2, 3), "s": (), "b": (3, 4)}, {"a": (3,), "s": (), "b": (2, 3, 4)}]),
        axiom("matmul-scalar-right", matmul(a, mul(b, s)), mul(matmul(a, b), s),
              when=[eq(rank(s), 0)],
              examples=[{"a": (2, 3), "s": (), "b": (3, 4)}, {"a": (2, 3), "s": (), "b": (3,)}]),
    ]


def _transpose() -> list[Axiom]:
    ew = [axiom(f"transpose-{n}", transpose(p, f(a, b)), f(transpose(p, a), transpose(p, b)),
                when=[eq(rank(a), rank(b)), *ok_transpose(p, a)],
                examples=[{"p": (1, 0), "a": (2, 3), "b": (2, 3)},
                          {"p": (2, 0, 1), "a": (2, 1, 4), "b": (1, 3, 4)}])
          for n, f in (("add", add), ("mul", mul))]
    return ew + [
        axiom("transpose-compose", transpose(q, transpose(p, t)), transpose(pcomp(p, q), t),
              when=[*ok_transpose(p, t), eq(plen(q), plen(p))],
              examples=[{"p": (1, 0), "q": (1, 0), "t": (2, 3)},
                        {"p": (0, 2, 1), "q": (1, 0, 2), "t": (2, 3, 4)},
                        {"p": (2, 0, 1), "q": (2, 0, 1), "t": (2, 3, 4)}]),
        axiom("transpose-identity", transpose(p, t), t, when=[isid(p), eq(plen(p), rank(t))],
              examples=[{"p": (0, 1), "t": (2, 3)}, {"p": (0, 1, 2), "t": (2, 3, 4)}]),
        axiom("transpose-matmul", transpose(p, matmul(a, b)),
              matmul(transpose(p, b), transpose(p, a)),
              when=[isswap(p), eq(plen(p), rank(a)), eq(rank(a), rank(b)), *ok_matmul(a, b)],
              examples=[{"p": (1, 0), "a": (2, 3), "b": (3, 4)},
                        {"p": (0, 2, 1), "a": (2, 3, 4), "b": (2, 4, 5)},
                        {"p": (0, 2, 1), "a": (1, 3, 4), "b": (2, 4, 5)}]),
        axiom("transpose-concat", transpose(p, concat(k, a, b)),
              concat(pinv(p, k), transpose(p, a), transpose(p, b)),
              when=[*ok_concat(k, a, b), *ok_transpose(p, a)],
              examples=[{"p": (1, 0), "k": 0, "a": (2, 3), "b": (4, 3)},
                        {"p": (2, 0, 1), "k": 1, "a": (2, 3, 4), "b": (2, 5, 4)}]),
        axiom("transpose-relu", transpose(p, relu(t)), relu(transpose(p, t)),
              when=ok_transpose(p, t),
              examples=[{"p": (1, 0), "t": (2, 3)}, {"p": (2, 0, 1), "t": (2, 3, 4)}]),
    ]


def _concat_split() -> list[Axiom]:
    parts = (("first", split0, a, n0), ("second", split1, b, n1))
    out = [axiom(f"split-concat-{n}", f(k1, n0, n1, concat(k2, a, b)), part,
                 when=[eq(k1, k2), eq(n0, dim(a, k2)), eq(n1, dim(b, k2)), *ok_concat(k2, a, b)],
                 examples=[{"k1": 0, "k2": 0, "n0": 2, "n1": 1, "a": (2, 3), "b": (1, 3)},
                           {"k1": 2, "k2": 2, "n0": 4, "n1": 1, "a": (2, 3, 4), "b": (2, 3, 1)}])
           for n, f, part, _ in parts]
    out += [axiom(f"relu-split-{n}", relu(f(k, n0, n1, t)), f(k, n0, n1, relu(t)),
                  when=ok_split(k, n0, n1, t),
                  examples=[{"k": 1, "n0": 1, "n1": 2, "t": (2, 3)},
                            {"k": 0, "n0": 2, "n1": 2, "t": (4, 3)}]) for n, f, _, _ in parts]
    out += [axiom(f"{op}-split-{n}", f(k, n0, n1, e(a, b)), e(f(k, n0, n1, a), f(k, n0, n1, b)),
                  when=[eq(shp(a), shp(b)), *ok_split(k, n0, n1, a)],
                  examples=[{"k": 1, "n0": 1, "n1": 2, "a": (2, 3), "b": (2, 3)},
                            {"k": 0, "n0": 3, "n1": 1, "a": (4, 2, 2), "b": (4, 2, 2)}])
            for op, e in (("add", add), ("mul", mul)) for n, f, _, _ in parts]
    # parts of equally shaped tensors split alike are equally shaped (k-way splits nest)
    out += [axiom(f"shp-split-{n}", shp(f(k, n0, n1, a)), shp(f(k, n0, n1, b)),
                  when=[eq(shp(a), shp(b)), *ok_split(k, n0, n1, a)],
                  trigger=[f(k, n0, n1, a), f(k, n0, n1, b)],
                  examples=[{"k": 1, "n0": 1, "n1": 2, "a": (2, 3), "b": (2, 3)},
                            {"k": 0, "n0": 3, "n1": 1, "a": (4, 2), "b": (4, 2)}])
            for n, f, _, _ in parts]
    cases = ({"k": 0, "k1": 0, "k2": 0, "n0": 1, "n1": 2, "m0": 1, "m1": 2, "t": (3, 2)},
             {"k": 1, "k1": 1, "k2": 1, "n0": 3, "n1": 1, "m0": 3, "m1": 1, "t": (2, 4, 3)})
    out += [
        axiom("concat-split", concat(k, split0(k1, n0, n1, t), split1(k2, m0, m1, t)), t,
              when=[eq(k, k1), eq(k, k2), eq(n0, m0), eq(n1, m1), *ok_split(k, n0, n1, t)],
              examples=cases),
        axiom("concat-assoc", concat(k1, concat(k2, a, b), c), concat(k1, a, concat(k1, b, c)),
              when=[eq(k1, k2), *ok_concat(k1, a, b), eq(rank(c), rank(a))],
              examples=[{"k1": 0, "k2": 0, "a": (1, 3), "b": (2, 3), "c": (3, 3)},
                        {"k1": 1, "k2": 1, "a": (2, 1), "b": (2, 2), "c": (2, 3)}]),
        axiom("relu-concat", relu(concat(k, a, b)), concat(k, relu(a), relu(b)),
              when=ok_concat(k, a, b),
              examples=[{"k": 0, "a": (1, 3), "b": (2, 3)}, {"k": 2, "a": (2, 2, 1),
                                                              "b": (2, 2, 3)}]),
    ]
    for name, f in (("add", add), ("mul", mul)):
        out.append(axiom(
            f"{name}-concat", f(concat(k1, a1, a2), concat(k2, b1, b2)),
            concat(k1, f(a1, b1), f(a2, b2)),
            when=[eq(k1 - rank(a1), k2 - rank(b1)), le(rank(b1), rank(a1)),
                  eq(dim(a1, k1), dim(b1, k2)), eq(dim(a2, k1), dim(b2, k2)),
                  *ok_concat(k1, a1, a2), *ok_concat(k2, b1, b2)],
            examples=[{"a1": (2, 3), "a2": (2, 4), "b1": (3,), "b2": (4,), "k1": 1, "k2": 0},
                      {"a1": (2, 3), "a2": (4, 3), "b1": (2, 3), "b2": (4, 3), "k1": 0, "k2": 0},
                      {"a1": (2, 3), "a2": (2, 4), "b1": (1, 3), "b2": (1, 4), "k1": 1, "k2": 1},
                      {"a1": (2, 3, 4), "a2": (2, 3, 1), "b1": (3, 4), "b2": (3, 1), "k1": 2,
                       "k2": 1}]))
    return out


def _conv() -> list[Axiom]:
    pads, strides = {"pads": (1, 1, 1, 1)}, {"strides": (2, 2)}
    merge = [{"ca": pads, "g": 1, "k": 0, "x": (1, 3, 5, 5), "w1": (2, 3, 3, 3),
              "w2": (4, 3, 3, 3)},
             {"ca": strides, "g": 1, "k": 0, "x": (2, 2, 6, 6), "w1": (1, 2, 2, 2),
              "w2": (3, 2, 2, 2)},
             {"ca": {}, "g": 1, "k": 0, "x": (2, 3, 7), "w1": (2, 3, 3), "w2": (1, 3, 3)}]
    biased = [{**e, "k2": 0, "b1": (e["w1"][0],), "b2": (e["w2"][0],)} for e in merge]
    linear = [{"ca": pads, "g": 1, "x": (1, 3, 5, 5), "w1": (2, 3, 3, 3), "w2": (2, 3, 3, 3)},
              {"ca": pads, "g": 2, "x": (1, 4, 5, 5), "w1": (2, 2, 3, 3), "w2": (2, 2, 3, 3)}]
    return [
        axiom("conv-concat-weights", conv(ca, g, x, concat(k, w1, w2)),
              concat(1, conv(ca, g, x, w1), conv(ca, g, x, w2)),
              when=[eq(g, 1), eq(k, 0), *ok_concat(k, w1, w2), *ok_conv(g, x, w1)],
              examples=merge),
        axiom("convb-concat-weights", convb(ca, g, x, concat(k, w1, w2), concat(k2, b1, b2)),
              concat(1, convb(ca, g, x, w1, b1), convb(ca, g, x, w2, b2)),
              when=[eq(g, 1), eq(k, 0), eq(k2, 0), *ok_concat(k, w1, w2), *ok_concat(k2, b1, b2),
                    *ok_conv(g, x, w1)], examples=biased),
        axiom("conv-add-weights", conv(ca, g, x, add(w1, w2)),
              add(conv(ca, g, x, w1), conv(ca, g, x, w2)),
              when=[eq(shp(w1), shp(w2)), *ok_conv(g, x, w1)],
              examples=linear),
        axiom("conv-add-input", conv(ca, g, add(x1, x2), w),
              add(conv(ca, g, x1, w), conv(ca, g, x2, w)),
              when=[eq(shp(x1), shp(x2)), *ok_conv(g, x1, w)],
              examples=[{"ca": pads, "g": 1, "x1": (1, 3, 5, 5), "x2": (1, 3, 5, 5),
                         "w": (2, 3, 3, 3)},
                        {"ca": strides, "g": 2, "x1": (2, 4, 6, 6), "x2": (2, 4, 6, 6),
                         "w": (4, 2, 2, 2)}]),
        axiom("conv-scalar-weights", conv(ca, g, x, mul(w, s)), mul(conv(ca, g, x, w), s),
              when=[eq(rank(s), 0), *ok_conv(g, x, w)],
              examples=[{"ca": pads, "g": 1, "x": (1, 3, 5, 5), "w": (2, 3, 3, 3), "s": ()},
                        {"ca": {}, "g": 2, "x": (1, 4, 5), "w": (2, 2, 3), "s": ()}]),
    ]


def _batchnorm() -> list[Axiom]:
    """BatchNormalization (inference) spelled out per channel, and a Conv's output channels
    shifted or scaled per channel (what folding a BatchNormalization into a Conv needs).
    `chan(v, n)` is the vector v shaped [C, 1, ..., 1] (n ones) to broadcast over axis 1."""
    def vec(e: E, like: E, axis: int) -> list[E]:   # e is a vector of like's dim `axis`
        return [eq(rank(e), 1), eq(dim(e, 0), dim(like, axis))]

    n = rank(x) - 2
    out = [axiom("bn-def", bn(v, x, s, b, m, vv),
                 add(mul(sub(x, chan(m, n)), chan(tdiv(s, sqrt(add(vv, sc(v)))), n)),
                     chan(b, n)),
                 when=[le(2, rank(x)), *vec(s, x, 1), *vec(b, x, 1),
                       *vec(m, x, 1), *vec(vv, x, 1)],
                 examples=[{"v": 1e-5, "x": (2, 3, 4, 4), "s": (3,), "b": (3,), "m": (3,),
                            "vv": {"positive": (3,)}},
                           {"v": 1e-3, "x": (5, 2), "s": (2,), "b": (2,), "m": (2,),
                            "vv": {"positive": (2,)}}])]
    conv_ex = [{"ca": {"pads": (1, 1, 1, 1)}, "g": 1, "x": (1, 3, 5, 5), "w": (2, 3, 3, 3),
                "c": (2,), "m": (2,)},
               {"ca": {}, "g": 2, "x": (2, 4, 6), "w": (4, 2, 3), "c": (4,), "m": (4,)}]
    nobias = [{k_: v_ for k_, v_ in ex.items() if k_ != "c"} for ex in conv_ex]
    for name, f in (("add", add), ("sub", sub)):
        out.append(axiom(f"convb-{name}-chan", f(convb(ca, g, x, w, c), chan(m, n)),
                         convb(ca, g, x, w, f(c, m)),
                         when=[*ok_conv(g, x, w), *vec(c, w, 0),
                               *vec(m, w, 0)],
                         examples=conv_ex))
    out += [
        axiom("conv-add-chan", add(conv(ca, g, x, w), chan(m, n)), convb(ca, g, x, w, m),
              when=[*ok_conv(g, x, w), *vec(m, w, 0)], examples=nobias),
        axiom("conv-sub-chan", sub(conv(ca, g, x, w), chan(m, n)), convb(ca, g, x, w, neg(m)),
              when=[*ok_conv(g, x, w), *vec(m, w, 0)], examples=nobias),
        axiom("convb-mul-chan", mul(convb(ca, g, x, w, c), chan(m, n)),
              convb(ca, g, x, mul(w, chan(m, n + 1)), mul(c, m)),
              when=[*ok_conv(g, x, w), *vec(c, w, 0), *vec(m, w, 0)],
              examples=conv_ex),
    ]
    return out


def _lrn() -> list[Axiom]:
    """LRN (ONNX's definition) with beta = 0.75: x / d^0.75 with d = bias + alpha / size *
    (the sum of x^2 over channels c - floor((size - 1) / 2) .. c + ceil((size - 1) / 2)),
    written as d = Conv(x * x, band) + bias, where `band(C, size, alpha, n)` is the (C, C, 1,
    ..., 1) weight holding alpha / size inside that window (n spatial ones), and
    d^0.75 = sqrt(d) * sqrt(sqrt(d)). The examples cover odd and even sizes (where floor and
    ceil differ), fewer channels than the window, and ranks 3 to 5, so a window off by one
    at either end fails validation."""
    al, be, bi, nn = _var("al", "Real"), _var("be", "Real"), _var("bi", "Real"), _var("nn", "Int")
    d = add(conv(const((), "Conv"), 1, mul(x, x), band(dim(x, 1), nn, al, rank(x) - 2)), sc(bi))
    ex = [{"al": 1e-4, "bi": 1.0, "nn": 5, "x": (1, 8, 3, 3)},
          {"al": 0.5, "bi": 2.0, "nn": 4, "x": (2, 6, 5)},
          {"al": 2.0, "bi": 0.5, "nn": 5, "x": (1, 3, 2, 2, 2)},
          {"al": 1.0, "bi": 1.0, "nn": 2, "x": (1, 5, 4)},
          {"al": 0.3, "bi": 1.5, "nn": 3, "x": (2, 4, 2, 3)}]
    ex = [{**e, "be": 0.75} for e in ex]
    return [
        axiom("lrn-def", lrn(al, be, bi, nn, x), tdiv(x, mul(sqrt(d), sqrt(sqrt(d)))),
              when=[eq(be, 0.75), le(3, rank(x)), le(1, nn)], examples=ex),
        axiom("rank-lrn", rank(lrn(al, be, bi, nn, x)), rank(x),
              when=[le(2, rank(x)), le(1, nn)], examples=ex[:2]),
        axiom("dim-lrn", dim(lrn(al, be, bi, nn, x), j), dim(x, j),
              when=[le(0, j), lt(j, rank(x)), le(2, rank(x)), le(1, nn)],
              examples=[{**ex[0], "j": 1}, {**ex[1], "j": 2}]),
    ]


def _gemm() -> list[Axiom]:
    prod = matmul(transpose(pa, a), transpose(pb, b))
    two_d = [eq(rank(a), 2), eq(rank(b), 2), eq(plen(pa), 2), eq(plen(pb), 2)]
    return [
        axiom("gemm-def", gemm(al, be, pa, pb, a, b, c), add(mul(sc(al), prod), mul(sc(be), c)),
              when=two_d,
              examples=[{"al": 1.0, "be": 1.0, "pa": (0, 1), "pb": (1, 0), "a": (2, 3),
                         "b": (4, 3), "c": (4,)},
                        {"al": 0.5, "be": 2.0, "pa": (1, 0), "pb": (0, 1), "a": (3, 2),
                         "b": (3, 4), "c": (2, 4)},
                        {"al": 1.0, "be": 1.0, "pa": (0, 1), "pb": (0, 1), "a": (2, 3),
                         "b": (3, 4), "c": (1,)}]),
        axiom("gemm-nobias-def", gemmnc(al, pa, pb, a, b), mul(sc(al), prod), when=two_d,
              examples=[{"al": 1.0, "pa": (0, 1), "pb": (1, 0), "a": (2, 3), "b": (4, 3)},
                        {"al": -2.0, "pa": (1, 0), "pb": (1, 0), "a": (3, 2), "b": (4, 3)}]),
    ]


def _shapes() -> list[Axiom]:
    """How operators transform rank and dims (the side conditions' vocabulary)."""
    ax = lambda e, n: and_(le(0, e), lt(e, rank(n)))  # noqa: E731  (an axis of n)
    ra, rb = rank(a), rank(b)
    out = [
        Axiom("rank-nonneg", le(0, rank(t)), trigger=(rank(t),),
              examples=({"t": ()}, {"t": (2, 3)})),
        Axiom("dim-positive", le(1, dim(t, j)), hyps=(ax(j, t),), trigger=(dim(t, j),),
              examples=({"t": (2, 3), "j": 1}, {"t": (1,), "j": 0})),
        axiom("rank-scalar", rank(sc(v)), _ZERO, examples=[{"v": 1.0}, {"v": -2.5}]),
        axiom("rank-matmul", rank(matmul(a, b)),
              ite(and_(le(2, ra), le(2, rb)), imax(ra, rb),
                  ite(eq(ra, 1), ite(eq(rb, 1), _ZERO, rb - 1), ra - 1)), when=ok_matmul(a, b),
              examples=[{"a": (2, 3), "b": (3, 4)}, {"a": (3,), "b": (2, 3, 4)},
                        {"a": (2, 3), "b": (3,)}, {"a": (3,), "b": (3,)},
                        {"a": (5, 2, 3), "b": (3, 4)}]),
        axiom("dim-matmul-cols", dim(matmul(a, b), k), dim(b, rb - 1),
              when=[le(2, rb), eq(k, rank(matmul(a, b)) - 1), *ok_matmul(a, b)],
              examples=[{"a": (2, 3), "b": (3, 4), "k": 1}, {"a": (3,), "b": (2, 3, 4), "k": 1}]),
        axiom("dim-matmul-rows", dim(matmul(a, b), k), dim(a, ra - 2),
              when=[le(2, ra), le(2, rb), eq(k, rank(matmul(a, b)) - 2), *ok_matmul(a, b)],
              examples=[{"a": (2, 3), "b": (3, 4), "k": 0}, {"a": (5, 2, 3), "b": (3, 4), "k": 1}]),
        axiom("dim-transpose", dim(transpose(p, t), j), dim(t, pat(p, j)),
              when=[ax(j, t), *ok_transpose(p, t)],
              examples=[{"p": (1, 0), "t": (2, 3), "j": 0}, {"p": (2, 0, 1), "t": (2, 3, 4),
                                                               "j": 2}]),
        axiom("dim-concat", dim(concat(k, a, b), j),
              ite(eq(j, k), dim(a, k) + dim(b, k), dim(a, j)), when=[ax(j, a), *ok_concat(k, a, b)],
              examples=[{"k": 0, "a": (1, 3), "b": (2, 3), "j": 0},
                        {"k": 0, "a": (1, 3), "b": (2, 3), "j": 1}]),
        axiom("dim-conv", dim(conv(ca, g, x, w), j), ite(eq(j, 0), dim(x, 0), dim(w, 0)),
              when=[le(0, j), le(j, 1), *ok_conv(g, x, w)],
              examples=[{"ca": {}, "g": 1, "x": (2, 3, 5, 5), "w": (4, 3, 3, 3), "j": 1},
                        {"ca": {}, "g": 1, "x": (2, 3, 5, 5), "w": (4, 3, 3, 3), "j": 0}]),
        axiom("dim-convb", dim(convb(ca, g, x, w, b), j), ite(eq(j, 0), dim(x, 0), dim(w, 0)),
              when=[le(0, j), le(j, 1), *ok_conv(g, x, w)],
              examples=[{"ca": {}, "g": 2, "x": (2, 4, 5), "w": (4, 2, 3), "b": (4,), "j": 1},
                        {"ca": {}, "g": 1, "x": (2, 3, 5), "w": (4, 3, 3), "b": (4,), "j": 0}]),
        axiom("rank-conv", rank(conv(ca, g, x, w)), rank(x), when=ok_conv(g, x, w),
              examples=[{"ca": {}, "g": 1, "x": (2, 3, 5, 5), "w": (4, 3, 3, 3)},
                        {"ca": {}, "g": 1, "x": (2, 3, 5), "w": (4, 3, 3)}]),
        axiom("rank-convb", rank(convb(ca, g, x, w, b)), rank(x), when=ok_conv(g, x, w),
              examples=[{"ca": {}, "g": 1, "x": (2, 3, 5), "w": (4, 3, 3), "b": (4,)},
                        {"ca": {}, "g": 1, "x": (1, 3, 4, 4), "w": (2, 3, 1, 1), "b": (2,)}]),
    ]
    for name, f in (("add", add), ("mul", mul), ("tdiv", tdiv)):
        rest = k - ra + rb
        out += [
            axiom(f"rank-{name}", rank(f(a, b)), imax(ra, rb),
                  examples=[{"a": (2, 3), "b": (3,)}, {"a": (3,), "b": (2, 1, 3)}]),
            axiom(f"dim-{name}", dim(f(a, b), k), dim(a, k),
                  when=[le(rb, ra), ax(k, a),
                        or_(lt(k, ra - rb), eq(dim(b, rest), dim(a, k)), eq(dim(b, rest), 1))],
                  examples=[{"a": (2, 3), "b": (3,), "k": 1}, {"a": (2, 3), "b": (3,), "k": 0},
                            {"a": (2, 3), "b": (1, 1), "k": 0},
                            {"a": (2, 3), "b": (2, 3), "k": 1}])]
    for name, f in (("relu", relu), ("neg", neg), ("sqrt", sqrt)):
        pos = {"positive": (2, 3)} if name == "sqrt" else (2, 3)
        out += [axiom(f"rank-{name}", rank(f(t)), rank(t), examples=[{"t": pos}, {"t": ()}]),
                axiom(f"dim-{name}", dim(f(t), j), dim(t, j), when=[ax(j, t)],
                      examples=[{"t": pos, "j": 1}, {"t": (4,), "j": 0}])]
    for name, e, ok in (("transpose", transpose(p, t), ok_transpose(p, t)),
                        ("split-first", split0(k, n0, n1, t), ok_split(k, n0, n1, t)),
                        ("split-second", split1(k, n0, n1, t), ok_split(k, n0, n1, t))):
        exs = ([{"p": (1, 0), "t": (2, 3)}, {"p": (2, 0, 1), "t": (2, 3, 4)}] if name ==
               "transpose" else [{"k": 1, "n0": 1, "n1": 2, "t": (2, 3)},
                                 {"k": 0, "n0": 3, "n1": 1, "t": (4,)}])
        out.append(axiom(f"rank-{name}", rank(e), rank(t), when=ok, examples=exs))
    out.append(axiom("rank-concat", rank(concat(k, a, b)), ra, when=ok_concat(k, a, b),
                     examples=[{"k": 0, "a": (1, 3), "b": (2, 3)}, {"k": 0, "a": (1,),
                                                                    "b": (2,)}]))
    for name, f, size in (("first", split0, n0), ("second", split1, n1)):
        out.append(axiom(f"dim-split-{name}", dim(f(k, n0, n1, t), j),
                         ite(eq(j, k), size, dim(t, j)), when=[ax(j, t), *ok_split(k, n0, n1, t)],
                         examples=[{"k": 1, "n0": 1, "n1": 2, "t": (2, 3), "j": 1},
                                   {"k": 1, "n0": 1, "n1": 2, "t": (2, 3), "j": 0}]))
    return out


def build_axioms() -> tuple[Axiom, ...]:
    """Every axiom, in a fixed order (names are unique)."""
    axioms = (*_elementwise(), *_matmul(), *_transpose(), *_concat_split(), *_conv(),
              *_batchnorm(), *_lrn(), *_gemm(), *_shapes())
    names = [ax.name for ax in axioms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AxiomError(f"axiom names must be unique; repeated: {dupes}")
    return axioms

AXIOMS: tuple[Axiom, ...] = build_axioms()
"""Every axiom the prover uses, each validated by `validate_axioms()`."""


def get_axiom(name: str) -> Axiom:
    """The axiom called `name`; unknown names raise listing the known ones."""
    for ax in AXIOMS:
        if ax.name == name:
            return ax
    raise AxiomError(f"no axiom {name!r}; known: {', '.join(a.name for a in AXIOMS)}")


# ---- validation -------------------------------------------------------------------------------

def _bind(ax: Axiom, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for name, sort in ax.variables.items():
        if name not in example:
            raise AxiomError(f"axiom {ax.name!r}: example {dict(example)} does not bind "
                             f"{name!r} ({sort})")
        value = example[name]
        if sort == "T" and isinstance(value, Mapping):     # {"positive": shape}: a variance
            env[name] = rng.uniform(0.5, 2.0, tuple(value["positive"]))
        elif sort == "T":
            env[name] = rng.standard_normal(tuple(value))
        elif sort == "Perm":
            env[name] = tuple(value)
        elif sort == "Conv":
            env[name] = dict(value)
        else:
            env[name] = value
    return env


def validate_axiom(ax: Axiom, *, seed: int = 0, trials: int = 2) -> dict[str, Any]:
    """Check one axiom on random float64 tensors of each example's shapes.

    An example must satisfy the hypotheses and make both sides defined; then the conclusion
    must hold (tensors equal to 1e-9). An axiom without examples fails.

    Args:
        ax: the axiom.
        seed: seed of the random tensors.
        trials: random draws per example.
    Returns:
        {"axiom": name, "ok": bool, "cases": cases checked, "detail": why it failed or ""}.
    """
    if not ax.examples:
        return {"axiom": ax.name, "ok": False, "cases": 0,
                "detail": "no examples: every axiom must be checked on concrete shapes"}
    rng = np.random.default_rng(seed)
    cases = 0
    for example in ax.examples:
        for _ in range(trials):
            env = _bind(ax, example, rng)
            try:
                for h in ax.hyps:
                    if not evaluate(h, env):
                        return {"axiom": ax.name, "ok": False, "cases": cases,
                                "detail": f"example {dict(example)} violates hypothesis {h!r}"}
                holds = evaluate(ax.concl, env)
            except Undefined as err:
                return {"axiom": ax.name, "ok": False, "cases": cases,
                        "detail": f"example {dict(example)}: a side is undefined ({err})"}
            cases += 1
            if not holds:
                lhs, rhs = (evaluate(s, env) for s in ax.concl.args[:2]) \
                    if ax.concl.op == "==" else (None, None)
                if not isinstance(lhs, (np.ndarray, np.generic)):
                    shown = f"{lhs!r} vs {rhs!r}"
                elif np.shape(lhs) != np.shape(rhs):
                    shown = f"shapes {np.shape(lhs)} vs {np.shape(rhs)}"
                else:
                    shown = f"max abs error {float(np.max(np.abs(lhs - rhs))):.3g}"
                return {"axiom": ax.name, "ok": False, "cases": cases,
                        "detail": f"example {dict(example)}: the sides differ ({shown})"}
    return {"axiom": ax.name, "ok": True, "cases": cases, "detail": ""}


def validate_axioms(axioms: Sequence[Axiom] | None = None, *, seed: int = 0, trials: int = 2
                    ) -> list[dict[str, Any]]:
    """Validate every axiom (default: `AXIOMS`); one `validate_axiom` record each, in order."""
    return [validate_axiom(ax, seed=seed, trials=trials)
            for ax in (AXIOMS if axioms is None else axioms)]
