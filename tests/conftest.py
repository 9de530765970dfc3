"""Test tiers are markers (see pyproject.toml). A marked test whose framework is absent skips
with the reason printed (-ra); `make test` runs the mxnet tier inside .venv-mxnet."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _has(module: str) -> bool:
    """Installed, not merely a test folder of that name (tests/adapters/mxnet is a namespace
    package on sys.path while pytest collects tests/adapters)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def _gloo() -> str | None:
    if not _has("torch"):
        return "torch is not installed in this environment (make setup installs it in .venv)"
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no torch.distributed gloo backend"
    return None


def _cuda() -> str | None:
    if not _has("torch"):
        return "torch is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA device here"


_REQUIREMENTS = {
    "tensorflow": lambda: None if _has("tensorflow") else
    "tensorflow is not installed in this environment (make setup puts it in .venv)",
    "mxnet": lambda: None if _has("mxnet") else
    "mxnet is not importable here; it lives in .venv-mxnet (make test runs these tests there)",
    "horovod": lambda: None if _has("horovod") else
    "Horovod is not built in this environment; run `make setup` (scripts/build_horovod.sh)",
    "distributed": _gloo,
    "gpu": _cuda,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cache: dict[str, str | None] = {}
    for item in items:
        for marker, check in _REQUIREMENTS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in cache:
                cache[marker] = check()
            if cache[marker]:
                item.add_marker(pytest.mark.skip(reason=f"[{marker}] {cache[marker]}"))
