"""Missing optional dependencies: one line naming the extra (legato._extras, the CLI's handler).
The whole path, in a virtualenv that really lacks them, is in tests/test_install.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from legato import _extras, cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_extra_named_exists_in_the_package_metadata():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for module, (dist, extra) in _extras.EXTRAS.items():
        assert extra in extras, (module, extra)
        # the extra (or one it includes) lists the distribution named in the message
        listed = " ".join(extras[extra])
        included = [e for spec in extras[extra] if spec.startswith("legato[")
                    for e in spec[len("legato["):-1].split(",")]
        listed += " " + " ".join(" ".join(extras[e]) for e in included)
        if dist != "ml-dtypes":  # onnx's own dependency, named for the module it provides
            assert dist in listed, (module, dist, extra, listed)


def test_require_names_the_extra_and_keeps_import_errors_of_broken_packages(monkeypatch):
    monkeypatch.setitem(_extras.EXTRAS, "legato_no_such_module", ("nosuch-dist", "serve"))
    with pytest.raises(_extras.MissingDependency) as err:
        _extras.require("json", "legato_no_such_module", what="the thing")
    assert str(err.value) == ("the thing needs nosuch-dist, which is not installed here: "
                              "pip install 'legato[serve]'")
    assert isinstance(err.value, ModuleNotFoundError)  # `except ImportError` still catches it
    import json

    assert _extras.require("json", what="x") is json


def test_missing_message_only_for_optional_dependencies():
    assert _extras.missing_message(ModuleNotFoundError("no", name="aiohttp"), "legato serve") \
        == "legato serve needs aiohttp, which is not installed here: pip install 'legato[serve]'"
    assert _extras.missing_message(ModuleNotFoundError("no", name="hdrh.histogram"), "x") \
        .endswith("pip install 'legato[serve]'")
    assert _extras.missing_message(ModuleNotFoundError("no", name="yaml"), "x") is None
    assert "legato[tensorflow-cpu]" in _extras.missing_message(
        ModuleNotFoundError("no", name="tensorflow"), "x")


def test_the_cli_turns_a_missing_dependency_into_one_line_and_exit_2(monkeypatch, capsys):
    def needs_sklearn(_args):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(cli, "_cmd_doctor", needs_sklearn)
    assert cli.main(["doctor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["legato doctor: error: legato doctor needs scikit-learn, which is not "
                   "installed here: pip install 'legato[parity]'"]


def test_the_cli_does_not_hide_other_import_errors(monkeypatch):
    def broken(_args):
        raise ModuleNotFoundError("No module named 'legato.nothing'", name="legato.nothing")

    monkeypatch.setattr(cli, "_cmd_doctor", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["doctor"])
