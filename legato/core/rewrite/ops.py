"""Operator semantics: shape inference, float64 evaluation and exact evaluation modulo a prime
for the ONNX operators that rules are generated, verified and matched over.

    >>> op = get_op("Gemm")
    >>> op.infer([(2, 3), (4, 3)], {"transB": 1})
    [(2, 4)]
    >>> a, b = random_inputs([(2, 3), (4, 3)], rng=0, p=DEFAULT_PRIME)
    >>> y, = op.eval_mod([a, b], {"transB": 1})          # residues in [0, p)

Semantics follow the ONNX spec (opset 17+) in float64; constant operands that ONNX passes as
inputs (Split's `split`, Reshape's `shape`, ReduceSum's `axes`) are attributes here, listed in
`OpDef.attr_inputs` for whoever reads ONNX nodes. Outputs may share memory with the inputs
(Transpose, Reshape, Split, Identity return views): do not write into them.

The modular world (fingerprints) is described in [Note: modular semantics] in `_opkernels.py`:
polynomial ops are exact mod p; Relu, Sigmoid, Tanh, Sqrt, MaxPool and LRN's power are
seeded pseudo-random functions (so fingerprints never equate non-algebraic expressions, and
miss identities such as Relu(Relu(x)) == Relu(x)); 1/0 is a fixed random residue; float
constants such as epsilon map to residues by `const_residue`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from legato.core.errors import ConfigError
from legato.core.rewrite import _opkernels as K
from legato.core.rewrite import _opshapes as S

__all__ = [
    "DEFAULT_PRIME", "OPS", "REQUIRED", "Attr", "OpDef", "ShapeError", "check_prime",
    "const_residue", "get_op", "random_inputs",
]

DEFAULT_PRIME = 2_147_483_647  # 2**31 - 1: products of two residues fit in int64
ATTR_KINDS = ("int", "float", "ints", "string")


class ShapeError(ConfigError):
    """Shapes, attributes or input counts an operator cannot take; names the op and values."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of an attribute the caller must give (Concat's axis, Reshape's shape)."""


@dataclasses.dataclass(frozen=True)
class Attr:
    """One attribute: its ONNX kind ("int", "float", "ints", "string") and its default.

    `default=None` means optional with no default (the op derives it, e.g. Transpose's perm);
    `default=REQUIRED` means the caller must pass it.
    """

    kind: str
    default: Any = None

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise ConfigError(f"Attr kind={self.kind!r} is unknown; pass one of {ATTR_KINDS}")


def _coerce(op: str, name: str, kind: str, value: Any) -> Any:
    ok = True
    if kind == "int":
        ok = isinstance(value, (int, np.integer))
        value = int(value) if ok else value
    elif kind == "float":
        ok = isinstance(value, (int, float, np.integer, np.floating))
        value = float(np.float32(value)) if ok else value  # ONNX float attributes are float32
    elif kind == "ints":
        ok = (isinstance(value, (list, tuple, np.ndarray))
              and all(isinstance(v, (int, np.integer)) for v in value))
        value = tuple(int(v) for v in value) if ok else value
    else:
        if isinstance(value, bytes):
            value = value.decode()
        ok = isinstance(value, str)
    if not ok:
        raise ShapeError(f"{op}: attribute {name}={value!r} is not of kind {kind!r}; pass "
                         f"{'a list of ints' if kind == 'ints' else 'a ' + kind}")
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class OpDef:
    """One ONNX operator: arity, attribute schema and its three semantics.

    Attributes:
        name: the ONNX op_type.
        min_inputs, max_inputs: input count bounds; max_inputs=None means any number.
        num_outputs: output count, or None when the attributes set it (Split).
        attrs: attribute name -> `Attr` (kind and default).
        attr_inputs: (ONNX input index, attribute name) for constant ONNX inputs that are
            attributes here (Reshape's shape is ONNX input 1).
        algebraic: True when `eval_mod` is the exact image of the real op in Z/p (division
            aside at 0), False when it is a pseudo-random stand-in (Relu, Sqrt, MaxPool...).
    """

    name: str
    min_inputs: int
    max_inputs: int | None
    num_outputs: int | None
    attrs: Mapping[str, Attr]
    shape_fn: Callable = dataclasses.field(repr=False)
    f64_fn: Callable = dataclasses.field(repr=False)
    mod_fn: Callable = dataclasses.field(repr=False)
    attr_inputs: tuple[tuple[int, str], ...] = ()
    algebraic: bool = True

    def normalize_attrs(self, attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every attribute of the schema, defaults filled in and values coerced.

        Float attributes are rounded to float32, as ONNX stores them, so that float64
        evaluation and `const_residue` see the value a model file holds.

        Args:
            attrs: the given attributes (None or missing entries take the defaults).
        Returns:
            A new dict with one entry per schema attribute (None where optional and absent).
        """
        attrs = attrs or {}
        unknown = sorted(set(attrs) - set(self.attrs))
        if unknown:
            raise ShapeError(f"{self.name}: unknown attribute(s) {unknown}; known: "
                             f"{sorted(self.attrs) or 'none'}")
        out = {}
        for name, spec in self.attrs.items():
            value = attrs.get(name)
            if value is None:
                value = spec.default
            if value is REQUIRED:
                raise ShapeError(f"{self.name}: attribute {name!r} is required; pass "
                                 f"{name}=<{spec.kind}>")
            out[name] = None if value is None else _coerce(self.name, name, spec.kind, value)
        return out

    def _shapes(self, shapes: Sequence[tuple[int, ...]], norm: dict[str, Any],
                given: Mapping[str, Any] | None) -> list[tuple[int, ...]]:
        n, hi = len(shapes), self.max_inputs
        if n < self.min_inputs or (hi is not None and n > hi):
            want = (f"{self.min_inputs}" if hi == self.min_inputs
                    else f"{self.min_inputs} or more" if hi is None
                    else f"{self.min_inputs} to {hi}")
            raise ShapeError(f"{self.name} takes {want} inputs; got {n} (shapes {list(shapes)})")
        try:
            return self.shape_fn(shapes, norm)
        except S.ShapeFault as e:
            raise ShapeError(self._where(shapes, given) + str(e)) from None

    def _where(self, shapes: Sequence[tuple[int, ...]], given: Mapping[str, Any] | None) -> str:
        extra = f" and attributes {dict(given)}" if given else ""
        return f"{self.name} with input shapes {list(shapes)}{extra}: "

    def infer(self, shapes: Sequence[Sequence[int]], attrs: Mapping[str, Any] | None = None
              ) -> list[tuple[int, ...]]:
        """Output shapes for the given input shapes.

        Args:
            shapes: one shape per input.
            attrs: the op's attributes (defaults filled in).
        Returns:
            One shape per output.
        Raises:
            ShapeError: the shapes, attributes or input count are invalid for this op.
        """
        shapes = [tuple(int(d) for d in s) for s in shapes]
        return self._shapes(shapes, self.normalize_attrs(attrs), attrs)

    def _run(self, fn: Callable, xs: list[np.ndarray], attrs: Mapping[str, Any] | None,
             check: bool, *extra: Any) -> list[np.ndarray]:
        norm = self.normalize_attrs(attrs)
        if check:
            self._shapes([x.shape for x in xs], norm, attrs)
        try:
            return fn(xs, norm, *extra)
        except S.ShapeFault as e:
            raise ShapeError(self._where([x.shape for x in xs], attrs) + str(e)) from None

    def eval_f64(self, inputs: Sequence[Any], attrs: Mapping[str, Any] | None = None,
                 *, check: bool = True) -> list[np.ndarray]:
        """Evaluate in float64 (ONNX semantics; NaN/inf as numpy gives them, no warnings).

        Args:
            inputs: one array (or nested list) per input, converted to float64.
            attrs: the op's attributes.
            check: run shape inference first (skip only for shapes already inferred).
        Returns:
            One float64 array per output.
        """
        xs = [np.asarray(x, dtype=np.float64) for x in inputs]
        return self._run(self.f64_fn, xs, attrs, check)

    def eval_mod(self, inputs: Sequence[Any], attrs: Mapping[str, Any] | None = None,
                 p: int = DEFAULT_PRIME, *, check: bool = True) -> list[np.ndarray]:
        """Evaluate exactly modulo the prime p (see [Note: modular semantics]).

        Args:
            inputs: one integer array per input (reduced mod p on entry).
            attrs: the op's attributes.
            p: a prime, 2 < p < 2**31.
            check: run shape inference first.
        Returns:
            One int64 array of residues in [0, p) per output.
        """
        check_prime(p)
        xs = []
        for i, x in enumerate(inputs):
            x = np.asarray(x)
            if x.dtype.kind not in "iu":
                raise ConfigError(f"{self.name}.eval_mod: input {i} has dtype {x.dtype}; pass "
                                  "integer residues, e.g. random_inputs(shapes, rng, p=p)")
            xs.append(x.astype(np.int64, copy=False) % p)
        return self._run(self.mod_fn, xs, attrs, check, p)


@functools.lru_cache(maxsize=64)
def check_prime(p: int) -> int:
    """Return p if it is a prime with 2 < p < 2**31 (what `eval_mod` needs), else raise."""
    if not isinstance(p, (int, np.integer)) or not 2 < p < 2**31 or not _is_prime(int(p)):
        raise ConfigError(f"p={p!r} is not a prime with 2 < p < 2**31; pass a prime such as "
                          f"DEFAULT_PRIME ({DEFAULT_PRIME}) so residue products fit in int64")
    return int(p)


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 2**32 (bases 2, 7, 61)."""
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 7, 61):
        if a % n == 0:
            continue
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def const_residue(value: float, p: int = DEFAULT_PRIME) -> int:
    """The residue standing for a float constant (its float32 value, an exact dyadic, mod p).

    Args:
        value: a finite float (an attribute such as epsilon, or a constant tensor element).
        p: the prime.
    Returns:
        An int in [0, p): 1.0 -> 1, -1.0 -> p - 1, 0.5 -> inverse of 2.
    """
    check_prime(p)
    try:
        return K.const_residue(float(value), int(p))
    except ValueError:
        raise ConfigError(f"constant {value!r} has no residue; pass a finite float") from None


def random_inputs(shapes: Sequence[Sequence[int]], rng: np.random.Generator | int,
                  p: int | None = None, *, positive: bool = False) -> list[np.ndarray]:
    """Random operands: uniform residues in [0, p) when p is given, else float64 normals.

    Args:
        shapes: one shape per operand.
        rng: a numpy Generator, or a seed for one.
        p: the prime for fingerprints; None for float64 checks.
        positive: avoid 0 and negatives (residues in [1, p), floats uniform in [0.5, 2)),
            for operands of Sqrt, Reciprocal, Div's divisor or BatchNormalization's variance.
    Returns:
        One int64 (mod p) or float64 array per shape.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if p is None:
        return [np.asarray(rng.uniform(0.5, 2.0, s) if positive else rng.standard_normal(s))
                for s in shapes]
    p = check_prime(p)
    return [np.asarray(rng.integers(1 if positive else 0, p, size=s, dtype=np.int64))
            for s in shapes]


# ---- the registry ----------------------------------------------------------------------------

def _structural(fn: Callable) -> Callable:
    return lambda xs, attrs, p: fn(xs, attrs)


def _def(name: str, arity: tuple[int, int | None], num_outputs: int | None, shape_fn: Callable,
         f64_fn: Callable, mod_fn: Callable, attrs: Mapping[str, Attr] | None = None,
         **kw: Any) -> OpDef:
    return OpDef(name, arity[0], arity[1], num_outputs, types.MappingProxyType(dict(attrs or {})),
                 shape_fn, f64_fn, mod_fn, **kw)


def _unary(name: str) -> OpDef:
    f64, mod = K.UNARY_F64[name], K.UNARY_MOD[name]
    return _def(name, (1, 1), 1, S.infer_same, lambda xs, a: [f64(xs[0])],
                lambda xs, a, p: [mod(xs[0], p)],
                algebraic=name in ("Neg", "Reciprocal"))


def _binary(name: str) -> OpDef:
    f64, mod = K.BINARY_F64[name], K.BINARY_MOD[name]
    return _def(name, (2, 2), 1, S.infer_binary, lambda xs, a: [f64(xs[0], xs[1])],
                lambda xs, a, p: [mod(xs[0], xs[1], p)])


_WINDOW = {"strides": Attr("ints"), "pads": Attr("ints"), "dilations": Attr("ints"),
           "auto_pad": Attr("string", "NOTSET")}
_POOL = {**_WINDOW, "kernel_shape": Attr("ints", REQUIRED), "ceil_mode": Attr("int", 0)}

_DEFS = [
    *(_binary(n) for n in ("Add", "Sub", "Mul", "Div")),
    *(_unary(n) for n in ("Relu", "Sigmoid", "Tanh", "Sqrt", "Neg", "Reciprocal")),
    _def("Identity", (1, 1), 1, S.infer_same, K.identity, _structural(K.identity)),
    _def("MatMul", (2, 2), 1, S.infer_matmul, K.f64_matmul, K.mod_matmul),
    _def("Gemm", (2, 3), 1, S.infer_gemm, K.f64_gemm, K.mod_gemm,
         {"alpha": Attr("float", 1.0), "beta": Attr("float", 1.0), "transA": Attr("int", 0),
          "transB": Attr("int", 0)}),
    _def("Conv", (2, 3), 1, S.infer_conv, K.f64_conv, K.mod_conv,
         {**_WINDOW, "group": Attr("int", 1), "kernel_shape": Attr("ints")}),
    _def("BatchNormalization", (5, 5), 1, S.infer_batchnorm, K.f64_batchnorm,
         K.mod_batchnorm, {"epsilon": Attr("float", 1e-5), "momentum": Attr("float", 0.9),
                           "training_mode": Attr("int", 0)}, algebraic=False),
    _def("MaxPool", (1, 1), 1, S.infer_pool, K.f64_maxpool, K.mod_maxpool,
         {**_POOL, "storage_order": Attr("int", 0)}, algebraic=False),
    _def("AveragePool", (1, 1), 1, S.infer_pool, K.f64_avgpool, K.mod_avgpool,
         {**_POOL, "count_include_pad": Attr("int", 0)}),
    _def("LRN", (1, 1), 1, S.infer_lrn, K.f64_lrn, K.mod_lrn,
         {"alpha": Attr("float", 1e-4), "beta": Attr("float", 0.75), "bias": Attr("float", 1.0),
          "size": Attr("int", REQUIRED)}, algebraic=False),
    _def("Concat", (1, None), 1, S.infer_concat, K.concat, _structural(K.concat),
         {"axis": Attr("int", REQUIRED)}),
    _def("Split", (1, 1), None, S.infer_split, K.split, _structural(K.split),
         {"axis": Attr("int", 0), "split": Attr("ints"), "num_outputs": Attr("int")},
         attr_inputs=((1, "split"),)),
    _def("Transpose", (1, 1), 1, S.infer_transpose, K.transpose, _structural(K.transpose),
         {"perm": Attr("ints")}),
    _def("Reshape", (1, 1), 1, S.infer_reshape, K.reshape, _structural(K.reshape),
         {"shape": Attr("ints", REQUIRED), "allowzero": Attr("int", 0)},
         attr_inputs=((1, "shape"),)),
    _def("ReduceSum", (1, 1), 1, S.infer_reducesum, K.f64_reducesum, K.mod_reducesum,
         {"axes": Attr("ints"), "keepdims": Attr("int", 1),
          "noop_with_empty_axes": Attr("int", 0)}, attr_inputs=((1, "axes"),)),
]

OPS: Mapping[str, OpDef] = types.MappingProxyType({d.name: d for d in _DEFS})
"""Every operator by ONNX op_type."""


def get_op(name: str) -> OpDef:
    """The operator named `name` (an ONNX op_type); unknown names raise listing the known ones."""
    try:
        return OPS[name]
    except KeyError:
        raise ConfigError(f"operator {name!r} has no semantics in legato; known: "
                          f"{', '.join(sorted(OPS))}") from None
