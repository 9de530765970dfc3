"""Coding groups (legato/core/parity/group.py): forming groups across users with a timeout and
padding, decoding once any k of k + 1 outputs are in, and naming work that became useless."""

from __future__ import annotations

import numpy as np
import pytest

from legato.core.errors import ConfigError
from legato.core.parity import AdditionEncoder
from legato.core.parity.group import PARITY, GroupFormer


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


A = np.random.default_rng(0).normal(size=(5, 6))


def f(x):                                   # a linear model: the addition code is exact
    return A @ np.asarray(x).reshape(-1)


def test_k_queries_close_a_group_and_the_missing_one_is_rebuilt_exactly():
    former = GroupFormer(AdditionEncoder(3), timeout_s=0.01, clock=Clock())
    qs = [np.random.default_rng(i).normal(size=(2, 3)) for i in range(3)]
    assert former.add(qs[0], "u0") is None and former.add(qs[1], "u1") is None
    group = former.add(qs[2], "u2")
    assert group is not None and len(former) == 0 and group.tags == ["u0", "u1", "u2"]
    group.answer(0, f(qs[0]))
    group.answer(2, f(qs[2]))
    assert group.decodable() is None                        # the parity output is not in yet
    group.answer_parity(f(group.parity_query))
    assert group.decodable() == 1 and not group.done()
    i, rebuilt = group.decode()
    assert i == 1 and group.done()
    np.testing.assert_allclose(rebuilt, f(qs[1]), atol=1e-10)
    assert group.useless() == [1]                          # the straggler's work can go
    group.answer(1, f(qs[1]))                               # a late answer is still recorded
    assert group.useless() == [] and group.decodable() is None


def test_when_every_original_arrives_the_parity_query_is_useless():
    group = GroupFormer(AdditionEncoder(2), timeout_s=1.0, clock=Clock())
    g = None
    for i in range(2):
        g = group.add(np.full(6, float(i)), i)
    g.answer(0, f(np.zeros(6)))
    assert g.useless() == []
    g.answer(1, f(np.ones(6)))
    assert g.useless() == [PARITY] and g.done()
    with pytest.raises(ConfigError, match="cannot decode"):
        g.decode()


def test_a_partial_group_closes_at_the_timeout_padded_with_zero_queries():
    clock = Clock()
    former = GroupFormer(AdditionEncoder(4), timeout_s=0.05, clock=clock,
                         pad_output=f(np.zeros(6)))
    q = np.random.default_rng(1).normal(size=6)
    former.add(q, "only")
    assert former.poll() is None and former.deadline() == pytest.approx(0.05)
    clock.t = 0.05
    group = former.poll()
    assert group is not None and group.tags == ["only"] and group.real_positions() == [0]
    np.testing.assert_allclose(group.parity_query, q)
    group.answer_parity(f(group.parity_query))
    assert group.decodable() == 0                           # padding counts as answered
    np.testing.assert_allclose(group.decode()[1], f(q), atol=1e-10)
    assert former.deadline() is None


def test_bad_uses_name_the_problem():
    former = GroupFormer(AdditionEncoder(2), timeout_s=0.0, clock=Clock())
    former.add(np.zeros(6), "a")
    with pytest.raises(ConfigError, match="pad_output"):
        former.poll()
    assert len(former) == 1                                 # the waiting query is kept
    with pytest.raises(ConfigError, match="timeout_s"):
        GroupFormer(AdditionEncoder(2), timeout_s=-1)
    g = GroupFormer(AdditionEncoder(2), timeout_s=1, clock=Clock(), pad_output=np.zeros(5))
    g.add(np.zeros(6), "a")
    group = g.add(np.zeros(6), "b")
    with pytest.raises(ConfigError, match="no real query at position 5"):
        group.answer(5, np.zeros(5))
