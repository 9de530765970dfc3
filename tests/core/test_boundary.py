"""legato.core (and the CLI layer) never import torch, tensorflow, mxnet or horovod."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import legato.core

FORBIDDEN = ("torch", "tensorflow", "mxnet", "horovod", "keras", "jax")
CORE = pathlib.Path(legato.core.__file__).parent

BLOCK_AND_IMPORT = r"""
import importlib, pkgutil, sys
FORBIDDEN = %r
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"legato.core imported {name}")
sys.meta_path.insert(0, Block())
import legato.core
names = [m.name for m in pkgutil.walk_packages(legato.core.__path__, "legato.core.")]
# the command-line layer and launchers are framework-free too: they probe in subprocesses
names += ["legato", "legato.cli", "legato.launch", "legato.doctor", "legato.demo"]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
assert not loaded, loaded
print(len(names), "modules")
"""


def test_core_imports_with_frameworks_blocked():
    proc = subprocess.run([sys.executable, "-c", BLOCK_AND_IMPORT % (FORBIDDEN,)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[0]) >= 3


def test_core_sources_name_no_framework():
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(CORE)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
