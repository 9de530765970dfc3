"""Rule families: one hand-written rule written once for k branches, k = 2 .. MAX_ARITY.

`merges.json` beside this file holds what `family_rules()` builds, each member verified on its
own (`legato rules verify legato/core/rewrite/rules/merges.json --write`);
`tests/core/rewrite/test_families.py` checks that the file and this module agree. To change a
family, edit it here, then rebuild and verify the file:

    python -m legato.core.rewrite.rules.families     # rewrites merges.json, unverified
    legato rules verify legato/core/rewrite/rules/merges.json --write

Families:
- `merge-parallel-matmul`: k MatMul(x, W_i) with constant 2-D W_i of one row count ->
  Split(MatMul(x, Concat(W_1..W_k, axis=1)), axis=-1).
- `merge-parallel-gemm`: k Gemm(x, W_i, b_i, transB=1) -> Split(Gemm(x, Concat(W), Concat(b))).
- `merge-parallel-conv`: k Conv(x, W_i, b_i) with one configuration (group 1) ->
  Split(Conv(x, Concat(W), Concat(b)), axis=1).
- `add-split`: k Add(Split(x)_i, Split(y)_i), where x and y have one shape and are split alike
  -> Split(Add(x, y)): after merging the MatMuls of x and of h in `x W_i + h U_i`, one Add.
- `relu-split`: k Relu(Split(x)_i) -> Split(Relu(x)): after a merge, one Relu that onnxruntime
  fuses into the merged Conv again (k Conv+Relu fusions were lost to the Split otherwise).

The k = 2 members keep the names the first hand-written rules had (`merge-parallel-matmul`);
larger ones end in their arity (`merge-parallel-matmul-8`). The merges have
interchangeable roots, so they set `ordered_roots` (the matcher tries each set of k branches
once, not k! times); all set `family`, so the search merges k branches in one step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from legato.core.rewrite.pattern import Rule, load_rules, save_rules

__all__ = ["FAMILIES", "MAX_ARITY", "MERGES_FILE", "family_rules"]

MAX_ARITY = 8
MERGES_FILE = Path(__file__).parent / "merges.json"
_IDS = "abcdefghijklmnop"


def _name(family: str, k: int) -> str:
    return family if k == 2 else f"{family}-{k}"


def _sizes(ws: list[str], axis: int) -> dict:
    return {"id": "sizes", "op": "Constant", "inputs": [],
            "attrs": {"value_ints": [{"dim": [w, axis]} for w in ws]}}


def _split(src: str, k: int, axis: int) -> dict:
    return {"id": "s", "op": "Split", "inputs": [src, "sizes"], "attrs": {"axis": axis},
            "outputs": k}


def merge_matmul(k: int) -> dict:
    ws = [f"w{i}" for i in range(1, k + 1)]
    return {
        "name": _name("merge-parallel-matmul", k), "family": "merge-parallel-matmul",
        "ordered_roots": True, "origin": "hand-written",
        "source": {"inputs": ["x", *ws],
                   "nodes": [{"id": _IDS[i], "op": "MatMul", "inputs": ["x", w]}
                             for i, w in enumerate(ws)],
                   "outputs": list(_IDS[:k])},
        "target": {"inputs": ["x", *ws],
                   "nodes": [{"id": "w", "op": "Concat", "inputs": ws, "attrs": {"axis": 1}},
                             {"id": "m", "op": "MatMul", "inputs": ["x", "w"]},
                             _sizes(ws, -1), _split("m", k, -1)],
                   "outputs": [f"s:{i}" for i in range(k)]},
        "preconditions": [*({"constant": w} for w in ws), *({"rank": [w, 2]} for w in ws),
                          {"dim_eq": [[w, 0] for w in ws]}],
        "doc": (f"{k} MatMul(x, W_i) -> Split(MatMul(x, Concat(W_1..W_{k}, axis=1)))" if k > 2
                else "MatMul(x, W1), MatMul(x, W2) -> Split(MatMul(x, Concat(W1, W2, axis=1)))"),
        "examples": [{"x": [2, 3], **{w: [3, 3 + i] for i, w in enumerate(ws, 1)}},
                     {"x": [2, 5, 3], **{w: [3, 1 if i == 1 else 3]
                                         for i, w in enumerate(ws, 1)}}],
    }


def _merge_with_bias(family: str, op: str, attrs: dict, k: int, rank: int,
                     same_dims: tuple[int, ...], doc: str, examples: list[dict]) -> dict:
    """k `op`(x, W_i, b_i) -> Split(`op`(x, Concat(W), Concat(b)), axis=1): Gemm with transB=1
    and Conv both put output channels on W's axis 0 and the output's axis 1."""
    ws = [f"w{i}" for i in range(1, k + 1)]
    bs = [f"b{i}" for i in range(1, k + 1)]
    inputs = ["x", *(v for pair in zip(ws, bs) for v in pair)]
    return {
        "name": _name(family, k), "family": family, "ordered_roots": True,
        "origin": "hand-written",
        "source": {"inputs": inputs,
                   "nodes": [{"id": _IDS[i], "op": op, "inputs": ["x", w, b],
                              "attrs": dict(attrs)}
                             for i, (w, b) in enumerate(zip(ws, bs))],
                   "outputs": list(_IDS[:k])},
        "target": {"inputs": inputs,
                   "nodes": [{"id": "w", "op": "Concat", "inputs": ws, "attrs": {"axis": 0}},
                             {"id": "c", "op": "Concat", "inputs": bs, "attrs": {"axis": 0}},
                             {"id": "g", "op": op, "inputs": ["x", "w", "c"],
                              "attrs": dict(attrs)},
                             _sizes(ws, 0), _split("g", k, 1)],
                   "outputs": [f"s:{i}" for i in range(k)]},
        "preconditions": [*({"constant": v} for v in ws + bs),
                          *({"rank": [w, rank]} for w in ws), *({"rank": [b, 1]} for b in bs),
                          *({"dim_eq": [[w, axis] for w in ws]} for axis in same_dims),
                          *({"dim_eq": [[b, 0], [w, 0]]} for w, b in zip(ws, bs))],
        "doc": doc,
        "examples": [{"x": ex["x"], **{w: ex["w"](i) for i, w in enumerate(ws, 1)},
                      **{b: ex["w"](i)[:1] for i, b in enumerate(bs, 1)},
                      **{a: v for a, v in ex.items() if a.startswith("$")}}
                     for ex in examples],
    }


def merge_gemm(k: int) -> dict:
    doc = (f"{k} Gemm(x, W_i, b_i, transB=1) -> Split(Gemm(x, Concat(W_1..W_{k}), "
           f"Concat(b_1..b_{k}), transB=1))" if k > 2 else
           "Gemm(x, W1, b1, transB=1), Gemm(x, W2, b2, transB=1) -> Split(Gemm(x, "
           "Concat(W1, W2), Concat(b1, b2), transB=1))")
    return _merge_with_bias("merge-parallel-gemm", "Gemm", {"transB": 1}, k, 2, (1,), doc,
                            [{"x": [2, 3], "w": lambda i: [3 + i, 3]},
                             {"x": [1, 6], "w": lambda i: [2, 6]}])


_CONV_ATTRS = {"dilations": "$d", "group": 1, "kernel_shape": "$k", "pads": "$p",
               "strides": "$s"}


def merge_conv(k: int) -> dict:
    doc = (f"{k} Conv(x, W_i, b_i) with one configuration -> Split(Conv(x, "
           f"Concat(W_1..W_{k}), Concat(b_1..b_{k})), axis=1)" if k > 2 else
           "Conv(x, W1, b1), Conv(x, W2, b2) with one configuration -> Split(Conv(x, "
           "Concat(W1, W2), Concat(b1, b2)), axis=1)")
    return _merge_with_bias(
        "merge-parallel-conv", "Conv", _CONV_ATTRS, k, 4, (1, 2, 3), doc,
        [{"$d": [1, 1], "$k": [1, 1], "$p": [0, 0, 0, 0], "$s": [1, 1], "x": [1, 3, 6, 6],
          "w": lambda i: [4 if i == 1 else 2, 3, 1, 1]},
         {"$d": [1, 1], "$k": [3, 3], "$p": [1, 1, 1, 1], "$s": [2, 2], "x": [2, 2, 7, 7],
          "w": lambda i: [3, 2, 3, 3]}])


def add_split(k: int) -> dict:
    def split(node_id: str, src: str, sizes: str) -> dict:
        return {"id": node_id, "op": "Split", "inputs": [src, sizes],
                "attrs": {"axis": "$axis"}, "outputs": k}

    sizes = {"op": "Constant", "inputs": [], "attrs": {"value_ints": "$sizes"}}
    return {
        "name": _name("add-split", k), "family": "add-split", "origin": "hand-written",
        "source": {"inputs": ["x", "y"],
                   "nodes": [{"id": "cx", **sizes}, split("sx", "x", "cx"),
                             {"id": "cy", **sizes}, split("sy", "y", "cy"),
                             *({"id": f"r{i}", "op": "Add", "inputs": [f"sx:{i}", f"sy:{i}"]}
                               for i in range(k))],
                   "outputs": [f"r{i}" for i in range(k)]},
        "target": {"inputs": ["x", "y"],
                   "nodes": [{"id": "t", "op": "Add", "inputs": ["x", "y"]},
                             {"id": "sizes", **sizes}, split("s", "t", "sizes")],
                   "outputs": [f"s:{i}" for i in range(k)]},
        "preconditions": [{"same_shape": ["x", "y"]}],
        "doc": f"{k} Add(Split(x)_i, Split(y)_i) with x, y of one shape, split alike -> "
               "Split(Add(x, y))",
        "examples": [{"x": [2, 3 * k], "y": [2, 3 * k], "$axis": -1, "$sizes": [3] * k},
                     {"x": [2 * k, 5], "y": [2 * k, 5], "$axis": 0,
                      "$sizes": [1] * (k - 1) + [k + 1]}],
    }


def relu_split(k: int) -> dict:
    sizes = {"op": "Constant", "inputs": [], "attrs": {"value_ints": "$sizes"}}
    split = {"op": "Split", "attrs": {"axis": "$axis"}, "outputs": k}
    return {
        "name": _name("relu-split", k), "family": "relu-split", "origin": "hand-written",
        "source": {"inputs": ["x"],
                   "nodes": [{"id": "cx", **sizes}, {"id": "sx", "inputs": ["x", "cx"], **split},
                             *({"id": f"r{i}", "op": "Relu", "inputs": [f"sx:{i}"]}
                               for i in range(k))],
                   "outputs": [f"r{i}" for i in range(k)]},
        "target": {"inputs": ["x"],
                   "nodes": [{"id": "t", "op": "Relu", "inputs": ["x"]},
                             {"id": "sizes", **sizes},
                             {"id": "s", "inputs": ["t", "sizes"], **split}],
                   "outputs": [f"s:{i}" for i in range(k)]},
        "doc": f"{k} Relu(Split(x)_i) -> Split(Relu(x)): one Relu, which onnxruntime fuses "
               "into the merged Conv or Gemm before it",
        "examples": [{"x": [2, 3 * k], "$axis": -1, "$sizes": [3] * k},
                     {"x": [1, 2 * k, 3, 3], "$axis": 1, "$sizes": [1] * (k - 1) + [k + 1]}],
    }


FAMILIES = {"merge-parallel-matmul": merge_matmul, "merge-parallel-gemm": merge_gemm,
            "merge-parallel-conv": merge_conv, "add-split": add_split, "relu-split": relu_split}


def family_rules(max_arity: int = MAX_ARITY) -> list[Rule]:
    """Every family's members for k = 2 .. max_arity (unverified), in file order."""
    return [Rule.from_json(build(k), where=f"family {name}, k={k}")
            for name, build in FAMILIES.items() for k in range(2, max_arity + 1)]


def _write(path: Path = MERGES_FILE) -> Path:
    """Rewrite the family file, keeping the verification record of rules that did not change."""
    old = {r.name: r for r in load_rules(path)} if path.exists() else {}
    rules = []
    for rule in family_rules():
        kept = old.get(rule.name)
        if kept is not None and _same(kept, rule):
            rule = rule.with_verification(**kept.status)
        rules.append(rule)
    return save_rules(path, rules, meta={
        "what": "hand-written rule families for k = 2 .. 8 branches, built by "
                "legato/core/rewrite/rules/families.py; each is verified like a generated rule "
                "before it ships"})


def _same(a: Rule, b: Rule) -> bool:
    strip = lambda r: {k: v for k, v in r.to_json().items() if k != "verification"}  # noqa: E731
    return strip(a) == strip(b)


def _main(argv: Any = None) -> None:
    print(f"wrote {_write()}")


if __name__ == "__main__":
    _main()
