"""Numeric kernels of `ops.py`: float64 reference semantics and exact arithmetic modulo p.

Each op has `f64_<op>(xs, attrs)` and `mod_<op>(xs, attrs, p)` (structural ops share one
kernel), taking a list of arrays and the normalized attributes and returning a list of arrays.
Modular kernels get int64 residues in [0, p) with p < 2**31 and return the same.

[Note: modular semantics] Polynomial ops (MatMul, Gemm, Add, Sub, Mul, Neg, Conv, ReduceSum,
AveragePool, BatchNormalization's affine part) are their exact images in the field Z/p, so any
identity of real polynomials holds mod p, and an identity that fails over the reals fails mod p
except with probability about degree/p on random inputs. Division is multiplication by the
inverse; the inverse of 0 is a fixed pseudo-random residue (`zero_inverse`), the same for Div
and Reciprocal so that Div(a, b) == Mul(a, Reciprocal(b)) always. Non-polynomial elementwise
ops (Relu, Sigmoid, Tanh, Sqrt) are fixed pseudo-random functions of the residue (a seeded
splitmix64 hash, one seed per op name, reduced mod p): a composition matches another only when
the two are the same function of the same residues, so fingerprints never make a non-algebraic
identity look true, at the price of missing true ones such as Relu(Relu(x)) == Relu(x).
MaxPool is a pseudo-random symmetric function of its window (a hash of the sorted window,
padding excluded), so it still commutes with permutations of the window. LRN is x times a
pseudo-random function (one per beta) of its exact denominator bias + alpha / size * (window
sum of squares). Float constants
(Gemm alpha/beta, BatchNormalization epsilon) map to residues by `const_residue`: the value is
rounded to float32 (ONNX stores float attributes as float32) and its exact dyadic rational
m / 2**e becomes m * inverse(2**e) mod p, a ring map, so 1.0 -> 1, 0.5 -> inverse(2) and
an epsilon attribute equals an epsilon constant tensor of the same float32 value.
"""

from __future__ import annotations

import functools
import math
import zlib
from fractions import Fraction
from typing import Any, Callable, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from legato.core.rewrite import _opshapes as shp

Arrays = list[np.ndarray]
Attrs = Mapping[str, Any]

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_CHUNK = 1 << 15  # K per modular matmul pass: 2**15 * 2**16 * 2**31 < 2**63


# ---- modular helpers -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _seed(name: str) -> np.uint64:
    return np.uint64((zlib.crc32(name.encode()) * _GOLDEN) & (2**64 - 1))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array of rank >= 1 (wraps mod 2**64, no warnings)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def hash_residues(x: np.ndarray, name: str, p: int) -> np.ndarray:
    """A fixed pseudo-random function of each residue, seeded by `name`, reduced mod p."""
    z = _mix(x.reshape(-1).astype(np.uint64) + _seed(name))
    return (z % np.uint64(p)).astype(np.int64).reshape(x.shape)


@functools.lru_cache(maxsize=64)
def zero_inverse(p: int) -> int:
    """The residue that stands for 1/0 (Div by 0, Reciprocal(0))."""
    return int(hash_residues(np.zeros(1, np.int64), "inverse-of-zero", p)[0])


def inv_mod(x: np.ndarray, p: int) -> np.ndarray:
    """Elementwise inverse mod p (Fermat), with `zero_inverse(p)` for 0."""
    flat = x.reshape(-1)
    if flat.size <= 64:  # Python's extended Euclid beats 60 vector passes on tiny arrays
        z = zero_inverse(p)
        return np.array([pow(v, -1, p) if v else z for v in flat.tolist()],
                        np.int64).reshape(x.shape)
    result, base, e = np.ones_like(flat), flat.copy(), p - 2
    while e:
        if e & 1:
            result = result * base % p
        e >>= 1
        if e:
            base = base * base % p
    result[flat == 0] = zero_inverse(p)
    return result.reshape(x.shape)


@functools.lru_cache(maxsize=1024)
def const_residue(value: float, p: int) -> int:
    """The residue of a float constant: its float32 value as an exact dyadic rational mod p."""
    v = float(np.float32(value))
    if not math.isfinite(v):
        raise ValueError(f"{value} is not finite")
    frac = Fraction(v)
    return frac.numerator % p * pow(frac.denominator, -1, p) % p


def matmul_mod(a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    """numpy.matmul of residues mod p without int64 overflow (16-bit limbs of `a`)."""
    if b.ndim == 1:
        return matmul_mod(a, b[:, None], p)[..., 0]
    if a.ndim == 1:
        return matmul_mod(a[None], b, p)[..., 0, :]
    k = a.shape[-1]
    if k > _CHUNK:
        acc = matmul_mod(a[..., :_CHUNK], b[..., :_CHUNK, :], p)
        for s in range(_CHUNK, k, _CHUNK):
            acc = (acc + matmul_mod(a[..., s:s + _CHUNK], b[..., s:s + _CHUNK, :], p)) % p
        return acc
    return ((a >> 16) @ b % p * 65536 + (a & 0xFFFF) @ b % p) % p


def _channel(t: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) vector shaped to broadcast along axis 1 of a rank-`ndim` tensor."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


# ---- sliding windows (Conv, pooling) ---------------------------------------------------------

def windows(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...],
            pads: tuple[int, ...], dilations: tuple[int, ...], fill: Any) -> np.ndarray:
    """(N, C, *spatial) -> (N, C, *out, *kernel): every window, padding filled with `fill`."""
    nsp = len(kernel)
    if any(pads):  # np.full + a slice assignment is several times faster than np.pad here
        lead = x.shape[:x.ndim - nsp]
        padded = np.full(lead + tuple(d + pads[i] + pads[i + nsp]
                                      for i, d in enumerate(x.shape[x.ndim - nsp:])),
                         fill, dtype=x.dtype)
        padded[(...,) + tuple(slice(b, b + d) for b, d in zip(pads, x.shape[x.ndim - nsp:]))] = x
        x = padded
    eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    w = sliding_window_view(x, eff, axis=tuple(range(x.ndim - nsp, x.ndim)))
    index = ((slice(None),) * (x.ndim - nsp) + tuple(slice(None, None, s) for s in strides)
             + tuple(slice(None, None, d) for d in dilations))
    return w[index]


def _conv(x: np.ndarray, w: np.ndarray, attrs: Attrs, mm: Callable) -> np.ndarray:
    """Grouped N-d convolution as one batched matmul over im2col windows."""
    kernel = w.shape[2:]
    strides, pads, dilations, out = shp.spatial(x.shape, kernel, attrs)
    g, (n, c), m, nsp = attrs["group"], x.shape[:2], w.shape[0], len(kernel)
    cols = windows(x, kernel, strides, pads, dilations, 0)
    cols = cols.reshape((n, g, c // g) + out + kernel)
    order = (0, 1) + tuple(range(3, 3 + nsp)) + (2,) + tuple(range(3 + nsp, 3 + 2 * nsp))
    depth = (c // g) * math.prod(kernel)
    cols = cols.transpose(order).reshape(n, g, math.prod(out), depth)
    y = mm(cols, w.reshape(g, m // g, depth).transpose(0, 2, 1))  # (N, G, P, M/G)
    return y.transpose(0, 1, 3, 2).reshape((n, m) + out)


def f64_conv(xs: Arrays, attrs: Attrs) -> Arrays:
    y = _conv(xs[0], xs[1], attrs, np.matmul)
    return [y + _channel(xs[2], y.ndim) if len(xs) == 3 else y]


def mod_conv(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    y = _conv(xs[0], xs[1], attrs, lambda a, b: matmul_mod(a, b, p))
    return [(y + _channel(xs[2], y.ndim)) % p if len(xs) == 3 else y]


def _pool_windows(x: np.ndarray, attrs: Attrs, fill: Any) -> tuple[np.ndarray, tuple]:
    kernel = tuple(attrs["kernel_shape"])
    strides, pads, dilations, _ = shp.spatial(x.shape, kernel, attrs)
    win = windows(x, kernel, strides, pads, dilations, fill)
    return win, tuple(range(win.ndim - len(kernel), win.ndim))


def _pool_counts(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    """Divisors of AveragePool: the kernel size, or the number of non-pad cells per window."""
    kernel = tuple(attrs["kernel_shape"])
    if attrs["count_include_pad"]:
        return np.asarray(math.prod(kernel), np.int64)
    return _inside_counts(x.shape[2:], kernel, *shp.spatial(x.shape, kernel, attrs)[:3])


@functools.lru_cache(maxsize=256)
def _inside_counts(size: tuple, kernel: tuple, strides: tuple, pads: tuple,
                   dilations: tuple) -> np.ndarray:
    win = windows(np.ones((1, 1) + size, np.int64), kernel, strides, pads, dilations, 0)
    counts = win.sum(axis=tuple(range(win.ndim - len(kernel), win.ndim)))
    counts.flags.writeable = False
    return counts


def f64_maxpool(xs: Arrays, attrs: Attrs) -> Arrays:
    win, axes = _pool_windows(xs[0], attrs, -np.inf)
    return [win.max(axis=axes)]


def mod_maxpool(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    """A seeded hash of each sorted window: sum of mix(value ^ seed[position]), mixed again.

    Pads (the sentinel p) sort last and add nothing, so the result is a function of the
    multiset of the window's values; sorting makes it symmetric.
    """
    win, axes = _pool_windows(xs[0], attrs, p)
    size = math.prod(win.shape[axes[0]:])
    flat = np.sort(win.reshape(-1, size), axis=1)
    terms = _mix(flat.astype(np.uint64) ^ _position_seeds(size, "MaxPool"))
    h = _mix(np.where(flat < p, terms, np.uint64(0)).sum(axis=1, dtype=np.uint64))
    return [(h % np.uint64(p)).astype(np.int64).reshape(win.shape[:axes[0]])]


@functools.lru_cache(maxsize=64)
def _position_seeds(size: int, name: str) -> np.ndarray:
    """One pseudo-random uint64 per position of a sorted window."""
    seeds = _mix(np.arange(size, dtype=np.uint64) + _seed(name))
    seeds.flags.writeable = False
    return seeds


def f64_avgpool(xs: Arrays, attrs: Attrs) -> Arrays:
    win, axes = _pool_windows(xs[0], attrs, 0.0)
    return [win.sum(axis=axes) / _pool_counts(xs[0], attrs)]


def mod_avgpool(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    win, axes = _pool_windows(xs[0], attrs, 0)
    counts = np.asarray(_pool_counts(xs[0], attrs), np.int64)
    return [win.sum(axis=axes) % p * inv_mod(counts, p) % p]


# ---- dense and elementwise -------------------------------------------------------------------

def f64_matmul(xs: Arrays, attrs: Attrs) -> Arrays:
    return [np.matmul(xs[0], xs[1])]


def mod_matmul(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    return [matmul_mod(xs[0], xs[1], p)]


def f64_gemm(xs: Arrays, attrs: Attrs) -> Arrays:
    a = xs[0].T if attrs["transA"] else xs[0]
    b = xs[1].T if attrs["transB"] else xs[1]
    y = attrs["alpha"] * (a @ b)
    return [y + attrs["beta"] * xs[2] if len(xs) == 3 else y]


def mod_gemm(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    a = xs[0].T if attrs["transA"] else xs[0]
    b = xs[1].T if attrs["transB"] else xs[1]
    y = matmul_mod(a, b, p) * const_residue(attrs["alpha"], p) % p
    if len(xs) == 3:
        y = (y + xs[2] * const_residue(attrs["beta"], p) % p) % p
    return [y]


def f64_batchnorm(xs: Arrays, attrs: Attrs) -> Arrays:
    x, scale, bias, mean, var = xs
    r = functools.partial(_channel, ndim=x.ndim)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [(x - r(mean)) / np.sqrt(r(var) + attrs["epsilon"]) * r(scale) + r(bias)]


def mod_batchnorm(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    """(x - mean) * scale * inv(Sqrt(var + eps)) + B with the Sqrt and inverse of the ops."""
    x, scale, bias, mean, var = xs
    r = functools.partial(_channel, ndim=x.ndim)
    root = hash_residues((var + const_residue(attrs["epsilon"], p)) % p, "Sqrt", p)
    factor = r(scale * inv_mod(root, p) % p)
    return [((x - r(mean)) % p * factor % p + r(bias)) % p]


def _lrn_sums(sq: np.ndarray, size: int) -> np.ndarray:
    """Sum of `sq` over LRN's channel window: channels c - floor((size - 1) / 2) through
    c + ceil((size - 1) / 2), clipped to [0, C) (zero padding along axis 1)."""
    below, channels = (size - 1) // 2, sq.shape[1]
    padded = np.zeros(sq.shape[:1] + (channels + size - 1,) + sq.shape[2:], sq.dtype)
    padded[:, below:below + channels] = sq
    total = padded[:, :channels].copy()
    for k in range(1, size):
        total += padded[:, k:k + channels]
    return total


def f64_lrn(xs: Arrays, attrs: Attrs) -> Arrays:
    x, size = xs[0], attrs["size"]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = attrs["bias"] + attrs["alpha"] / size * _lrn_sums(x * x, size)
        return [x / d ** attrs["beta"]]


def mod_lrn(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    """x * h(d), d = bias + alpha / size * (window sum of x^2) exact mod p, and h a seeded hash
    standing for d^-beta (one function per beta)."""
    x, size = xs[0], attrs["size"]
    scale = const_residue(attrs["alpha"], p) * int(inv_mod(np.array([size % p]), p)[0]) % p
    d = (const_residue(attrs["bias"], p) + scale * (_lrn_sums(x * x % p, size) % p)) % p
    return [x * hash_residues(d, f"LRN^-{attrs['beta']!r}", p) % p]


def lrn_band(channels: int, size: int, alpha: float, spatial_rank: int) -> np.ndarray:
    """LRN's window as the (C, C, 1, ..., 1) float64 weight of a 1x1 Conv: W[c, i] = alpha /
    size where max(0, c - floor((size - 1) / 2)) <= i <= min(C - 1, c + ceil((size - 1) / 2))
    (ONNX's definition), else 0; alpha is rounded to float32 first, as an LRN attribute is.
    Conv(x * x, W) is then alpha / size times LRN's square sum."""
    if channels < 1 or size < 1 or spatial_rank < 0:
        raise ValueError(f"lrn_band takes channels >= 1, size >= 1 and spatial_rank >= 0; got "
                         f"{channels}, {size} and {spatial_rank}")
    c, i = np.arange(channels)[:, None], np.arange(channels)[None, :]
    inside = ((np.maximum(0, c - math.floor((size - 1) / 2)) <= i)
              & (i <= np.minimum(channels - 1, c + math.ceil((size - 1) / 2))))
    w = np.where(inside, float(np.float32(alpha)) / size, 0.0)
    return w.reshape((channels, channels) + (1,) * spatial_rank)


def f64_reducesum(xs: Arrays, attrs: Attrs) -> Arrays:
    axes = shp.reduce_axes(xs[0].shape, attrs)
    if axes is None:
        return [xs[0]]
    return [np.sum(xs[0], axis=axes, keepdims=bool(attrs["keepdims"]))]


def mod_reducesum(xs: Arrays, attrs: Attrs, p: int) -> Arrays:
    return [f64_reducesum(xs, attrs)[0] % p]


def _f64_sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _f64_reciprocal(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / x


def _f64_sqrt(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.sqrt(x)


def _f64_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / b


UNARY_F64: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Relu": lambda x: np.maximum(x, 0.0), "Sigmoid": _f64_sigmoid, "Tanh": np.tanh,
    "Sqrt": _f64_sqrt, "Neg": np.negative, "Reciprocal": _f64_reciprocal,
}
UNARY_MOD: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "Relu": lambda x, p: hash_residues(x, "Relu", p),
    "Sigmoid": lambda x, p: hash_residues(x, "Sigmoid", p),
    "Tanh": lambda x, p: hash_residues(x, "Tanh", p),
    "Sqrt": lambda x, p: hash_residues(x, "Sqrt", p),
    "Neg": lambda x, p: -x % p,
    "Reciprocal": inv_mod,
}
BINARY_F64: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _f64_div,
}
BINARY_MOD: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "Add": lambda a, b, p: (a + b) % p,
    "Sub": lambda a, b, p: (a - b) % p,
    "Mul": lambda a, b, p: a * b % p,
    "Div": lambda a, b, p: a * inv_mod(b, p) % p,
}


# ---- structural: the same in both worlds -----------------------------------------------------

def identity(xs: Arrays, attrs: Attrs) -> Arrays:
    return [xs[0]]


def concat(xs: Arrays, attrs: Attrs) -> Arrays:
    return [np.concatenate(xs, axis=attrs["axis"])]


def split(xs: Arrays, attrs: Attrs) -> Arrays:
    axis, sizes = shp.split_sizes(xs[0].shape, attrs)
    return np.split(xs[0], np.cumsum(sizes)[:-1], axis=axis)


def transpose(xs: Arrays, attrs: Attrs) -> Arrays:
    return [xs[0].transpose(shp.perm_of(xs[0].shape, attrs))]


def reshape(xs: Arrays, attrs: Attrs) -> Arrays:
    return [xs[0].reshape(shp.reshape_target(xs[0].shape, attrs))]
