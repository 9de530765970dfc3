"""scripts/patch_horovod.py: the build fixes apply exactly once, or stop with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "scripts" / "patch_horovod.py"

# The lines of Horovod 0.28.1 that the patch replaces, in their files.
ORIGINAL = {
    "CMakeLists.txt": "project(horovod CXX)\nset(CMAKE_CXX_STANDARD 14)\n"
                      'string(REGEX REPLACE  "-std=[^ ]+" "" CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS}")\n',
    "horovod/torch/CMakeLists.txt": 'if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n'
                                    "    set(CMAKE_CXX_STANDARD 14)\nendif()\n",
    "horovod/tensorflow/CMakeLists.txt":
        'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/mpi_ops.cc")\n'
        'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n',
}


def make_tree(root: Path) -> Path:
    for rel, text in ORIGINAL.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def patch(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PATCH), str(tree)], capture_output=True, text=True,
                          timeout=60)


def test_patch_applies_each_fix(tmp_path):
    tree = make_tree(tmp_path)
    proc = patch(tree)
    assert proc.returncode == 0, proc.stderr
    top = (tree / "CMakeLists.txt").read_text()
    assert "set(CMAKE_CXX_STANDARD 17)" in top and "STANDARD 14" not in top
    assert "set(CMAKE_CXX_STANDARD 17)" in (tree / "horovod/torch/CMakeLists.txt").read_text()
    tf = (tree / "horovod/tensorflow/CMakeLists.txt").read_text()
    assert "if(HAVE_CUDA OR HAVE_ROCM)\n    list(APPEND TF_SOURCES" in tf
    assert "mpi_ops.cc\")\n" in tf  # the CPU ops stay unconditional


def test_patch_refuses_a_tree_it_does_not_know(tmp_path):
    tree = make_tree(tmp_path)
    assert patch(tree).returncode == 0
    again = patch(tree)  # already patched: the original line is gone
    assert again.returncode == 1
    assert "expected the line" in again.stderr and "found it 0 times" in again.stderr


def test_patch_names_a_missing_file(tmp_path):
    proc = patch(tmp_path)
    assert proc.returncode == 1
    assert "CMakeLists.txt not found" in proc.stderr


@pytest.mark.slow
def test_patch_matches_the_real_source_package(tmp_path):
    sdist = ROOT / ".cache" / "horovod" / "horovod-0.28.1.tar.gz"
    if not sdist.exists():
        pytest.skip(f"{sdist} not downloaded (make setup fetches it)")
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(tmp_path)], check=True, timeout=120)
    proc = patch(tmp_path / "horovod-0.28.1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("patched") == 3
