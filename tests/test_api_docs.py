"""The API reference builds from the docstrings with pdoc (scripts/build_api_docs.py, `make
api-docs`), one page per public module, as CI builds it (issue 18, item 7)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_api_docs  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("pdoc") is None,
                    reason="pdoc is not installed here (requirements/main.txt has it)")
def test_every_public_module_gets_a_page(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_api_docs.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=280,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "Error" not in proc.stderr, proc.stderr[-3000:]
    modules = build_api_docs.public_modules()
    assert len(modules) > 50
    for name in modules:
        page = tmp_path.joinpath(*name.split(".")).with_suffix(".html")
        assert page.is_file(), name
    opt = (tmp_path / "legato" / "adapters" / "torch" / "optimizer.html").read_text()
    assert "ScheduledOptimizer" in opt and "synchronize" in opt


def test_the_mxnet_adapter_is_documented_in_its_own_environment():
    assert all(m.startswith("legato.adapters.mxnet") for m in
               build_api_docs.public_modules(mxnet=True))
    assert not any(m.startswith("legato.adapters.mxnet") for m in
                   build_api_docs.public_modules())
