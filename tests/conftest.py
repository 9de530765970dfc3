"""Test tiers are markers (see pyproject.toml). A marked test whose framework is absent skips
with the reason printed (-ra); `make test` runs the mxnet tier inside .venv-mxnet. The
`parity_checks` and `planner_check` fixtures hold checks the Keras and gluon tests share (they
live here: a conftest.py in tests/adapters would put that folder on sys.path, where its mxnet/ and
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


def _short_run_ok(out, ds, report, framework, untrained_outputs) -> None:
    """A short `train_parity_pair(..., k=2, "addition", out, parity_steps=1500,
    test_groups=1000)`: the report's fields and accuracies, reproduced through the ONNX files,
    and far above those of an untrained parity model (`untrained_outputs(queries)`)."""
    import json

    import onnxruntime as ort

    from legato.core.parity import AdditionEncoder, evaluate, sample_groups

    assert report == json.loads((out / "report.json").read_text())
    assert report["framework"] == framework and report["model"] == "BaseMLP 200-100-10"
    assert (report["k"], report["encoder"]) == (2, "addition")
    assert report["reconstructions"] == 2 * report["test_groups"] == 2000
    assert report["parity_training"]["steps"] == 1500
    assert report["parity_training"]["stopped"] == "steps"
    assert report["base_accuracy"] > 0.9
    assert report["reconstruction_accuracy"] > 0.8 and report["degraded_accuracy"] > 0.8
    # the cheap backup (a linear classifier, trained as briefly) beats a default answer
    assert report["backup_accuracy"] > report["default_answer_accuracy"] + 0.2
    assert (out / "backup.onnx").is_file()

    def run(name, x):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    groups = sample_groups(len(ds.x_test), 2, report["test_groups"], np.random.default_rng(1))
    queries = AdditionEncoder(2).encode_batch(ds.x_test[groups])
    outs = run("base.onnx", ds.x_test)
    again = evaluate(outs, ds.y_test, groups, run("parity.onnx", queries))
    assert abs(again["degraded_accuracy"] - report["degraded_accuracy"]) < 0.01
    untrained = evaluate(outs, ds.y_test, groups, untrained_outputs(queries))
    assert report["reconstruction_accuracy"] > untrained["reconstruction_accuracy"] + 0.4


@pytest.fixture
def parity_checks():
    return types.SimpleNamespace(exported_onnx_matches=_exported_onnx_matches,
                                 seeded_and_time_limited=_parity_training_is_seeded_and_time_limited,
                                 short_run_ok=_short_run_ok)


def _planner_runs_on(prof, tmp_path) -> None:
    """The planner runs on a profiler's output: every layer in exactly one stage, no edge from
    a later stage to an earlier one, at most the workers given; and `legato plan` reads the
    saved file."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from legato.core.pipeline.planner import plan

    ids = [n.id for n in prof.nodes]
    for kwargs in ({}, {"objective": "sync", "microbatches": 4, "straight": True}):
        result = plan(prof, 4, bandwidth="1GB/s", **kwargs)
        placed = [n for s in result.stages for n in s.nodes]
        assert sorted(placed) == sorted(ids)
        stage_of = {n: i for i, s in enumerate(result.stages) for n in s.nodes}
        assert all(stage_of[u] <= stage_of[v] for u, v in prof.edges)
        assert 1 <= result.workers_used <= 4 and result.time_per_minibatch_s > 0
    path = prof.save(tmp_path / "profile.json")
    out = tmp_path / "plan.json"
    legato = Path(sys.executable).parent / "legato"
    proc = subprocess.run([str(legato), "plan", str(path), "--workers", "2", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["stages"]


@pytest.fixture
def planner_check():
    """`planner_check(profile, tmp_path)`: the Keras and gluon profilers' tests share it."""
    return _planner_runs_on
