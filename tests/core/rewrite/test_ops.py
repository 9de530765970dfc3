"""Operator semantics: float64 against onnxruntime, exact algebra modulo p, shape errors."""

from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import numpy as np
import pytest

from legato.core.errors import ConfigError
from legato.core.rewrite.ops import (
    DEFAULT_PRIME, OPS, REQUIRED, Attr, OpDef, ShapeError, check_prime, const_residue, get_op,
    random_inputs,
)

P = DEFAULT_PRIME
OPSET = 18

# (op, input shapes, attributes, indices of inputs that must be positive)
CASES = [
    ("Add", [(2, 3, 4), (4,)], {}, ()),
    ("Add", [(2, 1, 4), (3, 1)], {}, ()),
    ("Sub", [(2, 3), (2, 3)], {}, ()),
    ("Sub", [(1,), (2, 2)], {}, ()),
    ("Mul", [(2, 3, 4), (3, 1)], {}, ()),
    ("Div", [(2, 3), (3,)], {}, (1,)),
    ("Relu", [(2, 3, 4)], {}, ()),
    ("Sigmoid", [(2, 3, 4)], {}, ()),
    ("Tanh", [(2, 3)], {}, ()),
    ("Sqrt", [(2, 3)], {}, (0,)),
    ("Neg", [(2, 3)], {}, ()),
    ("Reciprocal", [(3, 2)], {}, (0,)),
    ("Identity", [(3, 2)], {}, ()),
    ("MatMul", [(2, 3), (3, 4)], {}, ()),
    ("MatMul", [(2, 1, 3, 4), (5, 4, 2)], {}, ()),
    ("MatMul", [(3,), (3, 4)], {}, ()),
    ("MatMul", [(2, 3, 4), (4,)], {}, ()),
    ("MatMul", [(4,), (4,)], {}, ()),
    ("Gemm", [(2, 3), (3, 4)], {}, ()),
    ("Gemm", [(3, 2), (3, 4), (4,)], {"transA": 1}, ()),
    ("Gemm", [(2, 3), (4, 3), (2, 4)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, ()),
    ("Gemm", [(3, 2), (4, 3), (2, 1)], {"transA": 1, "transB": 1, "alpha": 3.0}, ()),
    ("Gemm", [(2, 3), (3, 4), (1,)], {"beta": -1.0}, ()),
    ("Conv", [(1, 3, 5, 5), (4, 3, 3, 3), (4,)], {"pads": [1, 1, 1, 1]}, ()),
    ("Conv", [(2, 4, 6, 6), (6, 2, 3, 3)], {"group": 2, "strides": [2, 2]}, ()),
    ("Conv", [(1, 4, 5, 5), (4, 1, 3, 3), (4,)], {"group": 4, "pads": [1, 1, 1, 1]}, ()),
    ("Conv", [(2, 3, 4, 4), (5, 3, 1, 1)], {}, ()),
    ("Conv", [(1, 4, 3, 3), (4, 2, 1, 1)], {"group": 2, "strides": [2, 2]}, ()),
    ("Conv", [(1, 4, 5, 5), (8, 1, 1, 1)], {"group": 4, "kernel_shape": [1, 1]}, ()),
    ("Conv", [(1, 2, 7, 7), (3, 2, 3, 3)], {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, ()),
    ("Conv", [(1, 2, 5, 6), (3, 2, 2, 3)], {"pads": [0, 1, 1, 0], "strides": [1, 2]}, ()),
    ("Conv", [(1, 2, 5, 5), (2, 2, 3, 3)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, ()),
    ("Conv", [(1, 2, 4, 4), (2, 2, 2, 2)], {"auto_pad": "SAME_LOWER"}, ()),
    ("Conv", [(1, 2, 7), (3, 2, 3), (3,)], {"pads": [1, 0]}, ()),
    ("BatchNormalization", [(2, 3, 4, 4), (3,), (3,), (3,), (3,)], {}, (4,)),
    ("BatchNormalization", [(4, 3), (3,), (3,), (3,), (3,)], {"epsilon": 1e-3}, (4,)),
    ("BatchNormalization", [(1, 2, 3, 3, 2), (2,), (2,), (2,), (2,)], {"epsilon": 0.25}, (4,)),
    ("MaxPool", [(1, 2, 5, 5)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                 "pads": [1, 1, 1, 1]}, ()),
    ("MaxPool", [(2, 1, 4, 4)], {"kernel_shape": [2, 2], "strides": [2, 2]}, ()),
    ("MaxPool", [(1, 1, 7, 7)], {"kernel_shape": [3, 3], "dilations": [2, 2]}, ()),
    ("MaxPool", [(1, 1, 6, 7)], {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0]}, ()),
    ("MaxPool", [(1, 2, 5, 5)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                 "auto_pad": "SAME_UPPER"}, ()),
    ("MaxPool", [(1, 2, 8)], {"kernel_shape": [3]}, ()),
    ("AveragePool", [(1, 2, 5, 5)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, ()),
    ("AveragePool", [(1, 2, 5, 5)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                     "count_include_pad": 1}, ()),
    ("AveragePool", [(2, 1, 4, 6)], {"kernel_shape": [2, 2], "strides": [2, 2]}, ()),
    ("AveragePool", [(1, 1, 5, 4)], {"kernel_shape": [2, 3], "pads": [1, 0, 0, 1]}, ()),
    ("AveragePool", [(1, 1, 4, 4)], {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}, ()),
    ("LRN", [(1, 5, 3, 3)], {"size": 3}, ()),
    ("LRN", [(2, 7, 4, 4)], {"size": 5, "alpha": 0.3, "beta": 0.6, "bias": 2.0}, ()),
    ("LRN", [(1, 3, 4, 4)], {"size": 5, "alpha": 1.0}, ()),            # fewer channels than size
    ("LRN", [(1, 6, 2, 2)], {"size": 1, "alpha": 0.5, "bias": 0.5}, ()),
    ("Concat", [(2, 3), (1, 3)], {"axis": 0}, ()),
    ("Concat", [(2, 3, 2), (2, 1, 2), (2, 2, 2)], {"axis": 1}, ()),
    ("Concat", [(2, 3), (2, 2)], {"axis": -1}, ()),
    ("Concat", [(2, 3)], {"axis": 0}, ()),
    ("Split", [(2, 6)], {"axis": 1, "split": [1, 2, 3]}, ()),
    ("Split", [(5, 3)], {"split": [2, 3]}, ()),
    ("Split", [(4, 6)], {"axis": -1, "num_outputs": 3}, ()),
    ("Split", [(7, 2)], {"num_outputs": 3}, ()),
    ("Transpose", [(2, 3, 4)], {}, ()),
    ("Transpose", [(2, 3, 4)], {"perm": [1, 0, 2]}, ()),
    ("Transpose", [(2, 3, 4, 5)], {"perm": [2, 0, 3, 1]}, ()),
    ("Reshape", [(2, 3, 4)], {"shape": [0, -1]}, ()),
    ("Reshape", [(2, 3, 4)], {"shape": [-1]}, ()),
    ("Reshape", [(2, 3, 4)], {"shape": [4, 0, 2]}, ()),
    ("Reshape", [(2, 3, 4)], {"shape": [2, -1, 2, 1]}, ()),
    ("Reshape", [(2, 3, 4)], {"shape": [6, 4], "allowzero": 1}, ()),
    ("ReduceSum", [(2, 3, 4)], {}, ()),
    ("ReduceSum", [(2, 3, 4)], {"keepdims": 0}, ()),
    ("ReduceSum", [(2, 3, 4)], {"axes": [1], "keepdims": 0}, ()),
    ("ReduceSum", [(2, 3, 4)], {"axes": [-1, 0]}, ()),
    ("ReduceSum", [(2, 3)], {"noop_with_empty_axes": 1}, ()),
]


def _case_id(case: tuple) -> str:
    name, shapes, attrs, _ = case
    text = ",".join(f"{k}={v}" for k, v in attrs.items())
    return f"{name}-{'x'.join(str(list(s)) for s in shapes)}-{text}".replace(" ", "")


def _float_inputs(shapes, positive, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.uniform(0.5, 2.0, s) if i in positive else rng.standard_normal(s))
            .astype(np.float32) for i, s in enumerate(shapes)]


def _run_ort(op: OpDef, xs: list[np.ndarray], attrs: dict) -> list[np.ndarray]:
    """Run `op` as a one-node float32 ONNX model on onnxruntime's CPU provider."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    lifted = {name: index for index, name in op.attr_inputs}
    names = [f"x{i}" for i in range(len(xs))]
    inits = []
    for name, index in lifted.items():
        if attrs.get(name) is not None:
            names += [""] * (index - len(names)) + [f"c_{name}"]
            inits.append(numpy_helper.from_array(np.asarray(attrs[name], np.int64), f"c_{name}"))
    out_shapes = op.infer([x.shape for x in xs], attrs)
    outs = [f"y{i}" for i in range(len(out_shapes))]
    node = helper.make_node(op.name, names, outs,
                            **{k: v for k, v in attrs.items() if k not in lifted})
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, x.shape)
                        for i, x in enumerate(xs)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s)
         for o, s in zip(outs, out_shapes)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=9)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {f"x{i}": x for i, x in enumerate(xs)})


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_eval_f64_matches_onnxruntime(case):
    name, shapes, attrs, positive = case
    op = get_op(name)
    xs = _float_inputs(shapes, positive)
    want = _run_ort(op, xs, attrs)
    got = op.eval_f64(xs, attrs)
    inferred = op.infer(shapes, attrs)
    assert len(got) == len(want) == len(inferred)
    for g, w, s in zip(got, want, inferred):
        assert g.dtype == np.float64 and g.shape == w.shape == s
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _residue(value: float, p: int) -> int:
    frac = Fraction(value)
    return frac.numerator % p * pow(frac.denominator, -1, p) % p


INTEGRAL = {"Add", "Sub", "Mul", "Neg", "Identity", "MatMul", "Gemm", "Conv", "Concat",
            "Split", "Transpose", "Reshape", "ReduceSum"}


@pytest.mark.parametrize("p", [P, 10007])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in INTEGRAL], ids=_case_id)
def test_eval_mod_is_float_arithmetic_on_small_integers(case, p):
    """Polynomial ops on small integers: mod-p result == exact float64 result mod p."""
    name, shapes, attrs, _ = case
    op = get_op(name)
    rng = np.random.default_rng(1)
    xs = [rng.integers(-4, 5, s) for s in shapes]  # negatives exercise the reduction
    want = op.eval_f64(xs, attrs)
    got = op.eval_mod(xs, attrs, p)
    for g, w in zip(got, want):
        assert g.dtype == np.int64 and g.shape == w.shape
        expected = np.array([_residue(v, p) for v in w.reshape(-1).tolist()], np.int64)
        np.testing.assert_array_equal(g.reshape(-1), expected)


def _op(name, *xs, p=P, **attrs):
    out = get_op(name).eval_mod(list(xs), attrs, p)
    return out if get_op(name).num_outputs != 1 else out[0]


def _f(name, *xs, **attrs):
    out = get_op(name).eval_f64(list(xs), attrs)
    return out if get_op(name).num_outputs != 1 else out[0]


def test_matmul_mod_has_no_overflow():
    a = np.full((1, 70_000), P - 1, np.int64)  # K above the 2**15 chunk, residues at the top
    assert _op("MatMul", a, a.T)[0, 0] == 70_000 % P
    x, y = random_inputs([(2, 3, 40), (40, 5)], 2, p=P)
    want = (x.astype(object) @ y.astype(object)) % P
    np.testing.assert_array_equal(_op("MatMul", x, y), want.astype(np.int64))


@pytest.mark.parametrize("p", [P, 65_537])
def test_matmul_associative_and_distributive_mod_p(p):
    a, b, c, d = random_inputs([(2, 3, 4), (4, 5), (5, 2), (4, 5)], 3, p=p)
    left = _op("MatMul", _op("MatMul", a, b, p=p), c, p=p)
    right = _op("MatMul", a, _op("MatMul", b, c, p=p), p=p)
    np.testing.assert_array_equal(left, right)
    np.testing.assert_array_equal(
        _op("MatMul", a, _op("Add", b, d, p=p), p=p),
        _op("Add", _op("MatMul", a, b, p=p), _op("MatMul", a, d, p=p), p=p))
    assert not np.array_equal(_op("MatMul", a, b, p=p), _op("MatMul", a, d, p=p))


CONV_ATTRS = [({"group": 1, "pads": [1, 1, 1, 1]}, 4, 4, 3),
              ({"group": 2, "strides": [2, 2], "pads": [1, 0, 1, 0]}, 4, 6, 3),
              ({"group": 4, "dilations": [2, 2], "pads": [2, 2, 2, 2]}, 4, 4, 3),
              ({"group": 2}, 4, 2, 1)]


@pytest.mark.parametrize("attrs,c,m,k", CONV_ATTRS)
def test_conv_is_bilinear_mod_p(attrs, c, m, k):
    g = attrs["group"]
    x, y, w, v, b = random_inputs([(2, c, 5, 5), (2, c, 5, 5), (m, c // g, k, k),
                                   (m, c // g, k, k), (m,)], 4, p=P)
    conv = lambda x, w: _op("Conv", x, w, **attrs)
    np.testing.assert_array_equal(conv(_op("Add", x, y), w), _op("Add", conv(x, w), conv(y, w)))
    np.testing.assert_array_equal(conv(x, _op("Add", w, v)), _op("Add", conv(x, w), conv(x, v)))
    with_bias = _op("Conv", x, w, b, **attrs)
    np.testing.assert_array_equal(with_bias, _op("Add", conv(x, w), b.reshape(m, 1, 1)))


def test_conv_1x1_is_a_matmul_mod_p():
    x, w = random_inputs([(2, 3, 4, 5), (6, 3, 1, 1)], 5, p=P)
    via_matmul = _op("Reshape", _op("MatMul", _op("Reshape", w, shape=[6, 3]),
                                    _op("Reshape", x, shape=[2, 3, 20])), shape=[2, 6, 4, 5])
    np.testing.assert_array_equal(_op("Conv", x, w), via_matmul)


def _bn_params(rng, c, p):
    scale, bias, mean = random_inputs([(c,)] * 3, rng, p=p)
    var, = random_inputs([(c,)], rng, p=p, positive=True)
    return scale, bias, mean, var


def test_batchnorm_equals_its_decomposition_mod_p_and_f64():
    for p in (None, P):
        x, = random_inputs([(2, 3, 4, 4)], 6, p=p)
        scale, bias, mean, var = _bn_params(np.random.default_rng(7), 3, p)
        run = (lambda n, *xs, **a: _op(n, *xs, **a)) if p else _f
        eps = np.array([const_residue(1e-3)] if p else [np.float32(1e-3)])
        r = lambda t: t.reshape(3, 1, 1)
        decomposed = run("Add", run("Mul", run("Div", run("Sub", x, r(mean)),
                                               run("Sqrt", run("Add", r(var), eps))), r(scale)),
                         r(bias))
        bn = run("BatchNormalization", x, scale, bias, mean, var, epsilon=1e-3)
        if p:
            np.testing.assert_array_equal(bn, decomposed)
        else:
            np.testing.assert_allclose(bn, decomposed, rtol=1e-12)


def test_conv_batchnorm_folding_fingerprints_match():
    """BN(Conv(x, W, b)) == Conv(x, W * f, (b - mean) * f + B) with f = scale / sqrt(var + eps)."""
    for p in (None, P):
        run = (lambda n, *xs, **a: _op(n, *xs, **a)) if p else _f
        x, w, b = random_inputs([(1, 4, 5, 5), (6, 2, 3, 3), (6,)], 8, p=p)
        scale, bias, mean, var = _bn_params(np.random.default_rng(9), 6, p)
        eps = np.array([const_residue(1e-5)] if p else [np.float32(1e-5)])
        conv = {"group": 2, "pads": [1, 1, 1, 1]}
        f = run("Div", scale, run("Sqrt", run("Add", var, eps)))
        folded = run("Conv", x, run("Mul", w, run("Reshape", f, shape=[6, 1, 1, 1])),
                     run("Add", run("Mul", run("Sub", b, mean), f), bias), **conv)
        original = run("BatchNormalization", run("Conv", x, w, b, **conv), scale, bias, mean, var)
        if p:
            np.testing.assert_array_equal(folded, original)
        else:
            np.testing.assert_allclose(folded, original, rtol=1e-9, atol=1e-12)


def test_transpose_inverse_and_concat_split_are_identities():
    x, = random_inputs([(2, 3, 4, 5)], 10, p=P)
    for perm in itertools.permutations(range(4)):
        inverse = list(np.argsort(perm))
        np.testing.assert_array_equal(
            _op("Transpose", _op("Transpose", x, perm=list(perm)), perm=inverse), x)
    a, b, c = random_inputs([(2, 1, 3), (2, 4, 3), (2, 2, 3)], 11, p=P)
    parts = _op("Split", _op("Concat", a, b, c, axis=1), axis=1, split=[1, 4, 2])
    for got, want in zip(parts, (a, b, c)):
        np.testing.assert_array_equal(got, want)


def test_gemm_is_matmul_plus_broadcast_add():
    a, b, c = random_inputs([(3, 2), (3, 4), (4,)], 12, p=P)
    gemm = _op("Gemm", a, b, c, transA=1, alpha=0.5, beta=2.0)
    half, two = np.array(const_residue(0.5)), np.array(const_residue(2.0))
    product = _op("MatMul", _op("Transpose", a, perm=[1, 0]), b)
    np.testing.assert_array_equal(
        gemm, _op("Add", _op("Mul", product, half), _op("Mul", c, two)))
    np.testing.assert_array_equal(_op("Mul", half, np.array(2)), np.array(1))
    np.testing.assert_array_equal(_op("Gemm", a.T, b, c), _op("Add", product, c))


def test_division_is_multiplication_by_the_inverse():
    a, b = random_inputs([(3, 4), (4,)], 13, p=P)
    b[0] = 0
    np.testing.assert_array_equal(_op("Div", a, b), _op("Mul", a, _op("Reciprocal", b)))
    nonzero = b[1:]
    np.testing.assert_array_equal(_op("Mul", _op("Div", a[:, 1:], nonzero), nonzero), a[:, 1:])
    np.testing.assert_array_equal(_op("Reciprocal", _op("Reciprocal", nonzero)), nonzero)
    np.testing.assert_array_equal(_op("Sub", a, b), _op("Add", a, _op("Neg", b)))
    big, = random_inputs([(100,)], 14, p=P, positive=True)  # the vectorized inverse path
    np.testing.assert_array_equal(_op("Mul", big, _op("Reciprocal", big)), np.ones(100))
    zero_inverse = _op("Reciprocal", np.zeros(1, np.int64))[0]
    assert 0 <= zero_inverse < P and _op("Reciprocal", np.zeros(100, np.int64))[7] == zero_inverse


def test_average_pool_is_a_scaled_depthwise_conv():
    x, = random_inputs([(1, 3, 5, 5)], 15, p=P)
    ones = np.ones((3, 1, 3, 3), np.int64)
    summed = _op("Conv", x, ones, group=3, pads=[1, 1, 1, 1])
    avg = _op("AveragePool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    np.testing.assert_array_equal(avg, _op("Div", summed, np.array(9)))
    excl = _op("AveragePool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    counts = _op("AveragePool", np.ones((1, 1, 5, 5), np.int64), kernel_shape=[3, 3],
                 pads=[1, 1, 1, 1], count_include_pad=1)  # fraction of cells inside
    np.testing.assert_array_equal(excl, _op("Div", avg, counts))
    full = _op("AveragePool", x, kernel_shape=[5, 5])
    np.testing.assert_array_equal(
        full, _op("Div", _op("ReduceSum", x, axes=[2, 3]), np.array(25)))


def test_reduce_sum_composes():
    x, = random_inputs([(2, 3, 4)], 16, p=P)
    np.testing.assert_array_equal(
        _op("ReduceSum", x, axes=[0, 2], keepdims=0),
        _op("ReduceSum", _op("ReduceSum", x, axes=[2], keepdims=0), axes=[0], keepdims=0))


def test_nonlinear_ops_break_algebraic_identities():
    a, b = random_inputs([(4, 5), (4, 5)], 17, p=P)
    relu = lambda t: _op("Relu", t)
    assert np.all(relu(a) != a)
    assert not np.array_equal(relu(relu(a)), relu(a))  # true over the reals; not found mod p
    sigmoid = lambda t: _op("Sigmoid", t)
    assert np.all(sigmoid(_op("Add", a, b)) != _op("Add", sigmoid(a), sigmoid(b)))
    assert np.all(sigmoid(a) != _op("Tanh", a))
    root = _op("Sqrt", a)
    assert np.all(_op("Mul", root, root) != a)
    np.testing.assert_array_equal(relu(a), relu(a.copy()))  # a function of the residue
    pool = {"kernel_shape": [2, 2]}
    x, = random_inputs([(1, 2, 3, 3)], 18, p=P)
    assert np.all(_op("MaxPool", x, **pool) != _op("AveragePool", x, **pool))


def test_maxpool_mod_is_symmetric_in_the_window():
    x, = random_inputs([(2, 3, 4, 4)], 19, p=P)
    full = {"kernel_shape": [4, 4]}
    flipped = _op("Transpose", x, perm=[0, 1, 3, 2])
    np.testing.assert_array_equal(_op("MaxPool", x, **full), _op("MaxPool", flipped, **full))
    # padding is excluded: a padded 1x1 pool equals the unpadded one at interior cells
    padded = _op("MaxPool", x, kernel_shape=[2, 2], pads=[1, 1, 0, 0])
    np.testing.assert_array_equal(padded[..., 1:, 1:], _op("MaxPool", x, kernel_shape=[2, 2]))
    assert np.all(padded[..., 0, 1:] != _op("MaxPool", x, kernel_shape=[2, 2])[..., 0, :])


def _lrn_as_written(x: np.ndarray, size: int, alpha=1e-4, beta=0.75, bias=1.0) -> np.ndarray:
    """ONNX's LRN definition transcribed literally, one channel at a time."""
    c_count, out = x.shape[1], np.empty_like(x)
    alpha, beta, bias = (float(np.float32(v)) for v in (alpha, beta, bias))  # as ONNX stores them
    for c in range(c_count):
        lo = max(0, c - int(np.floor((size - 1) / 2)))
        hi = min(c_count - 1, c + int(np.ceil((size - 1) / 2)))
        square_sum = np.sum(x[:, lo:hi + 1] ** 2, axis=1)
        out[:, c] = x[:, c] / (bias + alpha / size * square_sum) ** beta
    return out


@pytest.mark.parametrize("shape,size", [((1, 6, 3, 3), 4), ((2, 5, 7), 2), ((1, 4, 2, 3, 2), 3),
                                        ((1, 2, 3, 3), 6), ((3, 7, 2), 5)])
def test_lrn_follows_the_onnx_definition_where_onnxruntime_cannot_run_it(shape, size):
    """onnxruntime's LRN takes only rank 4 and odd sizes (and onnx's reference evaluator sums
    over the wrong axis, onnx/onnx#7805): even sizes and other ranks are checked against the
    definition itself."""
    x = np.random.default_rng(20).standard_normal(shape)
    got = _f("LRN", x, size=size, alpha=0.4, bias=1.5, beta=0.6)
    np.testing.assert_allclose(got, _lrn_as_written(x, size, 0.4, 0.6, 1.5), rtol=1e-12)


def test_lrn_mod_sees_the_window():
    """Mod p, LRN is x times a hash of its exact denominator: an odd window is symmetric, so
    LRN commutes with reversing the channels; an even one is not."""
    x, = random_inputs([(1, 6, 2, 2)], 21, p=P)
    flip = lambda t: t[:, ::-1]  # noqa: E731
    for size, symmetric in ((3, True), (5, True), (4, False), (2, False)):
        lrn = lambda t: _op("LRN", t, size=size)  # noqa: E731
        assert np.array_equal(flip(lrn(flip(x))), lrn(x)) == symmetric, size
    assert not np.array_equal(_op("LRN", x, size=3), _op("LRN", x, size=3, beta=0.5))
    assert not np.array_equal(_op("LRN", x, size=3), _op("LRN", x, size=3, alpha=2e-4))


def test_hashed_values_are_stable():
    """Stored fingerprints depend on these values: change them only with a format bump."""
    assert _op("Relu", np.arange(3)).tolist() == [1717397200, 1420049535, 814028799]
    assert _op("Sqrt", np.arange(2)).tolist() == [1873324052, 1084045253]
    assert _op("Reciprocal", np.array([0, 2])).tolist() == [1561912241, 1073741824]
    assert const_residue(1e-5) == 1795183586


def test_const_residue_is_a_ring_map():
    assert const_residue(1.0) == 1 and const_residue(-1.0) == P - 1 and const_residue(0.0) == 0
    assert const_residue(0.5) * 2 % P == 1
    assert const_residue(0.75) == (const_residue(0.5) + const_residue(0.25)) % P
    assert const_residue(1e-5) == const_residue(np.float32(1e-5))  # float32, like ONNX attrs
    with pytest.raises(ConfigError, match="finite"):
        const_residue(float("inf"))


SHAPE_ERRORS = [
    ("MatMul", [(2, 3), (4, 5)], {}, r"MatMul with input shapes \[\(2, 3\), \(4, 5\)\].*3.*4"),
    ("MatMul", [(2, 2, 3), (3, 3, 4)], {}, "batch dimensions"),
    ("Transpose", [(2, 3, 4)], {"perm": [0, 0, 1]}, r"Transpose.*perm=\[0, 0, 1\]"),
    ("Concat", [(2, 3), (2, 3, 1)], {"axis": 0}, r"Concat.*rank 3.*rank 2"),
    ("Concat", [(2, 3), (2, 4)], {"axis": 0}, "outside axis 0"),
    ("Concat", [(2, 3)], {"axis": 2}, r"axis=2 is out of range"),
    ("Conv", [(1, 3, 5, 5), (4, 1, 3, 3)], {"group": 2}, r"Conv.*C=3.*group=2"),
    ("Conv", [(1, 4, 5, 5), (4, 1, 3, 3)], {"group": 2}, r"W.shape\[1\] must be 2"),
    ("Conv", [(1, 2, 2, 2), (4, 2, 3, 3)], {}, "larger than the padded input"),
    ("Conv", [(1, 2, 5, 5), (4, 2, 3, 3)], {"pads": [1, 1]}, "pads=.*begins then ends"),
    ("Conv", [(1, 2, 5, 5), (4, 2, 3, 3), (3,)], {}, r"bias B must have shape \(4,\)"),
    ("Add", [(2, 3), (4,)], {}, "do not broadcast"),
    ("Add", [(2, 3)], {}, "takes 2 inputs; got 1"),
    ("Gemm", [(2, 3), (3, 4), (3, 4)], {}, "does not broadcast to"),
    ("Gemm", [(2, 3), (4, 3)], {}, "check the transposes"),
    ("Reshape", [(2, 3)], {"shape": [-1, -1]}, "more than one -1"),
    ("Reshape", [(2, 3)], {"shape": [4, 2]}, "8 elements but the input has 6"),
    ("Split", [(2, 6)], {"axis": 1, "split": [1, 2]}, "summing to"),
    ("Split", [(2, 6)], {}, "pass split"),
    ("BatchNormalization", [(2, 3, 4), (3,), (3,), (2,), (3,)], {}, "input_mean"),
    ("BatchNormalization", [(2, 3), (3,), (3,), (3,), (3,)], {"training_mode": 1}, "inference"),
    ("MaxPool", [(1, 1, 4, 4)], {"kernel_shape": [2, 2], "ceil_mode": 1}, "ceil_mode"),
    ("ReduceSum", [(2, 3)], {"axes": [1, -1]}, "twice"),
    ("Concat", [(2, 3)], {}, "'axis' is required"),
    ("LRN", [(1, 2, 3, 3)], {}, "'size' is required"),
    ("LRN", [(4,)], {"size": 3}, "rank >= 2"),
    ("LRN", [(1, 2, 3, 3)], {"size": 0}, "size=0 must be >= 1"),
    ("Relu", [(2,)], {"alpha": 1.0}, r"unknown attribute\(s\) \['alpha'\]"),
    ("Transpose", [(2, 3)], {"perm": 1}, "list of ints"),
]


@pytest.mark.parametrize("name,shapes,attrs,pattern", SHAPE_ERRORS)
def test_shape_errors_name_the_op_and_values(name, shapes, attrs, pattern):
    with pytest.raises(ShapeError, match=pattern) as info:
        get_op(name).infer(shapes, attrs)
    assert name in str(info.value) and isinstance(info.value, (ConfigError, ValueError))


def test_eval_checks_shapes_inputs_and_prime():
    with pytest.raises(ShapeError, match="MatMul"):
        get_op("MatMul").eval_f64([np.ones((2, 3)), np.ones((4, 5))])
    with pytest.raises(ShapeError, match="MatMul"):
        get_op("MatMul").eval_mod([np.ones((2, 3), np.int64), np.ones((4, 5), np.int64)])
    with pytest.raises(ShapeError, match="Split.*pass split"):  # kernels raise it too
        get_op("Split").eval_mod([np.ones((2, 4), np.int64)], {}, check=False)
    with pytest.raises(ConfigError, match="integer residues"):
        get_op("Add").eval_mod([np.ones(2), np.ones(2)])
    for bad in (2**31, 15, 2, 2**31 - 3):
        with pytest.raises(ConfigError, match="not a prime"):
            get_op("Add").eval_mod([np.ones(2, np.int64)] * 2, p=bad)
    assert check_prime(65_537) == 65_537 and check_prime(P) == P


def test_registry_and_schema():
    required = {"MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Conv",
                "BatchNormalization", "Concat", "Split", "Transpose", "Reshape", "Identity",
                "ReduceSum", "MaxPool", "AveragePool", "Sqrt", "Neg", "Reciprocal"}
    assert required <= set(OPS) and all(OPS[n].name == n for n in OPS)
    with pytest.raises(ConfigError, match="'Foo'.*known: Add, AveragePool"):
        get_op("Foo")
    split, conv, concat = get_op("Split"), get_op("Conv"), get_op("Concat")
    assert split.num_outputs is None and split.attr_inputs == ((1, "split"),)
    assert (conv.min_inputs, conv.max_inputs) == (2, 3) and concat.max_inputs is None
    assert conv.attrs["group"] == Attr("int", 1) and concat.attrs["axis"].default is REQUIRED
    assert conv.normalize_attrs({"strides": np.array([2, 2])})["strides"] == (2, 2)
    assert get_op("BatchNormalization").normalize_attrs()["epsilon"] == float(np.float32(1e-5))
    assert not get_op("Relu").algebraic and get_op("MatMul").algebraic
    assert not get_op("MaxPool").algebraic and get_op("AveragePool").algebraic
    assert not get_op("LRN").algebraic and get_op("LRN").attrs["size"].default is REQUIRED
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.name = "X"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="kind"):
        Attr("tensor")


def test_random_inputs():
    ints = random_inputs([(2, 3), ()], np.random.default_rng(0), p=P)
    assert [x.shape for x in ints] == [(2, 3), ()] and all(x.dtype == np.int64 for x in ints)
    assert all(((0 <= x) & (x < P)).all() for x in ints)
    again = random_inputs([(2, 3), ()], 0, p=P)
    assert all(np.array_equal(x, y) for x, y in zip(ints, again))
    floats = random_inputs([(50,)], 1)
    assert floats[0].dtype == np.float64 and (floats[0] < 0).any()
    pos = random_inputs([(50,)], 1, positive=True)[0]
    assert (pos >= 0.5).all() and (random_inputs([(50,)], 1, p=7, positive=True)[0] >= 1).all()
