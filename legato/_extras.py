"""Which pip extra installs each optional dependency, and the one-line error when one is missing.

legato itself needs only numpy. Everything else comes with an extra (pyproject.toml), and a
command or import that needs a missing package says which extra to install instead of ending
in a bare ModuleNotFoundError:

    legato rewrite needs onnx, which is not installed here: pip install 'legato[onnx]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingDependency", "install_hint", "missing_message", "require"]

# top-level module -> (distribution to name, extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "torch"),
    "tensorflow": ("tensorflow", "tensorflow"),
    "keras": ("tensorflow", "tensorflow"),
    "tf2onnx": ("tf2onnx", "tensorflow"),
    "mxnet": ("mxnet", "mxnet"),
    "horovod": ("horovod", "horovod"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnx_ir": ("onnx-ir", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "ml_dtypes": ("ml-dtypes", "onnx"),
    "z3": ("z3-solver", "rewrite"),
    "tqdm": ("tqdm", "rewrite"),
    "optuna": ("optuna", "tune"),
    "scipy": ("scipy", "tune"),
    "aiohttp": ("aiohttp", "serve"),
    "hdrh": ("hdrhistogram", "serve"),
    "sklearn": ("scikit-learn", "parity"),
    "mlxtend": ("mlxtend", "parity"),
    "matplotlib": ("matplotlib", "plot"),
}

_HINTS = {
    "tensorflow": " (or 'legato[tensorflow-cpu]' where tensorflow-cpu is the TensorFlow you use)",
    "mxnet": " (mxnet 1.9.1 needs numpy<1.24: give it a virtualenv of its own, as `make setup` "
             "does with .venv-mxnet)",
    "horovod": " (Horovod builds from source against the installed frameworks; see "
               "docs/development.md for the build fix current torch and TensorFlow need)",
}


def install_hint(module: str) -> str:
    """How to install the optional dependency that provides top-level `module`."""
    extra = EXTRAS[module][1]
    return f"pip install 'legato[{extra}]'{_HINTS.get(extra, '')}"


def _needs(what: str, module: str) -> str:
    return f"{what} needs {EXTRAS[module][0]}, which is not installed here: {install_hint(module)}"


class MissingDependency(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing_message(err: ImportError, what: str) -> str | None:
    """The one line for `err` (raised while `what` ran or was imported), or None when the
    missing module is not one of legato's optional dependencies."""
    if isinstance(err, MissingDependency) or (
            not isinstance(err, ModuleNotFoundError) and "pip install 'legato[" in str(err)):
        return str(err)   # require()'s own message
    name = (getattr(err, "name", None) or "").split(".")[0]
    return _needs(what, name) if name in EXTRAS else None


def require(*modules: str, what: str) -> ModuleType:
    """Import each of `modules` (top-level names in EXTRAS) and return the first, or raise
    MissingDependency naming the extra that installs the missing one."""
    first = None
    for module in modules:
        try:
            imported = importlib.import_module(module)
        except ImportError as err:
            top = module.split(".")[0]
            if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == top:
                raise MissingDependency(_needs(what, top), name=module) from None
            # installed but broken (a missing library, a wrong numpy): its own error says why
            raise ImportError(f"{what} needs {EXTRAS[top][0]}, which is installed but fails to "
                              f"import ({type(err).__name__}: {err}); reinstall it with "
                              f"{install_hint(top)}", name=module) from err
        first = imported if first is None else first
    return first
