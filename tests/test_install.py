"""legato installed as a user installs it (issue 18): an sdist and a wheel built from this tree
with `python -m build` (the wheel from the sdist, so the sdist is complete), installed with pip
into a clean virtualenv.

First with numpy alone (legato's only requirement): every command that needs an optional
package says in one line which extra installs it, exit 2, no traceback. Then into that
virtualenv go torch (the CPU build this machine has on disk) and `legato[onnx]`, which must
leave torch as it was, and the smoke test runs there: import, `legato doctor`, a two-rank
ScheduledOptimizer job under torchrun, the torch profiler and `legato plan` on its profile,
`legato rewrite` on a model, and `torch.compile(backend="legato")` in an interpreter that never
imported legato. Also: pip's resolver, asked for every extra in the main virtualenv (which
holds torch and tensorflow-cpu), would replace no framework.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# what an extra must never replace or add a second copy of
FRAMEWORKS = {"torch", "tensorflow", "tensorflow-cpu", "numpy", "mxnet"}

EXTRA_COMMANDS = [  # (command line, extra named) with numpy only
    (["rewrite", "{model}", "-o", "{tmp}/out.onnx"], "onnx"),
    (["rules", "verify"], "onnx"),
    (["rules", "generate", "-o", "{tmp}/rules.json"], "onnx"),
    (["serve", "--model", "{model}", "--parity-model", "{model}", "--port", "0"], "serve"),
    (["loadgen", "--url", "http://127.0.0.1:9", "--rate", "1", "--queries", "1"],
     "parity"),  # its queries come from the parity datasets (the parity extra holds serve's)
    (["parity", "train", "-o", "{tmp}/parity"], "torch"),
    (["plan", "{profile}", "--from-pipedream", "--workers", "2", "--simulate", "1f1b",
      "--gantt", "{tmp}/g.png"], "plot"),
]

IMPORTS = [("legato.adapters.torch", "torch"), ("legato.adapters.tensorflow", "tensorflow"),
           ("legato.adapters.mxnet", "mxnet"), ("legato.core.rewrite", "onnx"),
           ("legato.adapters.gloo", "torch")]

# a small PipeDream profile (its graph.txt format): a chain of three layers
PROFILE = textwrap.dedent("""\
    node1 -- Conv2d(3, 8, kernel_size=(3, 3)) -- forward_compute_time=2.000, backward_compute_time=4.000, activation_size=1048576.000, parameter_size=896.000
    node2 -- ReLU() -- forward_compute_time=0.500, backward_compute_time=0.500, activation_size=1048576.000, parameter_size=0.000
    node3 -- Linear(in_features=512, out_features=10) -- forward_compute_time=1.000, backward_compute_time=2.000, activation_size=4096.000, parameter_size=20520.000
    \tnode1 -- node2
    \tnode2 -- node3
    """)

TWO_RANKS = textwrap.dedent("""\
    import os, torch, torch.distributed as dist
    from legato.adapters.torch import ScheduledOptimizer
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = ScheduledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, timeout_s=120)
    torch.manual_seed(1 + rank)
    for _ in range(3):
        x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.synchronize()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "ranks differ"
    opt.close()
    dist.destroy_process_group()
    print(f"rank {rank}: 3 steps, ranks equal", flush=True)
    """)

PROFILE_AND_SAVE = textwrap.dedent("""\
    import sys, torch
    from legato.adapters.torch import profile_pipeline
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    profile_pipeline(model, torch.randn(32, 64), warmup=1, repeats=2).save(sys.argv[1])
    """)

COMPILE_WITHOUT_IMPORT = textwrap.dedent("""\
    import sys, torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    assert not any(m.startswith("legato") for m in sys.modules)
    fast = torch.compile(model, backend="legato", options={"budget": 5, "time_limit_s": 20})
    with torch.inference_mode():
        got, want = fast(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    import legato.adapters.torch.compile as c
    assert c.last_compiles(), "the legato backend compiled nothing"
    print("compiled by", type(c.last_compiles()[-1]).__name__, flush=True)
    """)


def _run(cmd, *, timeout=600, env=None, cwd=None, check=True):
    # nothing of this checkout may leak into the clean virtualenv's imports
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})}, cwd=cwd or tempfile.gettempdir(),
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from the sdist (python -m build, no isolation: the build
    requirements are in .venv)."""
    out = tmp_path_factory.mktemp("dist")
    if importlib_missing("build"):
        pytest.skip("the `build` package is not installed here (requirements/main.txt has it)")
    src = tmp_path_factory.mktemp("src") / "legato"
    # a copy of the tracked tree and the untracked files git does not ignore (as CI's checkout)
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                 cwd=ROOT).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], timeout=900)
    wheels, sdists = list(out.glob("legato-*.whl")), list(out.glob("legato-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_the_sdist_holds_what_the_wheel_is_built_from(dist):
    import tarfile

    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("native/priority_queue.h", "native/nccl.h", "native/bindings.cc", "setup.py",
                   "pyproject.toml", "legato/py.typed", "legato/core/rewrite/rules/merges.json"):
        assert needed in names, needed


def test_no_extra_replaces_an_installed_framework(dist, tmp_path):
    """pip's resolver in .venv (torch 2.13.0+cpu, tensorflow-cpu, numpy 2): what would each
    extra install? Never a framework or numpy (mxnet's extra is for an environment of its own:
    it needs numpy<1.24)."""
    for extra in ("torch", "tensorflow-cpu", "onnx", "rewrite", "tune", "serve", "parity", "plot",
                  "all"):
        report = tmp_path / f"{extra}.json"
        _run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report,
              f"legato[{extra}] @ {dist['wheel'].as_uri()}"], timeout=600)
        installs = {item["metadata"]["name"].lower()
                    for item in json.loads(report.read_text())["install"]}
        assert not installs & FRAMEWORKS, (extra, installs & FRAMEWORKS)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A clean virtualenv with numpy only."""
    where = tmp_path_factory.mktemp("venv") / "v"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", where], timeout=300)
    _run([where / "bin" / "python", "-m", "pip", "install", "--quiet", "numpy"], timeout=600)
    return where


def test_with_numpy_only_every_command_names_the_extra_it_needs(dist, venv, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", dist["wheel"]],
         timeout=600)
    model = tmp_path / "m.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), model)
    profile = tmp_path / "graph.txt"
    profile.write_text(PROFILE)
    legato = venv / "bin" / "legato"
    assert _run([legato, "--help"]).returncode == 0
    doctor = _run([legato, "doctor"])
    assert "torch" in doctor.stdout
    plan = _run([legato, "plan", profile, "--from-pipedream", "--workers", "2"])
    assert "time per minibatch" in plan.stdout
    for args, extra in EXTRA_COMMANDS:
        args = [a.format(model=model, tmp=tmp_path, profile=profile) for a in args]
        proc = _run([legato, *args], check=False, timeout=120)
        where = f"legato {' '.join(args[:2])}"
        assert proc.returncode == 2, (where, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (where, proc.stderr[-2000:])
        assert f"pip install 'legato[{extra}]'" in proc.stderr, (where, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (where, proc.stderr)
    for module, extra in IMPORTS:
        proc = _run([venv / "bin" / "python", "-c", f"import {module}"], check=False)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("legato._extras.MissingDependency: "), (module, last)
        assert f"pip install 'legato[{extra}]'" in last, (module, last)


def test_into_an_environment_that_holds_torch(dist, venv, tmp_path):
    """torch first (the user's), then legato[onnx]: torch stays, and the smoke test runs."""
    py = venv / "bin" / "python"
    legato = venv / "bin" / "legato"
    _run([py, "-m", "pip", "install", "--quiet", "torch==2.13.0"], timeout=900)
    before = _run([py, "-c", "import torch; print(torch.__version__, torch.__file__)"]).stdout
    _run([py, "-m", "pip", "install", "--quiet", f"legato[onnx] @ {dist['wheel'].as_uri()}"],
         timeout=900)
    after = _run([py, "-c", "import torch; print(torch.__version__, torch.__file__)"]).stdout
    assert before == after, (before, after)
    site = _run([py, "-c", "import legato, pathlib; print(pathlib.Path(legato.__file__).parent)"
                 ]).stdout.strip()
    assert (Path(site) / "py.typed").exists() and str(venv) in site, site
    assert list(Path(site).glob("_native*.so")), "the wheel has no native module"

    doctor = json.loads(_run([legato, "doctor", "--json"]).stdout)
    assert doctor["torch"]["usable"] and doctor["onnxruntime"]["usable"], doctor

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    job = _run([venv / "bin" / "torchrun", "--standalone", "--nproc-per-node", "2", script],
               timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert job.stdout.count("ranks equal") == 2, job.stdout

    profile = tmp_path / "profile.json"
    (tmp_path / "make_profile.py").write_text(PROFILE_AND_SAVE)
    _run([py, tmp_path / "make_profile.py", profile], timeout=300)
    plan = _run([legato, "plan", profile, "--workers", "2", "--json"], timeout=120)
    assert json.loads(plan.stdout)["stages"], plan.stdout

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(
        np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [w])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    rewrite = _run([legato, "rewrite", model, "-o", tmp_path / "out.onnx", "--time-limit-s", "30"],
                   timeout=300)
    assert "Traceback" not in rewrite.stderr

    (tmp_path / "compile_it.py").write_text(COMPILE_WITHOUT_IMPORT)
    compiled = _run([py, tmp_path / "compile_it.py"], timeout=300)
    assert "compiled by" in compiled.stdout, compiled.stdout
