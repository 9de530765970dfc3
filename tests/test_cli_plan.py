"""`legato plan`: PipeDream's profiles in, the plan out as text, JSON or a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LEGATO = [sys.executable, "-m", "legato.cli"]
VGG = Path("/work/shared/data/pipedream-profiles/vgg16/graph.txt")
for parent in Path(__file__).resolve().parents:
    if (parent / "shared" / "data" / "pipedream-profiles").is_dir():
        VGG = parent / "shared" / "data" / "pipedream-profiles" / "vgg16" / "graph.txt"
        break

needs_vgg = pytest.mark.skipif(not VGG.exists(), reason=f"PipeDream profile {VGG} is absent")


def run(*args: str):
    return subprocess.run([*LEGATO, "plan", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ), stdin=subprocess.DEVNULL)


@needs_vgg
def test_json_is_pipedreams_answer():
    proc = run(str(VGG), "--from-pipedream", "--workers", "4", "--bandwidth", "1GB/s",
               "--mode", "pipedream", "--activation-compression-ratio", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [s["replicas"] for s in out["stages"]] == [3, 1]
    assert out["stages"][0]["nodes"][:2] == ["node1", "node2"]
    assert out["time_per_minibatch_s"] == pytest.approx(0.2055, abs=1e-4)
    assert out["speedup"] == pytest.approx(out["dp_time_s"] / out["time_per_minibatch_s"])


@needs_vgg
def test_topology_simulation_gantt_and_output(tmp_path):
    png, plan_json = tmp_path / "g.png", tmp_path / "plan.json"
    proc = run(str(VGG), "--from-pipedream", "--topology", "2x2", "--bandwidth",
               "10GB/s,1.25GB/s", "--simulate", "1f1b", "--microbatches", "8", "--gantt",
               str(png), "-o", str(plan_json))
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout and "simulated 1f1b with 8 microbatches" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(plan_json.read_text())["workers"] == 4


@needs_vgg
@pytest.mark.parametrize("args, message", [
    (["--workers", "4"], "is not JSON"),                                # graph.txt needs the flag
    (["--from-pipedream"], "either --workers N"),
    (["--from-pipedream", "--workers", "4", "--topology", "2x2"], "either --workers N"),
    (["--from-pipedream", "--workers", "4", "--bandwidth", "fast"], "bandwidth 'fast'"),
    (["--from-pipedream", "--workers", "4", "--mode", "paper", "--memory", "1GiB"],
     "no plan fits the memory cap"),
    (["--from-pipedream", "--workers", "4", "--memory", "lots"], "--memory 'lots'"),
    (["--from-pipedream", "--workers", "4", "--objective", "sync"], "needs microbatches"),
    (["--from-pipedream", "--workers", "4", "--gantt", "x.png"], "add --simulate"),
])
def test_bad_input_is_a_clear_error(args, message):
    proc = run(str(VGG), *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_profile_and_cycle(tmp_path):
    proc = run(str(tmp_path / "nope.json"), "--workers", "2")
    assert proc.returncode == 2 and "cannot read the profile" in proc.stderr
    cyclic = tmp_path / "graph.txt"
    cyclic.write_text(
        "node1 -- A -- forward_compute_time=1, backward_compute_time=1, activation_size=4, "
        "parameter_size=4\n"
        "node2 -- B -- forward_compute_time=1, backward_compute_time=1, activation_size=4, "
        "parameter_size=4\n\tnode1 -- node2\n\tnode2 -- node1\n")
    proc = run(str(cyclic), "--from-pipedream", "--workers", "2")
    assert proc.returncode == 2 and "cycle through ['node1', 'node2']" in proc.stderr


def test_output_never_overwrites_the_profile(tmp_path):
    from legato.core.pipeline import LayerNode, LayerProfile

    prof = LayerProfile((LayerNode("a", forward_s=1.0), LayerNode("b", forward_s=1.0)),
                        (("a", "b"),))
    path = prof.save(tmp_path / "p.json")
    before = path.read_bytes()
    proc = run(str(path), "--workers", "2", "-o", str(path))
    assert proc.returncode == 2 and "is the profile itself" in proc.stderr
    assert path.read_bytes() == before
