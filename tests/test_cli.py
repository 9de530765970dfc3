"""The legato command: usage errors, doctor, demo and bench."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from legato.doctor import mxnet_python

LEGATO = [sys.executable, "-m", "legato.cli"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([*LEGATO, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "legato"
    assert script.exists(), "pip install -e . should install the legato command"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("legato ")


def test_no_command_prints_usage_and_exits_2():
    proc = run()
    assert proc.returncode == 2
    assert "usage: legato" in proc.stderr and "a command is required" in proc.stderr


def test_wrong_command_prints_usage_and_exits_2():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "usage: legato" in proc.stderr and "invalid choice: 'frobnicate'" in proc.stderr


def test_help_lists_the_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("doctor", "demo", "plan", "rewrite", "rules", "parity", "bench"):
        assert command in proc.stdout


@pytest.fixture(scope="module")
def doctor_json():
    proc = run("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_doctor_json_has_every_component(doctor_json):
    for name in ("python", "numpy", "native", "torch", "torch.distributed/gloo",
                 "torch.distributed/nccl", "tensorflow", "mxnet", "horovod", "onnx",
                 "onnxruntime", "cuda", "nccl"):
        entry = doctor_json[name]
        assert {"usable", "version", "reason"} <= set(entry), name
        assert isinstance(entry["usable"], bool)
        assert entry["usable"] or entry["reason"], f"{name} is unusable without a reason"


def test_doctor_agrees_with_this_environment(doctor_json):
    assert doctor_json["native"]["usable"] and doctor_json["native"]["cxx_standard"] >= 201703
    if importlib.util.find_spec("torch"):
        import torch

        assert doctor_json["torch"]["usable"]
        assert doctor_json["torch"]["version"] == torch.__version__
        assert doctor_json["torch.distributed/gloo"]["usable"]
        if not torch.cuda.is_available():
            assert not doctor_json["torch.distributed/nccl"]["usable"]
            assert not doctor_json["cuda"]["usable"] and doctor_json["cuda"]["reason"]
    assert doctor_json["tensorflow"]["usable"] == (importlib.util.find_spec("tensorflow")
                                                   is not None)
    if importlib.util.find_spec("horovod"):
        frameworks = doctor_json["horovod"]["frameworks"]
        assert doctor_json["horovod"]["usable"]
        assert frameworks["torch"]["gloo"] and "gloo" in doctor_json["horovod"]["controllers"]
        if importlib.util.find_spec("tensorflow"):
            assert frameworks["tensorflow"]["gloo"]
    if mxnet_python():
        assert doctor_json["mxnet"]["usable"], doctor_json["mxnet"]["reason"]
        assert doctor_json["mxnet"]["numpy"] < "1.24"


def test_doctor_explains_a_missing_mxnet(tmp_path):
    proc = run("doctor", "--json", env={"LEGATO_MXNET_PYTHON": str(tmp_path / "nopython")})
    assert proc.returncode == 0
    mx = json.loads(proc.stdout)["mxnet"]
    assert not mx["usable"] and "nopython" in mx["reason"]


def test_doctor_table():
    proc = run("doctor")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["component", "usable", "version"]
    assert any(line.startswith("native ") for line in lines)


def test_demo_lists_and_runs_sections():
    proc = run("demo", "--list")
    assert proc.returncode == 0 and proc.stdout.split() == ["doctor", "native-queue", "scheduler",
                                                           "pipeline", "rewrite", "parity"]
    proc = run("demo", "--section", "native-queue")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "first window [1, 3], then [2, 0]; ok" in proc.stdout
    assert "1 of 1 sections ok" in proc.stdout


def test_demo_unknown_section():
    proc = run("demo", "--section", "nope")
    assert proc.returncode == 2 and "known: doctor, native-queue, scheduler" in proc.stderr


def test_bench_runs_the_native_queue_benchmark(tmp_path):
    out = tmp_path / "nq.json"
    proc = run("bench", "native-queue", "--", "--tasks", "2000", "--pingpong-tasks", "200",
               "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "same order" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["case"] for r in result["results"]] == ["stream", "pull", "pingpong"]
    assert all(r["ratio"] > 0 for r in result["results"])
