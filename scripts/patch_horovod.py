"""Apply legato's build fixes to a fresh Horovod 0.28.1 source tree.

Usage: python scripts/patch_horovod.py SOURCE_DIR

Fixes (each must apply exactly once, or the script exits 1 naming the file):
  1. CMakeLists.txt sets CMAKE_CXX_STANDARD 14; torch 2.13 headers need C++17. CXXFLAGS cannot
     help because the same file strips every -std= flag, so the standard itself is raised.
  2. horovod/torch/CMakeLists.txt lowers the standard back to 14 for torch >= 1.5: raised to 17.
  3. horovod/tensorflow/CMakeLists.txt always compiles xla_mpi_ops.cc, which includes XLA headers
     the tensorflow-cpu wheel does not ship and only serves GPU builds: compiled only when the
     build has CUDA or ROCm.
"""

import pathlib
import sys

PATCHES = [
    (
        "CMakeLists.txt",
        "set(CMAKE_CXX_STANDARD 14)",
        "set(CMAKE_CXX_STANDARD 17)  # legato: torch >= 2.x needs C++17",
    ),
    (
        "horovod/torch/CMakeLists.txt",
        "    set(CMAKE_CXX_STANDARD 14)",
        "    set(CMAKE_CXX_STANDARD 17)  # legato: torch >= 2.x needs C++17",
    ),
    (
        "horovod/tensorflow/CMakeLists.txt",
        'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")',
        "# legato: XLA ops need headers absent from the CPU wheel; they only serve GPU builds\n"
        "if(HAVE_CUDA OR HAVE_ROCM)\n"
        '    list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n'
        "endif()",
    ),
]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = pathlib.Path(argv[1])
    for rel, old, new in PATCHES:
        path = root / rel
        if not path.is_file():
            print(f"patch_horovod: {path} not found; is {root} a Horovod 0.28.1 source tree?",
                  file=sys.stderr)
            return 1
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            print(f"patch_horovod: expected the line {old!r} once in {path}, found it {count} "
                  "times; this fix was written for Horovod 0.28.1 only", file=sys.stderr)
            return 1
        path.write_text(text.replace(old, new))
        print(f"patch_horovod: patched {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
