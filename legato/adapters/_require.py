"""The import guard every adapter's __init__.py uses."""

from __future__ import annotations

import importlib
from types import ModuleType

_HINTS = {
    "mxnet": "; mxnet 1.9.1 needs numpy<1.24, so legato keeps it in .venv-mxnet (make setup)",
}


def require_framework(name: str) -> ModuleType:
    """Import framework `name`, or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"legato.adapters.{name} needs {name}, which is not importable here ({err}); "
            f"install it with `pip install 'legato[{name}]'`{_HINTS.get(name, '')}") from err
