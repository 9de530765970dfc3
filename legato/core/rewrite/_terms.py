"""The tensor-term language of the axioms and the prover: terms with a Z3 and a float64 meaning.

Sorts: tensors `T`, `Int` (axes, sizes, group), `Real` (Gemm's alpha/beta), `Perm`
(permutations), `Conv` (a Conv attribute set other than group), `Shape` (a whole shape) and
`Bool`. Tensor operators, `rank`, `dim`, `shp` and the permutation functions are uninterpreted
functions in Z3 (`Signature.to_z3`) and run through `legato.core.rewrite.ops` in float64
(`evaluate`); arithmetic and logic are interpreted in both. See `axioms.py` for how they are used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from legato.core.errors import BackendUnavailable, ConfigError
from legato.core.rewrite._opkernels import lrn_band
from legato.core.rewrite.ops import get_op

__all__ = ["E", "OPS", "SORTS", "Signature", "TermError", "Undefined", "const", "evaluate", "mk",
           "opaque", "same_value", "var", "variables", "z3_module"]

SORTS = ("T", "Int", "Bool", "Real", "Perm", "Conv", "Shape")


class TermError(ConfigError):
    """A malformed term (unknown operator, wrong sort, unbound variable)."""


class Undefined(Exception):
    """A term has no value on the given inputs (an operator rejected the shapes)."""


def z3_module():
    """The z3 module, or BackendUnavailable naming the package to install."""
    try:
        import z3
    except ImportError:
        raise BackendUnavailable("formal verification needs Z3 (z3-solver), which is not installed "
                                 "here: pip install 'legato[rewrite]'") from None
    return z3


# ---- the term language ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class E:
    """A term: `op` applied to `args` (sub-terms), of sort `sort`. Leaves are "var" and "const"
    (their one arg is the name or the value); "opaque" applies an operator without axioms."""

    op: str
    args: tuple
    sort: str

    def __add__(self, other: Any) -> "E":
        return mk("+", self, other)

    def __sub__(self, other: Any) -> "E":
        return mk("-", self, other)

    def __repr__(self) -> str:
        if self.op in ("var", "const"):
            return str(self.args[0])
        if self.op in ("+", "-", "==", "<=", "<"):
            return f"({self.args[0]!r} {self.op} {self.args[1]!r})"
        return f"{self.op}({', '.join(map(repr, self.args))})"


def var(name: str, sort: str = "T") -> E:
    """A variable of the given sort (bound by an axiom, or a free constant in a proof)."""
    if sort not in SORTS:
        raise TermError(f"variable {name!r} has sort {sort!r}; known sorts: {SORTS}")
    return E("var", (name,), sort)


def const(value: Any, sort: str) -> E:
    """A constant: an int, a float (Real), a permutation tuple (Perm) or a hashable key (Conv)."""
    return E("const", (value,), sort)


def _dim(t: np.ndarray, i: int) -> int:
    if not 0 <= i < t.ndim:
        raise Undefined(f"dim({t.shape}, {i}) is out of range")
    return int(t.shape[i])


def _run(op: str, xs: Sequence[np.ndarray], out: int = 0, **attrs: Any) -> np.ndarray:
    try:
        return get_op(op).eval_f64(list(xs), attrs)[out]
    except ConfigError as err:
        raise Undefined(str(err)) from None


def _chan(v: np.ndarray, n: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast over axis 1 of a tensor with n more axes."""
    if np.ndim(v) != 1 or n < 0:
        raise Undefined(f"chan takes a vector and n >= 0, not shape {np.shape(v)} and {n}")
    return np.reshape(v, (-1,) + (1,) * n)


def _band(channels: int, size: int, alpha: float, spatial_rank: int) -> np.ndarray:
    """LRN's window as a 1x1 Conv weight (`_opkernels.lrn_band`)."""
    try:
        return lrn_band(channels, size, alpha, spatial_rank)
    except ValueError as err:
        raise Undefined(str(err)) from None


def _trans(p: tuple) -> int:
    if tuple(p) not in ((0, 1), (1, 0)):
        raise Undefined(f"Gemm takes the 2-d permutations (0, 1) or (1, 0), not {p}")
    return int(tuple(p) == (1, 0))


def _isswap(p: tuple) -> bool:
    n = len(p)
    return n >= 2 and tuple(p) == tuple(range(n - 2)) + (n - 1, n - 2)


def _pinv(p: tuple, k: int) -> int:
    if k not in p:
        raise Undefined(f"{k} is not in the permutation {p}")
    return tuple(p).index(k)


@dataclasses.dataclass(frozen=True)
class _Spec:
    args: tuple[str, ...] | None   # None: checked by hand (polymorphic / variadic)
    result: str
    f64: Callable[..., Any]


_T2 = ("T", "T")
OPS: dict[str, _Spec] = {
    # tensor operators (uninterpreted in Z3)
    "add": _Spec(_T2, "T", lambda a, b: _run("Add", [a, b])),
    "mul": _Spec(_T2, "T", lambda a, b: _run("Mul", [a, b])),
    "sub": _Spec(_T2, "T", lambda a, b: _run("Sub", [a, b])),
    "neg": _Spec(("T",), "T", lambda a: _run("Neg", [a])),
    "relu": _Spec(("T",), "T", lambda a: _run("Relu", [a])),
    "matmul": _Spec(_T2, "T", lambda a, b: _run("MatMul", [a, b])),
    "transpose": _Spec(("Perm", "T"), "T", lambda p, t: _run("Transpose", [t], perm=list(p))),
    "concat": _Spec(("Int", "T", "T"), "T", lambda k, a, b: _run("Concat", [a, b], axis=k)),
    "split0": _Spec(("Int", "Int", "Int", "T"), "T",
                    lambda k, n0, n1, t: _run("Split", [t], 0, axis=k, split=[n0, n1])),
    "split1": _Spec(("Int", "Int", "Int", "T"), "T",
                    lambda k, n0, n1, t: _run("Split", [t], 1, axis=k, split=[n0, n1])),
    "conv": _Spec(("Conv", "Int", "T", "T"), "T",
                  lambda ca, g, x, w: _run("Conv", [x, w], group=g, **dict(ca))),
    "convb": _Spec(("Conv", "Int", "T", "T", "T"), "T",
                   lambda ca, g, x, w, b: _run("Conv", [x, w, b], group=g, **dict(ca))),
    "gemm": _Spec(("Real", "Real", "Perm", "Perm", "T", "T", "T"), "T",
                  lambda al, be, pa, pb, a, b, c: _run("Gemm", [a, b, c], alpha=al, beta=be,
                                                       transA=_trans(pa), transB=_trans(pb))),
    "gemmnc": _Spec(("Real", "Perm", "Perm", "T", "T"), "T",
                    lambda al, pa, pb, a, b: _run("Gemm", [a, b], alpha=al, transA=_trans(pa),
                                                  transB=_trans(pb))),
    "sc": _Spec(("Real",), "T", lambda v: np.array(float(v))),
    "tdiv": _Spec(_T2, "T", lambda a, b: _run("Div", [a, b])),
    "sqrt": _Spec(("T",), "T", lambda a: _run("Sqrt", [a])),
    "bn": _Spec(("Real", "T", "T", "T", "T", "T"), "T",
                lambda e, y, s, b, m, v: _run("BatchNormalization", [y, s, b, m, v], epsilon=e)),
    "chan": _Spec(("T", "Int"), "T", lambda v, n: _chan(v, n)),
    "lrn": _Spec(("Real", "Real", "Real", "Int", "T"), "T",
                 lambda al, be, bi, n, x: _run("LRN", [x], alpha=al, beta=be, bias=bi, size=n)),
    "band": _Spec(("Int", "Int", "Real", "Int"), "T", lambda c, n, al, r: _band(c, n, al, r)),
    # shapes and permutations (uninterpreted in Z3)
    "rank": _Spec(("T",), "Int", lambda t: int(np.ndim(t))),
    "dim": _Spec(("T", "Int"), "Int", _dim),
    "shp": _Spec(("T",), "Shape", lambda t: tuple(np.shape(t))),
    "pat": _Spec(("Perm", "Int"), "Int", lambda p, i: int(p[i]) if 0 <= i < len(p) else
                 _raise(Undefined(f"pat({p}, {i}) is out of range"))),
    "pinv": _Spec(("Perm", "Int"), "Int", _pinv),
    "plen": _Spec(("Perm",), "Int", len),
    "pcomp": _Spec(("Perm", "Perm"), "Perm", lambda p, q: tuple(p[i] for i in q)),
    "isid": _Spec(("Perm",), "Bool", lambda p: tuple(p) == tuple(range(len(p)))),
    "isswap": _Spec(("Perm",), "Bool", _isswap),
    "prev": _Spec(("Int",), "Perm", lambda n: tuple(range(n - 1, -1, -1))),
    # interpreted: arithmetic and logic
    "+": _Spec(("Int", "Int"), "Int", lambda a, b: a + b),
    "-": _Spec(("Int", "Int"), "Int", lambda a, b: a - b),
    "*": _Spec(("Int", "Int"), "Int", lambda a, b: a * b),
    "div": _Spec(("Int", "Int"), "Int", lambda a, b: a // b),
    "max": _Spec(("Int", "Int"), "Int", max),
    "<=": _Spec(("Int", "Int"), "Bool", lambda a, b: a <= b),
    "<": _Spec(("Int", "Int"), "Bool", lambda a, b: a < b),
    "==": _Spec(None, "Bool", lambda a, b: same_value(a, b)),
    "and": _Spec(None, "Bool", all),
    "or": _Spec(None, "Bool", any),
    "not": _Spec(("Bool",), "Bool", lambda a: not a),
    "ite": _Spec(None, "?", None),
}
_INTERPRETED = {"+", "-", "*", "div", "max", "<=", "<", "==", "and", "or", "not", "ite"}


def _raise(err: Exception) -> Any:
    raise err


def same_value(a: Any, b: Any) -> bool:
    """Equal values: tensors of one shape within 1e-9 (relative and absolute), else `==`."""
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        return (np.shape(a) == np.shape(b)
                and bool(np.allclose(a, b, rtol=1e-9, atol=1e-9)))
    return a == b


def mk(op: str, *args: Any) -> E:
    """Apply `op` to `args` (ints become Int constants, floats Real), checking sorts."""
    spec = OPS.get(op)
    if spec is None:
        raise TermError(f"unknown term operator {op!r}; known: {sorted(OPS)}")
    terms = tuple(a if isinstance(a, E) else
                  const(int(a), "Int") if isinstance(a, (int, np.integer)) and not
                  isinstance(a, bool) else const(float(a), "Real") if isinstance(a, float)
                  else _raise(TermError(f"{op}: argument {a!r} is not a term")) for a in args)
    sorts = tuple(t.sort for t in terms)
    result = spec.result
    if spec.args is not None and sorts != spec.args:
        raise TermError(f"{op} takes sorts {spec.args}; got {sorts} in {op}{terms}")
    if op == "==" and (len(sorts) != 2 or sorts[0] != sorts[1]):
        raise TermError(f"== compares two terms of one sort; got {sorts}")
    if op in ("and", "or") and any(s != "Bool" for s in sorts):
        raise TermError(f"{op} takes Bool terms; got {sorts}")
    if op == "ite":
        if len(sorts) != 3 or sorts[0] != "Bool" or sorts[1] != sorts[2]:
            raise TermError(f"ite takes (Bool, X, X); got {sorts}")
        result = sorts[1]
    return E(op, terms, result)


def opaque(label: str, args: Sequence[E]) -> E:
    """An operator the axioms do not cover: an uninterpreted function named by `label`."""
    return E("opaque", (label, *args), "T")


def variables(*terms: E) -> dict[str, str]:
    """Every variable in the terms, name -> sort (raises if a name has two sorts)."""
    found: dict[str, str] = {}

    def walk(e: E) -> None:
        if e.op == "var":
            name = e.args[0]
            if found.setdefault(name, e.sort) != e.sort:
                raise TermError(f"variable {name!r} is used with sorts {found[name]} and "
                                 f"{e.sort}")
        elif e.op != "const":
            for a in e.args:
                if isinstance(a, E):
                    walk(a)
    for t in terms:
        walk(t)
    return found


def evaluate(e: E, env: Mapping[str, Any]) -> Any:
    """The float64 value of a term; variables take their values from `env`.

    Args:
        e: the term.
        env: variable name -> numpy array (T), int, float, permutation tuple or Conv dict.
    Returns:
        A numpy array, int, float, bool, tuple or dict.
    Raises:
        Undefined: an operator rejects its inputs (shapes, axes, sizes).
    """
    if e.op == "var":
        try:
            return env[e.args[0]]
        except KeyError:
            raise TermError(f"variable {e.args[0]!r} has no value; bind it in the example") \
                from None
    if e.op == "const":
        return e.args[0]
    if e.op == "opaque":
        raise TermError(f"{e.args[0]} has no float64 meaning here (no axioms cover it)")
    if e.op == "ite":
        return evaluate(e.args[1] if evaluate(e.args[0], env) else e.args[2], env)
    if e.op in ("and", "or"):
        return OPS[e.op].f64(evaluate(a, env) for a in e.args)
    return OPS[e.op].f64(*(evaluate(a, env) for a in e.args))


class Signature:
    """Z3 sorts and function declarations for terms; `to_z3` translates a term.

    Perm and Conv constants are registered in `consts` so a prover can state their facts.
    """

    def __init__(self) -> None:
        z3 = self.z3 = z3_module()
        self.sorts = {"T": z3.DeclareSort("Tensor"), "Int": z3.IntSort(),
                      "Bool": z3.BoolSort(), "Real": z3.RealSort(),
                      "Perm": z3.DeclareSort("Perm"), "Conv": z3.DeclareSort("ConvAttrs"),
                      "Shape": z3.DeclareSort("Shape")}
        self._funcs: dict[tuple, Any] = {}
        self.consts: dict[tuple[str, Any], Any] = {}

    def func(self, name: str, args: Sequence[str], result: str) -> Any:
        """The uninterpreted function `name` over the given sorts."""
        key = (name, tuple(args), result)
        if key not in self._funcs:
            self._funcs[key] = self.z3.Function(name, *(self.sorts[s] for s in args),
                                                self.sorts[result])
        return self._funcs[key]

    def const(self, value: Any, sort: str) -> Any:
        """The Z3 value of a constant (registered for Perm and Conv)."""
        z3 = self.z3
        if sort == "Int":
            return z3.IntVal(int(value))
        if sort == "Real":
            return z3.RealVal(repr(float(value)))
        if sort == "Bool":
            return z3.BoolVal(bool(value))
        key = (sort, value)
        if key not in self.consts:
            self.consts[key] = z3.Const(f"{sort.lower()}{value}", self.sorts[sort])
        return self.consts[key]

    def to_z3(self, e: E, env: Mapping[str, Any] | None = None) -> Any:
        """Translate a term; variables not in `env` become free constants of their sort."""
        z3, env = self.z3, env or {}
        if e.op == "var":
            name = e.args[0]
            return env[name] if name in env else z3.Const(name, self.sorts[e.sort])
        if e.op == "const":
            return self.const(e.args[0], e.sort)
        if e.op == "opaque":
            label, *args = e.args
            return self.func(f"opaque:{label}", ["T"] * len(args), "T")(
                *(self.to_z3(a, env) for a in args))
        xs = [self.to_z3(a, env) for a in e.args]
        if e.op in _INTERPRETED:
            return {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                    "*": lambda a, b: a * b, "div": lambda a, b: a / b,
                    "max": lambda a, b: z3.If(a >= b, a, b), "<=": lambda a, b: a <= b,
                    "<": lambda a, b: a < b, "==": lambda a, b: a == b,
                    "and": lambda *a: z3.And(*a), "or": lambda *a: z3.Or(*a),
                    "not": z3.Not, "ite": z3.If}[e.op](*xs)
        spec = OPS[e.op]
        return self.func(e.op, spec.args, spec.result)(*xs)
