"""Training parity models in PyTorch (legato/adapters/torch/parity.py) and `legato parity train`:
a short run on scikit-learn's digits learns to rebuild missing predictions far above chance,
writes ONNX models that onnxruntime serves with PyTorch's outputs, and refuses to overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn (digits) is not installed; make setup")
ort = pytest.importorskip("onnxruntime")

from legato.cli import main  # noqa: E402
from legato.core.parity import AdditionEncoder, datasets, evaluate, sample_groups  # noqa: E402


@pytest.mark.timeout(240)
def test_short_training_run_rebuilds_predictions_and_writes_onnx(tmp_path, capsys, caplog):
    out = tmp_path / "parm"
    argv = ["parity", "train", "--dataset", "digits", "--k", "2", "--encoder", "addition",
            "-o", str(out), "--base-epochs", "10", "--parity-steps", "1500", "--json"]
    with caplog.at_level("INFO", logger="legato.core.parity.training"):
        assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)      # --json: the report, and where it went
    report = json.loads((out / "report.json").read_text())
    assert printed == {**report, "output": str(out)}
    # the phases of a minutes-long command are told as they start
    phases = [r.getMessage() for r in caplog.records if r.name.endswith("parity.training")]
    assert phases[1:3] == ["parity training: training the base model (10 epochs)",
                           "parity training: training the parity model (1500 steps)"], phases
    assert report["base_accuracy"] > 0.9
    # far above the 10% of a default answer after a few seconds of training
    assert report["reconstruction_accuracy"] > 0.6 and report["degraded_accuracy"] > 0.6
    assert report["reconstructions"] == 2 * report["test_groups"]

    # the ONNX files reproduce the report: rebuild test predictions through onnxruntime
    ds = datasets.load("digits")
    base = ort.InferenceSession(str(out / "base.onnx"), providers=["CPUExecutionProvider"])
    parity = ort.InferenceSession(str(out / "parity.onnx"), providers=["CPUExecutionProvider"])
    groups = sample_groups(len(ds.x_test), 2, report["test_groups"], np.random.default_rng(1))
    outs = base.run(None, {"x": ds.x_test})[0]
    par = parity.run(None, {"x": AdditionEncoder(2).encode_batch(ds.x_test[groups])})[0]
    again = evaluate(outs, ds.y_test, groups, par)
    assert abs(again["degraded_accuracy"] - report["degraded_accuracy"]) < 0.01
    # the cheap backup model: a linear classifier, less accurate than the base but useful
    backup = ort.InferenceSession(str(out / "backup.onnx"), providers=["CPUExecutionProvider"])
    acc = float((backup.run(None, {"x": ds.x_test})[0].argmax(1) == ds.y_test).mean())
    assert 0.7 < acc and abs(acc - report["backup_accuracy"]) < 1e-6

    before = (out / "parity.onnx").read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "parity.onnx").read_bytes() == before


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    assert main(["parity", "train", "--k", "1", "-o", str(tmp_path / "x")]) == 2
    assert "--k must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
