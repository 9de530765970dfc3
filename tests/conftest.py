"""Test tiers are markers (see pyproject.toml). A marked test whose framework is absent skips
with the reason printed (-ra); `make test` runs the mxnet tier inside .venv-mxnet. The
`parity_checks` fixture holds checks the Keras and gluon parity trainers' tests share (it lives
here: a conftest.py in tests/adapters would put that folder on sys.path, where its mxnet/ and
tensorflow/ folders shadow the real packages)."""

from __future__ import annotations

import importlib.util
import os
import types

import numpy as np
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


# -- checks the parity trainers' tests share across frameworks (Keras, gluon) -------------
def _exported_onnx_matches(path, outputs_of, model, shape) -> None:
    """The file has one input `x` with a dynamic `batch` dim and one output `y`, and gives the
    framework's outputs at batch 1 and 33 in onnxruntime."""
    onnx = pytest.importorskip("onnx", reason="onnx is not installed here (make setup)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here")
    proto = onnx.load(str(path))
    assert [v.name for v in proto.graph.input] == ["x"]
    assert [v.name for v in proto.graph.output] == ["y"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 33):
        x = rng.random((batch, *shape), dtype=np.float32)
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], outputs_of(model, x),
                                   rtol=1e-4, atol=1e-5)


def _parity_training_is_seeded_and_time_limited(train_parity, outputs_of) -> None:
    from legato.core.parity import AdditionEncoder

    rng = np.random.default_rng(0)
    x = rng.random((50, 1, 4, 4), dtype=np.float32)
    outs = rng.standard_normal((50, 3)).astype(np.float32)
    enc = AdditionEncoder(2)
    first, info = train_parity(outs, x, enc, 3, steps=20, batch=8, seed=5)
    again, _ = train_parity(outs, x, enc, 3, steps=20, batch=8, seed=5)
    assert info["steps"] == 20 and info["stopped"] == "steps" and info["batch_groups"] == 8
    assert np.isfinite(info["final_loss"])
    np.testing.assert_allclose(outputs_of(first, x), outputs_of(again, x), rtol=1e-5, atol=1e-6)
    _, info = train_parity(outs, x, enc, 3, steps=1000, batch=8, time_limit_s=0.0)
    assert (info["steps"], info["stopped"]) == (1, "time-limit")


@pytest.fixture
def parity_checks():
    return types.SimpleNamespace(exported_onnx_matches=_exported_onnx_matches,
                                 seeded_and_time_limited=_parity_training_is_seeded_and_time_limited)
