"""Operator axioms (legato/core/rewrite/axioms.py): every shipped axiom holds on concrete shapes,
planted wrong ones are caught, and the Z3 side builds with a trigger per axiom."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from legato.core.rewrite import axioms as A
from legato.core.rewrite._terms import Signature, TermError, Undefined, evaluate, mk, var

a, b, c, t, x, w1, w2 = A.a, A.b, A.c, A.t, A.x, A.w1, A.w2
k, k1, k2, n0, n1, g, p, ca = A.k, A.k1, A.k2, A.n0, A.n1, A.g, A.p, A.ca


def test_every_axiom_validates_on_several_shapes():
    results = A.validate_axioms(seed=1, trials=3)
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    assert len(results) >= 40
    for ax, r in zip(A.AXIOMS, results):
        assert len(ax.examples) >= 2, ax.name
        assert r["cases"] == 3 * len(ax.examples)


def test_axiom_names_are_unique_kebab_case():
    names = [ax.name for ax in A.AXIOMS]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in names)
    for name in ("matmul-concat-cols", "split-concat-first", "transpose-compose",
                 "conv-concat-weights", "gemm-def", "add-comm", "matmul-assoc"):
        assert A.get_axiom(name).name == name


PLANTED = [
    A.axiom("matmul-comm", A.matmul(a, b), A.matmul(b, a),
            examples=[{"a": (3, 3), "b": (3, 3)}]),
    A.axiom("transpose-is-identity", A.transpose(p, t), t,
            examples=[{"p": (1, 0), "t": (3, 3)}]),
    A.axiom("relu-add", A.relu(A.add(a, b)), A.add(A.relu(a), A.relu(b)),
            examples=[{"a": (2, 3), "b": (2, 3)}]),
    # TASO's validator caught a grouped-conv merge: conv-concat-weights without group == 1
    A.axiom("grouped-conv-concat-weights", A.conv(ca, g, x, A.concat(k, w1, w2)),
            A.concat(1, A.conv(ca, g, x, w1), A.conv(ca, g, x, w2)), when=[A.eq(k, 0)],
            examples=[{"ca": {}, "g": 2, "k": 0, "x": (1, 4, 5, 5), "w1": (2, 2, 3, 3),
                       "w2": (2, 2, 3, 3)}]),
    # ... and a concat associativity across two axes
    A.axiom("concat-assoc-two-axes", A.concat(k1, A.concat(k2, a, b), c),
            A.concat(k1, a, A.concat(k2, b, c)),
            examples=[{"k1": 0, "k2": 1, "a": (2, 1), "b": (2, 2), "c": (1, 3)}]),
    A.axiom("split-concat-any-sizes", A.split0(k1, n0, n1, A.concat(k2, a, b)), a,
            when=[A.eq(k1, k2)],
            examples=[{"k1": 1, "k2": 1, "n0": 2, "n1": 4, "a": (2, 3), "b": (2, 3)}]),
    A.axiom("matmul-concat-wrong-axis", A.matmul(a, A.concat(k, w1, w2)),
            A.concat(A.rank(A.matmul(a, w1)) - 1, A.matmul(a, w1), A.matmul(a, w2)),
            examples=[{"a": (3, 3), "k": 0, "w1": (2, 3), "w2": (1, 3)}]),
]


@pytest.mark.parametrize("ax", PLANTED, ids=lambda ax: ax.name)
def test_planted_wrong_axioms_fail_validation(ax):
    r = A.validate_axiom(ax)
    assert not r["ok"]
    assert "example" in r["detail"]


def test_an_example_outside_the_hypotheses_is_a_failure_not_a_pass():
    ax = A.get_axiom("matmul-concat-cols")
    bad = A.Axiom(ax.name, ax.concl, ax.hyps, ax.trigger,
                  ({"a": (2, 3), "b1": (3, 4), "b2": (3, 5), "k": 0},))
    r = A.validate_axiom(bad)
    assert not r["ok"] and "violates hypothesis" in r["detail"]


def test_an_axiom_needs_examples():
    r = A.validate_axiom(A.axiom("relu-twice", A.relu(A.relu(a)), A.relu(a)))
    assert not r["ok"] and "no examples" in r["detail"]


def test_malformed_axioms_and_examples_raise_clear_errors():
    with pytest.raises(A.AxiomError, match="does not mention"):
        A.Axiom("loose", A.le(0, A.rank(a)), trigger=(A.rank(b),))
    with pytest.raises(A.AxiomError, match="does not bind 'b'"):
        A.validate_axiom(A.axiom("add-comm-2", A.add(a, b), A.add(b, a),
                                 examples=[{"a": (2,)}]))
    with pytest.raises(TermError, match="takes sorts"):
        A.matmul(a, k)
    with pytest.raises(TermError, match="unknown term operator"):
        mk("softmax", a)
    with pytest.raises(A.AxiomError, match="no axiom 'nope'; known: "):
        A.get_axiom("nope")


def test_terms_evaluate_through_the_operator_semantics():
    env = {"a": np.arange(6.0).reshape(2, 3), "p": (1, 0), "k": 0}
    y = evaluate(A.transpose(p, a), env)
    assert y.shape == (3, 2) and evaluate(A.dim(A.concat(k, a, a), k), env) == 4
    with pytest.raises(Undefined):
        evaluate(A.matmul(a, a), env)


def test_z3_formulas_have_one_trigger_each_and_are_not_contradictory():
    z3 = pytest.importorskip("z3")
    sig = Signature()
    solver = z3.Solver()
    solver.set("auto_config", False)
    solver.set("mbqi", False)
    solver.set("timeout", 5000)
    for ax in A.AXIOMS:
        f = ax.formula(sig)
        assert f.is_forall() and f.num_patterns() == 1, ax.name
        solver.add(f)
    # a few ground terms so that triggers fire: still no contradiction
    terms = [A.matmul(x, A.concat(1, w1, w2)), A.split0(0, 1, 2, A.relu(t)),
             A.transpose(mk("prev", A.rank(a)), A.add(a, b)), A.conv(ca, g, x, w1)]
    seen = z3.Function("seen", sig.sorts["T"], z3.BoolSort())
    solver.add(*(seen(sig.to_z3(e)) for e in terms),
               sig.to_z3(A.eq(A.rank(w1), 2)), sig.to_z3(A.eq(A.rank(x), 4)))
    assert solver.check() != z3.unsat


def test_z3_proves_an_instance_of_an_axiom():
    z3 = pytest.importorskip("z3")
    sig = Signature()
    s = z3.Solver()
    s.add(A.get_axiom("relu-concat").formula(sig), A.get_axiom("rank-nonneg").formula(sig))
    lhs, rhs = A.relu(A.concat(0, a, b)), A.concat(0, A.relu(a), A.relu(b))
    s.add(sig.to_z3(A.eq(A.rank(a), 2)), sig.to_z3(A.eq(A.rank(b), 2)))
    s.add(sig.to_z3(A.not_(A.eq(lhs, rhs))))
    assert s.check() == z3.unsat
    assert var("q", "Perm").sort == "Perm"


def _band_with_window(below, above):
    """A band term whose window is channels c - below(size) .. c + above(size)."""
    def band(channels, size, alpha, spatial_rank):
        c, i = np.arange(channels)[:, None], np.arange(channels)[None, :]
        inside = ((np.maximum(0, c - below(size)) <= i)
                  & (i <= np.minimum(channels - 1, c + above(size))))
        w = np.where(inside, float(np.float32(alpha)) / size, 0.0)
        return w.reshape((channels, channels) + (1,) * spatial_rank)
    return band


LRN_WINDOWS = {                       # ONNX: floor((size - 1) / 2) below, ceil((size - 1) / 2) above
    "onnx": (lambda n: (n - 1) // 2, lambda n: n // 2),
    "floor-and-ceil-swapped": (lambda n: n // 2, lambda n: (n - 1) // 2),
    "one-more-above": (lambda n: (n - 1) // 2, lambda n: n // 2 + 1),
    "one-fewer-above": (lambda n: (n - 1) // 2, lambda n: n // 2 - 1),
    "one-more-below": (lambda n: (n - 1) // 2 + 1, lambda n: n // 2),
    "one-fewer-below": (lambda n: (n - 1) // 2 - 1, lambda n: n // 2),
}


@pytest.mark.parametrize("window", sorted(LRN_WINDOWS))
def test_lrn_def_fails_validation_with_a_window_off_by_one(window, monkeypatch):
    """lrn-def planted with its band one channel off at either end (or mirrored, which only
    even sizes show) fails validation; the ONNX window passes."""
    from legato.core.rewrite import _terms

    spec = _terms.OPS["band"]
    monkeypatch.setitem(_terms.OPS, "band", dataclasses.replace(
        spec, f64=_band_with_window(*LRN_WINDOWS[window])))
    r = A.validate_axiom(A.get_axiom("lrn-def"))
    assert r["ok"] == (window == "onnx"), r
    if window != "onnx":
        assert "the sides differ" in r["detail"]


def test_lrn_def_examples_cover_what_a_window_can_get_wrong():
    ax = A.get_axiom("lrn-def")
    sizes = {ex["nn"] for ex in ax.examples}
    assert sizes & {2, 4} and sizes & {3, 5}                  # even and odd windows
    assert any(ex["x"][1] < ex["nn"] for ex in ax.examples)   # fewer channels than the window
    assert {len(ex["x"]) for ex in ax.examples} >= {3, 4, 5}
    assert all(ex["be"] == 0.75 and ex["bi"] > 0 for ex in ax.examples)  # defined on both sides
