"""Each adapter imports its framework, or fails with an ImportError naming the extra."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

CASES = ["torch", "tensorflow", "mxnet"]


@pytest.mark.parametrize("framework", CASES)
def test_adapter_import_or_install_hint(framework):
    # A fresh interpreter, so that one framework's import does not leak into the others.
    code = (f"import legato.adapters.{framework} as a, sys; "
            f"assert '{framework}' in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    spec = importlib.util.find_spec(framework)
    # a test folder of the same name (tests/adapters/mxnet) is a namespace package, not mxnet
    if spec is not None and spec.origin is not None:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("ok")
    else:
        assert proc.returncode != 0
        assert f"pip install 'legato[{framework}]'" in proc.stderr
        if framework == "mxnet":
            assert ".venv-mxnet" in proc.stderr


@pytest.mark.mxnet
def test_mxnet_adapter_imports_in_its_venv():
    importlib.import_module("legato.adapters.mxnet")
