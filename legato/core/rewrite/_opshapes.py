"""Shape inference for the operators of `ops.py`, following the ONNX spec (opset 17+).

Each `infer_*` function takes the input shapes and the normalized attributes (see
`OpDef.normalize_attrs`) and returns the output shapes, or raises `ShapeFault` with a message
that says what is wrong and how to fix it; `OpDef.infer` prefixes the op and the input shapes
and raises it as a `ShapeError`. The helpers that resolve attributes (`spatial`, `split_sizes`,
`perm_of`, `reshape_target`, `reduce_axes`) are shared with the kernels.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

Shape = tuple[int, ...]
Attrs = Mapping[str, Any]


class ShapeFault(Exception):
    """Internal: invalid shapes or attributes; `OpDef.infer` names the op and the shapes."""


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    """`axis` in [-rank, rank) made non-negative."""
    if not -rank <= axis < rank:
        raise ShapeFault(f"{what}={axis} is out of range for rank {rank}; "
                         f"pass {-rank} <= {what} < {rank}")
    return axis % rank


def broadcast(a: Shape, b: Shape, what: str = "inputs") -> Shape:
    """The numpy (ONNX multidirectional) broadcast of two shapes."""
    n = max(len(a), len(b))
    a2, b2 = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a2, b2):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ShapeFault(f"{what} {a} and {b} do not broadcast ({x} vs {y}); trailing "
                             "dimensions must be equal or 1")
    return tuple(out)


def infer_same(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Elementwise unary ops (and Identity): the output has the input's shape."""
    return [shapes[0]]


def infer_binary(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Add/Sub/Mul/Div: numpy broadcasting of the two inputs."""
    return [broadcast(shapes[0], shapes[1])]


def infer_matmul(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """numpy.matmul semantics: 1-D operands promoted and squeezed, batch dims broadcast."""
    a, b = shapes
    if not a or not b:
        raise ShapeFault("operands must have rank >= 1; use Mul for scalars")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ShapeFault(f"inner dimensions differ: A's last dim is {a2[-1]} but B's "
                         f"{'only' if len(b) == 1 else 'second-to-last'} dim is {b2[-2]}; "
                         f"pass B with {a2[-1]} rows")
    out = broadcast(a2[:-2], b2[:-2], "batch dimensions") + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return [out]


def infer_gemm(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Y = alpha * op(A) @ op(B) + beta * C with C broadcast to (M, N)."""
    a, b = shapes[0], shapes[1]
    if len(a) != 2 or len(b) != 2:
        raise ShapeFault("A and B must be 2-D; use MatMul for other ranks")
    m, k = (a[1], a[0]) if attrs["transA"] else a
    k2, n = (b[1], b[0]) if attrs["transB"] else b
    if k != k2:
        raise ShapeFault(f"inner dimensions differ: op(A) is {(m, k)} and op(B) is {(k2, n)} "
                         f"(transA={attrs['transA']}, transB={attrs['transB']}); "
                         "check the transposes")
    if len(shapes) == 3:
        c = shapes[2]
        if len(c) > 2 or any(d not in (1, t) for d, t in zip(reversed(c), (n, m))):
            raise ShapeFault(f"C {c} does not broadcast to (M, N) = {(m, n)}; "
                             f"pass C of shape ({n},), ({m}, 1) or {(m, n)}")
    return [(m, n)]


def _ints(attrs: Attrs, name: str, n: int, default: int) -> tuple[int, ...]:
    value = attrs.get(name)
    if value is None:
        return (default,) * n
    if len(value) != n:
        per = "begins then ends" if name == "pads" else "one per spatial dimension"
        raise ShapeFault(f"{name}={list(value)} has {len(value)} entries; pass {n} ({per})")
    return tuple(value)


def spatial(x: Shape, kernel: Sequence[int], attrs: Attrs
            ) -> tuple[Shape, Shape, Shape, Shape]:
    """Strides, pads (begins then ends), dilations and output spatial shape of Conv/pooling.

    Args:
        x: the (N, C, *spatial) input shape.
        kernel: the kernel's spatial shape.
        attrs: normalized attributes (strides, pads, dilations, auto_pad).
    Returns:
        (strides, pads, dilations, out_spatial).
    """
    nsp = len(x) - 2
    kernel = tuple(kernel)
    if len(kernel) != nsp or any(k < 1 for k in kernel):
        raise ShapeFault(f"kernel shape {kernel} must have {nsp} positive entries for input {x}")
    strides = _ints(attrs, "strides", nsp, 1)
    dilations = _ints(attrs, "dilations", nsp, 1)
    if any(s < 1 for s in strides) or any(d < 1 for d in dilations):
        raise ShapeFault(f"strides={list(strides)} and dilations={list(dilations)} must be >= 1")
    eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if attrs.get("pads") is not None:
            raise ShapeFault(f"auto_pad={auto} and pads cannot both be set; drop pads")
        begins, ends = [], []
        for size, s, e in zip(x[2:], strides, eff):
            total = max(0, (-(-size // s) - 1) * s + e - size)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        pads = tuple(begins + ends)
    elif auto == "VALID":
        pads = (0,) * (2 * nsp)
    elif auto == "NOTSET":
        pads = _ints(attrs, "pads", 2 * nsp, 0)
    else:
        raise ShapeFault(f"auto_pad={auto!r} is unknown; pass NOTSET, VALID, SAME_UPPER or "
                         "SAME_LOWER")
    if any(q < 0 for q in pads):
        raise ShapeFault(f"pads={list(pads)} must be >= 0")
    out = tuple((size + pads[i] + pads[i + nsp] - eff[i]) // strides[i] + 1
                for i, size in enumerate(x[2:]))
    if any(o < 1 for o in out):
        raise ShapeFault(f"the kernel {kernel} (dilated {eff}) is larger than the padded input "
                         f"{x[2:]} with pads {list(pads)}; pad more or use a smaller kernel")
    return strides, pads, dilations, out


def infer_conv(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Y (N, M, *out) from X (N, C, *spatial), W (M, C/group, *kernel), optional B (M,)."""
    x, w = shapes[0], shapes[1]
    if len(x) < 3:
        raise ShapeFault("X must be (N, C, spatial...) with rank >= 3")
    if len(w) != len(x):
        raise ShapeFault(f"W has rank {len(w)} but X has rank {len(x)}; they must match")
    group, c, m = attrs["group"], x[1], w[0]
    if group < 1:
        raise ShapeFault(f"group={group} must be >= 1")
    if c % group:
        raise ShapeFault(f"input channels C={c} are not divisible by group={group}; pass a "
                         f"group that divides {c}")
    if w[1] * group != c:
        raise ShapeFault(f"W has {w[1]} input channels per group but X has C={c} with "
                         f"group={group}; W.shape[1] must be {c // group}")
    if m % group:
        raise ShapeFault(f"output channels M={m} are not divisible by group={group}")
    ks = attrs.get("kernel_shape")
    if ks is not None and tuple(ks) != w[2:]:
        raise ShapeFault(f"kernel_shape={list(ks)} does not match W's spatial shape {w[2:]}")
    if len(shapes) == 3 and shapes[2] != (m,):
        raise ShapeFault(f"bias B must have shape ({m},), one value per output channel")
    return [(x[0], m) + spatial(x, w[2:], attrs)[3]]


def infer_pool(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """MaxPool/AveragePool: (N, C, *spatial) -> (N, C, *out)."""
    x = shapes[0]
    if len(x) < 3:
        raise ShapeFault("X must be (N, C, spatial...) with rank >= 3")
    if attrs.get("ceil_mode", 0):
        raise ShapeFault("ceil_mode=1 is not supported; pass ceil_mode=0 (pad explicitly)")
    return [x[:2] + spatial(x, attrs["kernel_shape"], attrs)[3]]


def infer_batchnorm(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Inference-mode BatchNormalization: X (N, C, ...) with four (C,) parameters."""
    x = shapes[0]
    if len(x) < 2:
        raise ShapeFault("X must be (N, C, ...) with rank >= 2")
    if attrs["training_mode"]:
        raise ShapeFault("training_mode=1 is not supported (inference only); pass 0")
    for name, shape in zip(("scale", "B", "input_mean", "input_var"), shapes[1:]):
        if shape != (x[1],):
            raise ShapeFault(f"{name} has shape {shape}; it must be (C,) = ({x[1]},)")
    return [x]


def infer_lrn(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """LRN: X (N, C, ...) normalized across a window of `size` channels; same shape."""
    x = shapes[0]
    if len(x) < 2:
        raise ShapeFault("X must be (N, C, ...) with rank >= 2")
    if attrs["size"] < 1:
        raise ShapeFault(f"size={attrs['size']} must be >= 1 (the number of channels summed)")
    return [x]


def infer_concat(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Inputs of one rank, equal outside `axis`, joined along it."""
    first = shapes[0]
    if not first:
        raise ShapeFault("inputs must have rank >= 1")
    axis = norm_axis(attrs["axis"], len(first))
    rest, total = first[:axis] + first[axis + 1:], 0
    for i, s in enumerate(shapes):
        if len(s) != len(first):
            raise ShapeFault(f"input {i} has rank {len(s)} but input 0 has rank {len(first)}; "
                             "all inputs need the same rank")
        if s[:axis] + s[axis + 1:] != rest:
            raise ShapeFault(f"input {i} {s} differs from input 0 {first} outside axis {axis}")
        total += s[axis]
    return [first[:axis] + (total,) + first[axis + 1:]]


def split_sizes(x: Shape, attrs: Attrs) -> tuple[int, tuple[int, ...]]:
    """The normalized axis and the part sizes of a Split (from `split` or `num_outputs`)."""
    if not x:
        raise ShapeFault("the input must have rank >= 1")
    axis = norm_axis(attrs["axis"], len(x))
    dim, sizes, count = x[axis], attrs.get("split"), attrs.get("num_outputs")
    if sizes is not None and count is not None:
        raise ShapeFault("split and num_outputs are both set; pass one")
    if sizes is not None:
        if not sizes or any(s < 0 for s in sizes) or sum(sizes) != dim:
            raise ShapeFault(f"split={list(sizes)} must be non-negative sizes summing to the "
                             f"axis {axis} dimension {dim}")
        return axis, tuple(sizes)
    if count is None:
        raise ShapeFault("pass split=[sizes...] or num_outputs=n")
    chunk = -(-dim // count) if count >= 1 else 0
    last = dim - chunk * (count - 1)
    if count < 1 or last < 1:
        raise ShapeFault(f"num_outputs={count} cannot split dimension {dim} (chunks of "
                         f"{chunk}); pass 1 <= num_outputs with a non-empty last chunk")
    return axis, (chunk,) * (count - 1) + (last,)


def infer_split(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """One output per part along `axis`."""
    x = shapes[0]
    axis, sizes = split_sizes(x, attrs)
    return [x[:axis] + (s,) + x[axis + 1:] for s in sizes]


def perm_of(x: Shape, attrs: Attrs) -> tuple[int, ...]:
    """Transpose's permutation (reversed axes by default), validated."""
    perm = attrs.get("perm")
    if perm is None:
        return tuple(range(len(x) - 1, -1, -1))
    if sorted(perm) != list(range(len(x))):
        raise ShapeFault(f"perm={list(perm)} is not a permutation of 0..{len(x) - 1} for a "
                         f"rank {len(x)} input")
    return tuple(perm)


def infer_transpose(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Axes permuted by `perm`."""
    x = shapes[0]
    return [tuple(x[i] for i in perm_of(x, attrs))]


def reshape_target(x: Shape, attrs: Attrs) -> Shape:
    """Reshape's output shape: 0 copies the input dim (unless allowzero), -1 is inferred."""
    shape, allowzero = attrs["shape"], attrs["allowzero"]
    out, unknown = [], None
    for i, d in enumerate(shape):
        if d == -1:
            if unknown is not None:
                raise ShapeFault(f"shape={list(shape)} has more than one -1")
            unknown = i
            out.append(1)
        elif d == 0 and not allowzero:
            if i >= len(x):
                raise ShapeFault(f"shape={list(shape)} copies dim {i} (a 0) but the input has "
                                 f"rank {len(x)}")
            out.append(x[i])
        elif d < 0:
            raise ShapeFault(f"shape={list(shape)} has {d}; only -1 may be negative")
        else:
            out.append(d)
    total, known = math.prod(x), math.prod(out)
    if unknown is not None:
        if known == 0 or total % known:
            raise ShapeFault(f"shape={list(shape)} cannot hold the {total} elements of the input")
        out[unknown] = total // known
    elif known != total:
        raise ShapeFault(f"shape={list(shape)} has {known} elements but the input has {total}")
    return tuple(out)


def infer_reshape(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """The resolved target shape."""
    return [reshape_target(shapes[0], attrs)]


def reduce_axes(x: Shape, attrs: Attrs) -> tuple[int, ...] | None:
    """ReduceSum's sorted non-negative axes; None when it is a no-op (empty axes + noop flag)."""
    axes = attrs.get("axes")
    if not axes:
        return None if attrs["noop_with_empty_axes"] else tuple(range(len(x)))
    norm = tuple(sorted(norm_axis(a, len(x), "axes entry") for a in axes))
    if len(set(norm)) != len(norm):
        raise ShapeFault(f"axes={list(axes)} names an axis twice")
    return norm


def infer_reducesum(shapes: Sequence[Shape], attrs: Attrs) -> list[Shape]:
    """Reduced axes kept as 1 (keepdims=1) or dropped."""
    x = shapes[0]
    axes = reduce_axes(x, attrs)
    if axes is None:
        return [x]
    if attrs["keepdims"]:
        return [tuple(1 if i in axes else d for i, d in enumerate(x))]
    return [tuple(d for i, d in enumerate(x) if i not in axes)]
