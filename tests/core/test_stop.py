"""The stop-reason vocabulary the four searches share: values, printing, JSON, old values."""

from __future__ import annotations

import json

import pytest

from legato.core import StopReason


def test_members_are_their_kebab_case_strings():
    assert [m.value for m in StopReason] == ["exhausted", "converged", "budget", "time-limit"]
    assert StopReason.TIME_LIMIT == "time-limit" and StopReason("budget") is StopReason.BUDGET
    assert str(StopReason.TIME_LIMIT) == "time-limit"
    assert f"stopped: {StopReason.BUDGET}" == "stopped: budget"
    assert f"{StopReason.EXHAUSTED:>10}" == " exhausted"
    assert json.dumps({"stop_reason": StopReason.CONVERGED}) == '{"stop_reason": "converged"}'


def test_every_member_documents_itself_and_says_if_the_search_was_complete():
    assert all(m.__doc__ and m.__doc__ != StopReason.__doc__ for m in StopReason)
    assert {m for m in StopReason if m.complete} == {StopReason.EXHAUSTED,
                                                     StopReason.CONVERGED}


def test_old_values_read_back_and_unknown_ones_name_the_known():
    assert StopReason("done") is StopReason.EXHAUSTED      # rule generation before issue 15
    with pytest.raises(ValueError, match=r"'sideways' is not a stop reason; known: "
                                         r"\['exhausted', 'converged', 'budget', 'time-limit'\]"):
        StopReason("sideways")
