"""The scheduler benchmark's device options (benchmarks/scheduler_step_time.py --device,
--backend) refuse what this machine cannot run in one line, before any rank starts; the
prepared GPU run (benchmarks/gpu/scheduler_gpu.sh) is valid shell and its dry run goes
through without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "scheduler_step_time.py"
SCRIPT = ROOT / "benchmarks" / "gpu" / "scheduler_gpu.sh"


def _load():
    spec = importlib.util.spec_from_file_location("legato_bench_scheduler_step_time", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(*args: str) -> subprocess.CompletedProcess:
    """`legato bench scheduler -- ARGS`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "legato.cli", "bench", "scheduler", "--", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.timeout(60)
def test_device_cuda_without_cuda_is_one_line_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda would run")
    proc = _bench("--device", "cuda", "--models", "vgg", "--rates", "unshaped")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _one_line(proc.stderr)
    assert "--device cuda needs a CUDA device" in line and "--device cpu" in line, line
    assert "rate " not in proc.stderr  # refused before any rate (or rank) started


@pytest.mark.timeout(60)
def test_nccl_with_fewer_gpus_than_ranks_is_refused():
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU per rank: --backend nccl would run")
    proc = _bench("--device", "cuda", "--backend", "nccl", "--rates", "unshaped")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _one_line(proc.stderr)
    assert "--backend nccl needs one GPU per rank (2)" in line and "--backend gloo" in line, line


@pytest.mark.timeout(60)
def test_device_problem_names_the_fix(monkeypatch):
    bench = _load()
    assert bench.device_problem("cpu", "gloo") is None
    assert "--device cuda" in bench.device_problem("cpu", "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "sees 1 here; pass --backend gloo" in bench.device_problem("cuda", "nccl")
    assert bench.device_problem("cuda", "gloo") is None  # two ranks share the one GPU


@pytest.mark.timeout(30)
def test_gpu_script_is_valid_shell():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.timeout(60)
def test_gpu_script_dry_run_prints_the_runs_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          timeout=50, cwd=tmp_path, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu",
                               "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch " in proc.stdout and "loopback shaping:" in proc.stdout
    runs = [line for line in proc.stdout.splitlines() if line.startswith("== rate ")]
    assert runs and all("bench scheduler -- --device cpu" in line for line in runs), runs
    assert "(dry run: nothing run)" in proc.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
