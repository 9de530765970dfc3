"""LEGATO_* variables: parsing, precedence, and errors that name the variable."""

from __future__ import annotations

import re

import pytest

from legato.core.errors import ConfigError
from legato.core.scheduler.env import DEFAULTS, parse_bytes, resolve_settings, sizes_for


@pytest.mark.parametrize("text, value", [("4194304", 4194304), ("4MiB", 4 << 20), ("4M", 4 << 20),
                                         ("64KiB", 65536), ("64k", 65536), ("1.5MB", 1_500_000),
                                         ("2GiB", 2 << 30), (" 512 ", 512)])
def test_sizes_parse(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-4", "4 MiBs", "1.5", ""])
def test_bad_sizes_do_not_parse(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_an_argument_wins_over_its_variable_which_wins_over_the_default():
    env = {"LEGATO_POLICY": "priority", "LEGATO_CREDIT_BYTES": "1MiB", "LEGATO_TUNE": "0",
           "LEGATO_TIMEOUT_S": "30"}
    out, used = resolve_settings({"policy": "fifo", "credit_bytes": None}, DEFAULTS, env)
    assert out["policy"] == "fifo" and out["credit_bytes"] == 1 << 20
    assert out["tune"] is False and out["timeout_s"] == 30.0
    assert out["backward_passes_per_step"] == 1 and out["timeline"] is None
    assert "LEGATO_CREDIT_BYTES=1MiB" in used and not any("POLICY" in u for u in used)


def test_tune_takes_a_json_object():
    out, _ = resolve_settings({}, DEFAULTS, {"LEGATO_TUNE": '{"trials": 7}'})
    assert out["tune"] == {"trials": 7}


@pytest.mark.parametrize("name, text, hint", [
    ("LEGATO_CREDIT_BYTES", "lots", "bytes"), ("LEGATO_TUNE", "[1]", "JSON object"),
    ("LEGATO_TIMEOUT_S", "-1", "seconds"), ("LEGATO_BACKWARD_PASSES_PER_STEP", "0", "whole")])
def test_a_bad_value_names_its_variable(name, text, hint):
    with pytest.raises(ConfigError, match=f"{name}={re.escape(repr(text))} is invalid; give "
                                          f".*{hint}"):
        resolve_settings({}, DEFAULTS, {name: text})


def test_sizes_a_policy_does_not_take_are_dropped_only_when_they_came_from_variables():
    settings = dict(DEFAULTS, partition_bytes=1 << 20, credit_bytes=4 << 20)
    assert sizes_for("plain", settings) == (None, None, None)
    assert sizes_for("priority", settings) == (None, 4 << 20, None)
    assert sizes_for("plain", settings, {"partition_bytes": 1 << 20}) == (1 << 20, None, None)


def test_an_adapter_without_a_setting_warns_about_its_variable(caplog):
    from legato.core.scheduler.env import adapter_settings

    env = {"LEGATO_POLICY": "priority", "LEGATO_TUNE": "1",
           "LEGATO_PARTITION_BYTES": "1MiB"}
    with caplog.at_level("WARNING"):
        settings, used = adapter_settings(
            "MXNet", policy=None, partition_bytes=None, credit_bytes=None,
            merge_bytes=None, timeout_s=None, environ=env)
    assert settings["policy"] == "priority"
    assert settings["partition_bytes"] is None  # priority has no partitions
    assert settings["credit_bytes"] is None and settings["merge_bytes"] is None
    assert settings["timeout_s"] == 300.0 and "LEGATO_POLICY=priority" in used
    assert "LEGATO_TUNE is set, but the MXNet adapter has no tune" in caplog.text


def test_an_adapter_reads_the_settings_it_names_and_an_argument_wins():
    from legato.core.scheduler.env import adapter_settings

    env = {"LEGATO_COMPRESSION": "bf16", "LEGATO_BACKWARD_PASSES_PER_STEP": "4"}
    settings, used = adapter_settings("TensorFlow", compression=None,
                                      backward_passes_per_step=2, environ=env)
    assert settings == {"compression": "bf16", "backward_passes_per_step": 2}
    assert used == ["LEGATO_COMPRESSION=bf16"]
    with pytest.raises(TypeError, match="unknown settings"):
        adapter_settings("TensorFlow", wire=None, environ=env)
