"""Formal verification of rules with Z3 (legato/core/rewrite/prove.py): shipped and hand-made
rules are proved, wrong ones are not, and proofs take well under a few seconds."""

from __future__ import annotations

import pytest

from legato.core.rewrite import axioms as A
from legato.core.rewrite.pattern import Rule
from legato.core.rewrite.prove import prove_rule, rule_terms, verify_formal
from legato.core.rewrite.rules import all_rules
from legato.core.rewrite.verify import verify_numeric

pytest.importorskip("z3")

SHIPPED = {r.name: r for r in all_rules()}
PADS = {"pads": [1, 1, 1, 1]}


def node(id_: str, op: str, *inputs: str, outputs: int = 1, **attrs) -> dict:
    d = {"id": id_, "op": op, "inputs": list(inputs)}
    if attrs:
        d["attrs"] = attrs
    if outputs != 1:
        d["outputs"] = outputs
    return d


def sizes(id_: str, *dims: tuple[str, int]) -> dict:
    return node(id_, "Constant", value_ints=[{"dim": [v, a]} for v, a in dims])


def rule(name: str, inputs: list[str], src: list[dict], src_out: list[str], dst: list[dict],
         dst_out: list[str], pre: list[dict] = (), examples: list[dict] = ()) -> Rule:
    return Rule.from_json({
        "name": name, "source": {"inputs": inputs, "nodes": src, "outputs": src_out},
        "target": {"inputs": inputs, "nodes": dst, "outputs": dst_out},
        "preconditions": list(pre), "examples": list(examples)})


def merge_matmul(name: str, concat_inputs=("w1", "w2"), axis: int = 1,
                 split_dims=(("w1", -1), ("w2", -1))) -> Rule:
    return rule(name, ["x", "w1", "w2"],
                [node("a", "MatMul", "x", "w1"), node("b", "MatMul", "x", "w2")], ["a", "b"],
                [node("w", "Concat", *concat_inputs, axis=axis), node("m", "MatMul", "x", "w"),
                 sizes("n", *split_dims), node("s", "Split", "m", "n", axis=-1, outputs=2)],
                ["s:0", "s:1"],
                [{"rank": ["w1", 2]}, {"rank": ["w2", 2]}, {"dim_eq": [["w1", 0], ["w2", 0]]}],
                [{"x": [2, 3], "w1": [3, 4], "w2": [3, 5]}, {"x": [2, 3], "w1": [3, 4],
                                                            "w2": [3, 4]}])


def merge_conv(name: str, group: int = 1, bias: bool = False) -> Rule:
    inputs = ["x", "w1", "w2"] + (["b1", "b2"] if bias else [])
    g = {"group": group} if group != 1 else {}
    src = [node("a", "Conv", "x", "w1", *(["b1"] if bias else []), **PADS, **g),
           node("b", "Conv", "x", "w2", *(["b2"] if bias else []), **PADS, **g)]
    dst = [node("w", "Concat", "w1", "w2", axis=0)]
    dst += [node("c", "Concat", "b1", "b2", axis=0)] if bias else []
    dst += [node("m", "Conv", "x", "w", *(["c"] if bias else []), **PADS, **g),
            sizes("n", ("w1", 0), ("w2", 0)), node("s", "Split", "m", "n", axis=1, outputs=2)]
    c = 4 // group
    ex = {"x": [1, 4, 5, 5], "w1": [2, c, 3, 3], "w2": [4, c, 3, 3]}
    ex.update({"b1": [2], "b2": [4]} if bias else {})
    return rule(name, inputs, src, ["a", "b"], dst, ["s:0", "s:1"], examples=[ex])


def proved(r: Rule) -> dict:
    res = prove_rule(r)
    assert res["z3"] == "proved", res          # within Z3's 10 s limit (no wall-clock verdict:
    return res                                   # make test runs on a busy machine)


def not_proved(r: Rule) -> dict:
    res = prove_rule(r)
    assert res["z3"] in ("refuted", "unknown"), res
    assert res["seconds"] < 60, res            # the 10 s limit ends a failed proof: no hang
    return res


# ---- shipped rules -----------------------------------------------------------------------------

@pytest.mark.parametrize("r", list(SHIPPED.values()), ids=lambda r: r.name)
def test_shipped_rules_are_proved(r):
    res = proved(r)
    if r.family.startswith("merge-"):
        assert "split-concat-first" in res["detail"]
    assert r.status["z3"] == "proved", "the stored record disagrees; run legato rules verify"
    record = verify_formal(r)
    assert record["z3"] == "proved" and record["z3_seconds"] >= 0
    assert r.with_verification(**record).status["z3"] == "proved"


# ---- rules written here: proved --------------------------------------------------------------

GOOD = [
    rule("transpose-pair-2d", ["x"],
         [node("t", "Transpose", "x", perm=[1, 0]), node("u", "Transpose", "t", perm=[1, 0])],
         ["u"], [node("i", "Identity", "x")], ["i"], examples=[{"x": [2, 3]}]),
    rule("transpose-pair-3d", ["x"],
         [node("t", "Transpose", "x", perm=[0, 2, 1]),
          node("u", "Transpose", "t", perm=[1, 0, 2])],
         ["u"], [node("v", "Transpose", "x", perm=[2, 0, 1])], ["v"],
         examples=[{"x": [2, 3, 4]}]),
    rule("transpose-pair-default-perm", ["x"],
         [node("t", "Transpose", "x"), node("u", "Transpose", "t")], ["u"],
         [node("i", "Identity", "x")], ["i"], [{"rank": ["x", 3]}], [{"x": [2, 3, 4]}]),
    rule("matmul-reassociate", ["a", "b", "c"],
         [node("ab", "MatMul", "a", "b"), node("y", "MatMul", "ab", "c")], ["y"],
         [node("bc", "MatMul", "b", "c"), node("y", "MatMul", "a", "bc")], ["y"],
         [{"rank": ["b", 2]}], [{"a": [2, 3], "b": [3, 4], "c": [4, 5]},
                                {"a": [3], "b": [3, 4], "c": [2, 4, 5]}]),
    rule("factor-matmul", ["x", "w1", "w2"],
         [node("a", "MatMul", "x", "w1"), node("b", "MatMul", "x", "w2"),
          node("s", "Add", "a", "b")], ["s"],
         [node("w", "Add", "w1", "w2"), node("m", "MatMul", "x", "w")], ["m"],
         [{"same_shape": ["w1", "w2"]}], [{"x": [2, 3], "w1": [3, 4], "w2": [3, 4]}]),
    rule("transpose-of-matmul", ["a", "b"],
         [node("m", "MatMul", "a", "b"), node("t", "Transpose", "m", perm=[1, 0])], ["t"],
         [node("ta", "Transpose", "a", perm=[1, 0]), node("tb", "Transpose", "b", perm=[1, 0]),
          node("m", "MatMul", "tb", "ta")], ["m"],
         [{"rank": ["a", 2]}, {"rank": ["b", 2]}], [{"a": [2, 3], "b": [3, 4]}]),
    rule("relu-through-concat-split", ["a", "b"],
         [node("ra", "Relu", "a"), node("rb", "Relu", "b")], ["ra", "rb"],
         [node("c", "Concat", "a", "b", axis=1), node("r", "Relu", "c"),
          sizes("n", ("a", 1), ("b", 1)), node("s", "Split", "r", "n", axis=1, outputs=2)],
         ["s:0", "s:1"], examples=[{"a": [2, 3], "b": [2, 4]}]),
    rule("split-then-concat", ["t"],
         [node("n", "Constant", value_ints="$sizes"),
          node("s", "Split", "t", "n", axis=0, outputs=2),
          node("c", "Concat", "s:0", "s:1", axis=0)], ["c"],
         [node("i", "Identity", "t")], ["i"]),
    rule("merge-row-matmuls", ["x1", "x2", "w"],
         [node("a", "MatMul", "x1", "w"), node("b", "MatMul", "x2", "w")], ["a", "b"],
         [node("x", "Concat", "x1", "x2", axis=0), node("m", "MatMul", "x", "w"),
          sizes("n", ("x1", 0), ("x2", 0)), node("s", "Split", "m", "n", axis=0, outputs=2)],
         ["s:0", "s:1"], [{"rank": ["x1", 2]}, {"rank": ["x2", 2]}, {"rank": ["w", 2]}],
         [{"x1": [2, 3], "x2": [4, 3], "w": [3, 5]}]),
    rule("merge-three-matmuls", ["x", "w1", "w2", "w3"],
         [node(f"m{i}", "MatMul", "x", f"w{i}") for i in (1, 2, 3)], ["m1", "m2", "m3"],
         [node("w", "Concat", "w1", "w2", "w3", axis=-1), node("m", "MatMul", "x", "w"),
          sizes("n", ("w1", 1), ("w2", 1), ("w3", 1)),
          node("s", "Split", "m", "n", axis=-1, outputs=3)], ["s:0", "s:1", "s:2"],
         [{"rank": [f"w{i}", 2]} for i in (1, 2, 3)],
         [{"x": [2, 3], "w1": [3, 1], "w2": [3, 2], "w3": [3, 4]}]),
    merge_conv("merge-parallel-conv"),
    merge_conv("merge-parallel-conv-bias", bias=True),
    rule("conv-sum-of-weights", ["x", "w1", "w2"],
         [node("a", "Conv", "x", "w1", **PADS), node("b", "Conv", "x", "w2", **PADS),
          node("s", "Add", "a", "b")], ["s"],
         [node("w", "Add", "w1", "w2"), node("c", "Conv", "x", "w", **PADS)], ["c"],
         [{"same_shape": ["w1", "w2"]}],
         [{"x": [1, 3, 5, 5], "w1": [2, 3, 3, 3], "w2": [2, 3, 3, 3]}]),
    rule("gemm-to-matmul", ["a", "b"], [node("g", "Gemm", "a", "b", transB=1)], ["g"],
         [node("t", "Transpose", "b", perm=[1, 0]), node("m", "MatMul", "a", "t")], ["m"],
         examples=[{"a": [2, 3], "b": [4, 3]}]),
    rule("scalar-out-of-matmul", ["x", "s", "w"],
         [node("m", "Mul", "x", "s"), node("y", "MatMul", "m", "w")], ["y"],
         [node("y", "MatMul", "x", "w"), node("z", "Mul", "y", "s")], ["z"],
         [{"rank": ["s", 0]}], [{"x": [2, 3], "s": [], "w": [3, 4]}]),
    rule("relu-twice", ["x"], [node("r", "Relu", "x"), node("q", "Relu", "r")], ["q"],
         [node("r", "Relu", "x")], ["r"], examples=[{"x": [2, 3]}]),
    rule("sigmoid-of-transpose-pair", ["x"],
         [node("t", "Transpose", "x", perm=[1, 0]), node("u", "Transpose", "t", perm=[1, 0]),
          node("s", "Sigmoid", "u")], ["s"], [node("s", "Sigmoid", "x")], ["s"],
         examples=[{"x": [2, 3]}]),
]


@pytest.mark.parametrize("r", GOOD, ids=lambda r: r.name)
def test_good_rules_are_proved(r):
    proved(r)
    if r.examples:   # the two checks agree
        assert verify_numeric(r)["numeric"] == "passed"


# ---- wrong rules: never proved ---------------------------------------------------------------

BAD = [
    merge_matmul("concat-in-wrong-order", concat_inputs=("w2", "w1")),
    merge_matmul("concat-on-wrong-axis", axis=0),
    merge_matmul("split-sizes-swapped", split_dims=(("w2", -1), ("w1", -1))),
    merge_conv("merge-grouped-conv", group=2),
    rule("transpose-of-matmul-unswapped", ["a", "b"],
         [node("m", "MatMul", "a", "b"), node("t", "Transpose", "m", perm=[1, 0])], ["t"],
         [node("ta", "Transpose", "a", perm=[1, 0]), node("tb", "Transpose", "b", perm=[1, 0]),
          node("m", "MatMul", "ta", "tb")], ["m"],
         [{"rank": ["a", 2]}, {"rank": ["b", 2]}], [{"a": [3, 3], "b": [3, 3]}]),
    rule("matmul-reassociate-vector-middle", ["a", "b", "c"],
         [node("ab", "MatMul", "a", "b"), node("y", "MatMul", "ab", "c")], ["y"],
         [node("bc", "MatMul", "b", "c"), node("y", "MatMul", "a", "bc")], ["y"],
         examples=[{"a": [3, 3], "b": [3], "c": [3, 3]}]),
    rule("factor-matmul-broadcast", ["x", "w1", "w2"],
         [node("a", "MatMul", "x", "w1"), node("b", "MatMul", "x", "w2"),
          node("s", "Add", "a", "b")], ["s"],
         [node("w", "Add", "w1", "w2"), node("m", "MatMul", "x", "w")], ["m"],
         examples=[{"x": [3, 3], "w1": [3, 3], "w2": [3]}]),
    rule("matmul-commutes", ["a", "b"], [node("m", "MatMul", "a", "b")], ["m"],
         [node("m", "MatMul", "b", "a")], ["m"], examples=[{"a": [3, 3], "b": [3, 3]}]),
    rule("transpose-is-identity", ["x"], [node("t", "Transpose", "x", perm=[1, 0])], ["t"],
         [node("i", "Identity", "x")], ["i"], examples=[{"x": [3, 3]}]),
]


def test_a_wrong_merge_is_refuted_by_a_concrete_counter_model():
    res = prove_rule(BAD[0])
    assert res["z3"] == "refuted" and "counterexample" in res["detail"], res


@pytest.mark.parametrize("r", BAD, ids=lambda r: r.name)
def test_wrong_rules_are_not_proved(r):
    res = not_proved(r)
    assert res["detail"]
    if r.examples:   # and they are indeed wrong (or their target is ill-shaped)
        try:
            assert verify_numeric(r)["numeric"] == "failed"
        except (ValueError, TypeError):
            pass


def test_wrong_gemm_merge_split_axis_is_not_proved():
    gemm = SHIPPED["merge-parallel-gemm"]
    d = gemm.to_json()
    for n in d["target"]["nodes"]:
        if n["op"] == "Split":
            n["attrs"]["axis"] = 0
    d["name"] = "merge-parallel-gemm-split-rows"
    not_proved(Rule.from_json(d))


# ---- translation limits and safety -----------------------------------------------------------

def test_ops_without_axioms_give_unknown_with_the_op_named():
    r = rule("sigmoid-commutes-with-transpose", ["x"],
             [node("t", "Transpose", "x", perm=[1, 0]), node("s", "Sigmoid", "t")], ["s"],
             [node("s", "Sigmoid", "x"), node("t", "Transpose", "s", perm=[1, 0])], ["t"])
    res = not_proved(r)
    assert "Sigmoid" in res["detail"]


def test_unread_attributes_make_an_opaque_op_not_a_crash():
    r = rule("odd-concat", ["a", "b"], [node("c", "Concat", "a", "b", axis=0, extra=1)], ["c"],
             [node("c", "Concat", "b", "a", axis=0, extra=1)], ["c"])
    res = not_proved(r)
    assert "Concat" in res["detail"]


def test_symbolic_perm_is_not_proved_identity():
    r = rule("symbolic-transpose-pair", ["x"],
             [node("t", "Transpose", "x", perm="$p"), node("u", "Transpose", "t", perm="$p")],
             ["u"], [node("i", "Identity", "x")], ["i"])
    not_proved(r)


def test_contradictory_preconditions_do_not_give_a_vacuous_proof():
    bad = BAD[-1]
    d = bad.to_json()
    d["preconditions"] = [{"rank": ["x", 2]}, {"rank": ["x", 3]}]
    res = prove_rule(Rule.from_json(d))
    assert res["z3"] == "unknown" and "contradict" in res["detail"]


def test_a_wrong_axiom_would_prove_a_wrong_rule_and_validation_rejects_it():
    comm = A.axiom("matmul-comm", A.matmul(A.a, A.b), A.matmul(A.b, A.a),
                   examples=[{"a": (3, 3), "b": (3, 3)}])
    wrong = next(r for r in BAD if r.name == "matmul-commutes")
    assert prove_rule(wrong, axioms=A.AXIOMS + (comm,))["z3"] == "proved"
    assert not A.validate_axiom(comm)["ok"]


def test_rule_terms_translate_negative_axes_and_dims():
    src, dst, facts, notes, flags = rule_terms(SHIPPED["merge-parallel-matmul"])
    assert [repr(s) for s in src] == ["matmul(x, w1)", "matmul(x, w2)"]
    assert "split0((rank(matmul(x, concat(1, w1, w2))) + -1), dim(w1, (rank(w1) + -1))" \
        in repr(dst[0])
    assert not notes


def test_bad_timeout_is_a_config_error():
    from legato.core.errors import ConfigError
    with pytest.raises(ConfigError, match="timeout_s"):
        prove_rule(GOOD[0], timeout_s=0)
