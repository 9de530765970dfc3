"""Build legato and its native extension legato._native (C++17, pybind11).

`pip install -e .` compiles native/ into legato/_native*.so next to the Python sources.
Metadata lives in pyproject.toml.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CXX_FLAGS = ["-O3", "-Wall", "-Wextra", "-fvisibility=hidden"]

ext = Pybind11Extension(
    "legato._native",
    sources=["native/priority_queue.cc", "native/nccl.cc", "native/bindings.cc"],
    include_dirs=["native"],
    cxx_std=17,
    extra_compile_args=CXX_FLAGS,
    define_macros=[("LEGATO_BUILD_FLAGS", '"' + " ".join(["-std=c++17", *CXX_FLAGS]) + '"'),
                   ("NDEBUG", "1")],
    # -ldl: NCCL and the CUDA runtime are dlopened on first use (native/nccl.h)
    extra_link_args=["-pthread", "-ldl"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
