"""The search space of rule generation: pattern variables, the operator menu, and bottom-up
enumeration of operator graphs with their fingerprints modulo a prime (TASO section 3.1).

[Note: variables and shape environments] A pattern variable has a *kind*: a shape template over
dimension symbols (`("a", "b")`, `("k", "k/2", 3, 3)`), and each kind has a few copies (x-kind
variables `x0`, `x1`, `x2`). A shape environment gives every symbol a value, so it fixes the
shape of every variable; a graph is kept only if shape inference (`OpDef.infer`) accepts it in
every environment, and its fingerprint is taken in all of them. Symbols are distinct within an
environment and change across environments, so an equality that holds only because two sizes
happen to coincide does not survive. Kinds whose `slot` is set (BatchNormalization's scale,
bias, mean and variance) feed only that input of that operator and do not count against
`max_vars`.

[Note: enumeration] Graphs are single-root operator DAGs, built bottom-up by size (the number
of operator nodes), hash-consed: a node is an operator instance applied to child terms, and a
term is one output of a node or a variable. A graph of size s is an operator over children
whose node sets together hold s - 1 nodes, so shared subgraphs (`Mul(Relu(x), Relu(x))`) are
enumerated once. Only *representatives* become children: the first term (smallest, then
earliest) of each fingerprint class, never a constant-valued one. A graph with a
non-representative child differs from one with the representative child only by a smaller rule
applied inside it (congruence), so TASO's "implied by a smaller rule" pruning happens here
before anything is built; it also keeps the enumeration near the number of distinct functions
rather than the number of graphs.

[Note: fingerprints] Variables hold fixed random residues mod p, drawn per environment from
the seed; every node is evaluated with `OpDef.mod_fn` (exact for polynomial operators, a seeded
hash for the others: see [Note: modular semantics] in `_opkernels.py`). A term's fingerprint is
its output shape signature plus a 64-bit BLAKE2 hash of its residues in every environment;
terms with equal fingerprints fall into one bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from legato.core.rewrite import _opshapes as S
from legato.core.rewrite.ops import OpDef, get_op
from legato.core.stop import StopReason

Shape = tuple[int, ...]
Progress = Callable[[str, int, int], None]

__all__ = ["Instance", "Kind", "Space", "menu"]


@dataclasses.dataclass(frozen=True)
class Kind:
    """A family of pattern variables sharing a shape template."""

    name: str
    dims: tuple[str | int, ...]   # a symbol, "sym/2" (half of it) or a fixed size
    copies: int
    slot: tuple[str, int] | None = None   # only this (op, input index) takes it
    weight: bool = False                  # a conv weight: never the data input of Conv/pools

    def shape(self, env: Mapping[str, int]) -> Shape:
        out = []
        for d in self.dims:
            if isinstance(d, int):
                out.append(d)
            elif d.endswith("/2"):
                out.append(env[d[:-2]] // 2)
            else:
                out.append(env[d])
        return tuple(out)

    def symbols(self) -> set[str]:
        return {d[:-2] if d.endswith("/2") else d for d in self.dims if isinstance(d, str)}


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
    """One operator with one choice of attributes from the menu."""

    op: OpDef
    label: str                       # canonical text: "Conv{group=2,kernel=3}"
    attrs: Mapping[str, Any]         # attributes written into patterns (JSON values)
    norm: Mapping[str, Any]          # normalized attributes for the kernels
    arity: int
    num_outputs: int = 1
    consts: tuple[tuple[int, tuple[int, ...]], ...] = ()   # (ONNX input index, value_ints)
    slots: tuple[str | None, ...] = ()                     # per input: a required kind
    guard: Callable[[list[Shape]], bool] | None = None      # a menu restriction on shapes
    data: tuple[int, ...] = ()       # inputs that must depend on a non-weight variable

    def slot(self, i: int) -> str | None:
        return self.slots[i] if i < len(self.slots) else None


def _inst(name: str, label: str, arity: int, attrs: dict | None = None,
          eval_attrs: dict | None = None, **kw: Any) -> Instance:
    op = get_op(name)
    attrs = attrs or {}
    norm = op.normalize_attrs({**attrs, **(eval_attrs or {})})
    return Instance(op, label, dict(attrs), norm, arity, **kw)


def _window(kernel: int, pad: int) -> dict:
    return {"kernel_shape": [kernel, kernel], "pads": [pad] * 4, "strides": [1, 1]}


def _same_or_vector(shapes: list[Shape]) -> bool:
    """Elementwise operands: equal shapes, or a vector broadcast along the last axis."""
    return shapes[0] == shapes[1] or min(len(shapes[0]), len(shapes[1])) == 1


def _matrices(shapes: list[Shape]) -> bool:
    return all(len(s) <= 2 for s in shapes)


def menu(name: str) -> list[Instance]:
    """The attribute menu of one operator (see [Note: operator menu] in `generate.py`)."""
    if name in ("Add", "Sub", "Mul", "Div"):
        return [_inst(name, name, 2, guard=_same_or_vector)]
    if name == "MatMul":
        return [_inst(name, name, 2, guard=_matrices)]
    if name in ("Relu", "Sigmoid", "Tanh", "Sqrt", "Neg", "Reciprocal", "Identity"):
        return [_inst(name, name, 1)]
    if name == "Gemm":
        return [_inst(name, f"Gemm{{transB={tb}{',C' if c else ''}}}", 2 + c, {"transB": tb})
                for tb in (0, 1) for c in (0, 1)]
    if name == "Conv":
        out = []
        for kernel, pad, group in ((1, 0, 1), (3, 1, 1), (3, 1, 2)):
            attrs = {**_window(kernel, pad), "dilations": [1, 1], "group": group}
            for bias in (0, 1):
                out.append(_inst(name, f"Conv{{kernel={kernel},group={group}"
                                       f"{',bias' if bias else ''}}}", 2 + bias, attrs,
                                 data=(0,)))
        return out
    if name in ("MaxPool", "AveragePool"):
        return [_inst(name, f"{name}{{kernel=3}}", 1, _window(3, 1), data=(0,))]
    if name == "BatchNormalization":
        return [_inst(name, name, 5, slots=(None, "scale", "bias", "mean", "var"), data=(0,))]
    if name == "Concat":
        return [_inst(name, f"Concat{{axis={a}}}", 2, {"axis": a}) for a in (0, 1)]
    if name == "Split":
        return [_inst(name, f"Split{{axis={a}}}", 1, {"axis": a}, {"num_outputs": 2},
                      num_outputs=2) for a in (0, 1)]
    if name == "Transpose":
        perms = ((1, 0), (0, 1, 3, 2), (0, 2, 3, 1), (0, 3, 1, 2))
        return [_inst(name, f"Transpose{{perm={''.join(map(str, p))}}}", 1, {"perm": list(p)})
                for p in perms]
    if name == "Reshape":
        return [_inst(name, f"Reshape{{shape={','.join(map(str, t))}}}", 1, {},
                      {"shape": list(t)}, consts=((1, t),)) for t in ((-1,), (0, -1))]
    if name == "ReduceSum":
        return [_inst(name, f"ReduceSum{{axes={a}}}", 1, {"keepdims": 1}, {"axes": [a]},
                      consts=((1, (a,)),)) for a in (0, 1)]
    raise KeyError(name)


class Space:
    """Terms (variables and operator outputs), their fingerprints and buckets.

    Terms are numbered in creation order (variables first, then by size), which makes every
    choice deterministic: a bucket's representative is its lowest-numbered term.
    """

    def __init__(self, instances: Sequence[Instance], kinds: Sequence[Kind],
                 envs: Sequence[Mapping[str, int]], *, seed: int, p: int, max_vars: int):
        self.instances, self.kinds, self.envs = list(instances), list(kinds), list(envs)
        self.p, self.max_vars = p, max_vars
        self.sig_ids: dict[tuple[Shape, ...], int] = {}
        self.sigs: list[tuple[Shape, ...]] = []
        # terms
        self.t_node: list[int] = []      # producing node, -1 for a variable
        self.t_out: list[int] = []       # output index of the node (Split has two)
        self.t_size: list[int] = []
        self.t_vars: list[int] = []      # bit mask of variables
        self.t_fp: list[int] = []
        self.t_sig: list[int] = []
        self.vals: dict[int, list[np.ndarray]] = {}        # representatives usable as children
        self.nodes_of: dict[int, frozenset[int]] = {}
        # nodes
        self.n_inst: list[int] = []
        self.n_children: list[tuple[int, ...]] = []
        self.n_terms: list[tuple[int, ...]] = []
        # fingerprint classes
        self.first: dict[int, int] = {}
        self.more: dict[int, list[int]] = {}
        self.constant: set[int] = set()
        # children pool: sig -> size -> terms; node -> terms containing it
        self.pool: dict[int, dict[int, list[int]]] = {}
        self.contain: dict[int, list[int]] = {}
        self.slot_vars: dict[str, list[int]] = {}
        self.var_kind: list[Kind] = []
        self.counted = 0                 # mask of variables that count against max_vars
        self.data_mask = 0               # mask of variables that are not conv weights
        self._valid: dict[tuple, tuple[int, ...] | None] = {}
        self.graphs = 0
        self.invalid = 0
        self._add_variables(seed)

    # ---- variables ---------------------------------------------------------------------------

    def _sig(self, shapes: tuple[Shape, ...]) -> int:
        sid = self.sig_ids.get(shapes)
        if sid is None:
            sid = self.sig_ids[shapes] = len(self.sigs)
            self.sigs.append(shapes)
        return sid

    def _add_variables(self, seed: int) -> None:
        rngs = [np.random.default_rng([seed, e]) for e in range(len(self.envs))]
        for kind in self.kinds:
            for _ in range(kind.copies):
                vid = len(self.t_node)
                shapes = tuple(kind.shape(env) for env in self.envs)
                values = [rng.integers(0, self.p, size=s, dtype=np.int64)
                          for rng, s in zip(rngs, shapes)]
                self._new_term(-1, 0, 0, 1 << vid, self._sig(shapes), values)
                self.var_kind.append(kind)
                if not kind.weight:
                    self.data_mask |= 1 << vid
                if kind.slot is None:
                    self.counted |= 1 << vid
                    self._pool_add(vid)
                else:
                    self.slot_vars.setdefault(kind.name, []).append(vid)
                self.nodes_of[vid] = frozenset()

    def _new_term(self, node: int, out: int, size: int, mask: int, sig: int,
                  values: list[np.ndarray]) -> tuple[int, bool]:
        tid = len(self.t_node)
        self.t_node.append(node)
        self.t_out.append(out)
        self.t_size.append(size)
        self.t_vars.append(mask)
        self.t_sig.append(sig)
        data = b"".join(v.tobytes() for v in values)
        fp = (sig << 64) | int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        self.t_fp.append(fp)
        if fp in self.first:
            self.more.setdefault(fp, []).append(tid)
            return tid, False
        self.first[fp] = tid
        if all(v.size == 0 or bool((v == v.flat[0]).all()) for v in values) and node >= 0:
            self.constant.add(fp)
            return tid, False
        self.vals[tid] = values
        return tid, True

    def _pool_add(self, tid: int) -> None:
        self.pool.setdefault(self.t_sig[tid], {}).setdefault(self.t_size[tid], []).append(tid)
        for n in self.nodes_of.get(tid, ()):
            self.contain.setdefault(n, []).append(tid)

    # ---- structure -------------------------------------------------------------------------

    def nodes(self, tid: int) -> frozenset[int]:
        """The operator nodes of a term's graph."""
        got = self.nodes_of.get(tid)
        if got is None:
            n = self.t_node[tid]
            got = frozenset({n}).union(*(self.nodes(c) for c in self.n_children[n]))
        return got

    def is_variable(self, tid: int) -> bool:
        return self.t_node[tid] < 0

    # ---- shape validity ------------------------------------------------------------------------

    def _check(self, ii: int, sigs: tuple[int, ...]) -> tuple[int, ...] | None:
        """Output signatures of instance ii on input signatures, None if invalid anywhere."""
        key = (ii, sigs)
        if key in self._valid:
            return self._valid[key]
        inst = self.instances[ii]
        outs: list[list[Shape]] = [[] for _ in range(inst.num_outputs)]
        result: tuple[int, ...] | None = None
        try:
            for e in range(len(self.envs)):
                ins = [self.sigs[s][e] for s in sigs]
                if inst.guard is not None and not inst.guard(ins):
                    raise S.ShapeFault("outside the menu")
                shapes = inst.op.shape_fn(ins, inst.norm)
                for j, shape in enumerate(shapes):
                    outs[j].append(shape)
            result = tuple(self._sig(tuple(o)) for o in outs)
        except S.ShapeFault:
            result = None
        self._valid[key] = result
        return result

    def _sig_tuples(self, ii: int, candidates: list[int]) -> Iterator[tuple[tuple, tuple]]:
        inst = self.instances[ii]
        prefix_ok = inst.op.min_inputs <= 2 < inst.arity

        def rec(pos: int, chosen: tuple[int, ...]) -> Iterator[tuple[tuple, tuple]]:
            if pos == inst.arity:
                outs = self._check(ii, chosen)
                if outs is not None:
                    yield chosen, outs
                else:
                    self.invalid += 1
                return
            if pos == 2 and prefix_ok and self._check(ii, chosen) is None:
                return
            slot = inst.slot(pos)
            if slot is not None:
                options = sorted({self.t_sig[v] for v in self.slot_vars.get(slot, ())})
            else:
                options = candidates
            for s in options:
                yield from rec(pos + 1, chosen + (s,))

        yield from rec(0, ())

    # ---- children -----------------------------------------------------------------------------

    def _children(self, inst: Instance, sigs: tuple[int, ...], u: int
                  ) -> Iterator[tuple[int, ...]]:
        """Distinct child terms of the given signatures whose node sets hold u nodes together."""
        k, counted, limit = inst.arity, self.counted, self.max_vars
        t_sig, t_vars, nodes_of, data_mask = self.t_sig, self.t_vars, self.nodes_of, self.data_mask

        def rec(pos: int, chosen: tuple[int, ...], union: frozenset[int], mask: int
                ) -> Iterator[tuple[int, ...]]:
            if pos == k:
                if len(union) == u:
                    yield chosen
                return
            last, need, sig = pos == k - 1, u - len(union), sigs[pos]
            slot = inst.slot(pos)
            if slot is not None:
                if not (last and need):
                    for v in self.slot_vars[slot]:
                        if t_sig[v] == sig:
                            yield from rec(pos + 1, chosen + (v,), union, mask | t_vars[v])
                return
            by_size = self.pool.get(sig, {})
            data = pos in inst.data
            if not (last and need):
                for v in by_size.get(0, ()):
                    if v in chosen or (data and not t_vars[v] & data_mask):
                        continue
                    m = mask | t_vars[v]
                    if (m & counted).bit_count() <= limit:
                        yield from rec(pos + 1, chosen + (v,), union, m)
            seen: set[int] = set()
            for n in sorted(union):                      # terms sharing a node with the union
                for t in self.contain.get(n, ()):
                    if t in seen or t_sig[t] != sig or t in chosen or \
                            (data and not t_vars[t] & data_mask):
                        continue
                    seen.add(t)
                    grown = union | nodes_of[t]
                    if len(grown) > u or (last and len(grown) != u):
                        continue
                    m = mask | t_vars[t]
                    if (m & counted).bit_count() <= limit:
                        yield from rec(pos + 1, chosen + (t,), grown, m)
            for size in range(1, need + 1):              # terms disjoint from the union
                if last and size != need:
                    continue
                for t in by_size.get(size, ()):
                    ns = nodes_of[t]
                    if (union and not union.isdisjoint(ns)) or (data and not t_vars[t] & data_mask):
                        continue
                    m = mask | t_vars[t]
                    if (m & counted).bit_count() <= limit:
                        yield from rec(pos + 1, chosen + (t,), union | ns, m)

        yield from rec(0, (), frozenset(), 0)

    # ---- the enumeration ------------------------------------------------------------------------

    def _add_node(self, ii: int, children: tuple[int, ...], outs: tuple[int, ...], size: int,
                  keep: bool, fresh: list[int]) -> None:
        inst = self.instances[ii]
        node = len(self.n_inst)
        self.n_inst.append(ii)
        self.n_children.append(children)
        mask = 0
        for c in children:
            mask |= self.t_vars[c]
        results = []
        for e in range(len(self.envs)):
            results.append(inst.op.mod_fn([self.vals[c][e] for c in children], inst.norm, self.p))
        terms = []
        union = None
        for j, sig in enumerate(outs):
            tid, rep = self._new_term(node, j, size, mask, sig, [r[j] for r in results])
            terms.append(tid)
            if rep and keep:
                if union is None:
                    union = frozenset({node}).union(*(self.nodes_of[c] for c in children))
                self.nodes_of[tid] = union
                fresh.append(tid)
            elif rep:
                del self.vals[tid]
        self.n_terms.append(tuple(terms))
        self.graphs += len(terms)

    def run(self, max_ops: int, *, deadline: float | None = None,
            progress: Progress | None = None) -> StopReason:
        """Enumerate every graph of 1..max_ops nodes; returns EXHAUSTED, or TIME_LIMIT when
        `deadline` (a time.monotonic() value) passed first."""
        for size in range(1, max_ops + 1):
            candidates = sorted(self.pool)
            work = [(ii, sigs, outs) for ii in range(len(self.instances))
                    for sigs, outs in self._sig_tuples(ii, candidates)]
            fresh: list[int] = []
            keep = size < max_ops
            stage = f"graphs of {size} op{'s' * (size > 1)}"
            step = max(1, len(work) // 200)
            for i, (ii, sigs, outs) in enumerate(work):
                if progress is not None and i % step == 0:
                    progress(stage, i, len(work))
                if deadline is not None and i % 16 == 0 and time.monotonic() > deadline:
                    return StopReason.TIME_LIMIT
                for children in self._children(self.instances[ii], sigs, size - 1):
                    self._add_node(ii, children, outs, size, keep, fresh)
            if progress is not None:
                progress(stage, len(work), len(work))
            for tid in fresh:
                self._pool_add(tid)
        return StopReason.EXHAUSTED
