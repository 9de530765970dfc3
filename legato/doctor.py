"""`legato doctor`: what is usable here, and why not.

Each framework is probed in its own subprocess (in parallel, with a timeout), so a framework
that crashes or hangs on import cannot take the doctor down, and importing TensorFlow does not
slow the rest. MXNet is probed with the interpreter of `.venv-mxnet` (or $LEGATO_MXNET_PYTHON),
since it cannot share an environment with TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from legato._extras import install_hint

__all__ = ["collect", "core_usable", "format_table", "mxnet_python", "repo_root"]

_PROBE_TIMEOUT_S = 120

# Each probe prints one JSON object: {"usable": bool, "version": str|None, "reason": str, ...}.
_PROBES: dict[str, str] = {
    "torch": r"""
import json, torch, torch.distributed as dist
print(json.dumps({"usable": True, "version": torch.__version__, "reason": "",
  "cuda_build": torch.version.cuda, "distributed": dist.is_available(),
  "gloo": dist.is_available() and dist.is_gloo_available(),
  "nccl": dist.is_available() and dist.is_nccl_available(),
  "cuda_available": torch.cuda.is_available(),
  "cuda_devices": torch.cuda.device_count(),
  "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}))
""",
    "tensorflow": r"""
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
print(json.dumps({"usable": True, "version": tf.__version__, "reason": "",
  "gpus": len(tf.config.list_physical_devices("GPU"))}))
""",
    "horovod": r"""
import json, importlib
import horovod
out = {"usable": False, "version": horovod.__version__, "reason": "", "frameworks": {}}
errors = []
for fw, mod in (("torch", "horovod.torch"), ("tensorflow", "horovod.tensorflow"),
                ("mxnet", "horovod.mxnet")):
    try:
        m = importlib.import_module(mod)
        out["frameworks"][fw] = {"gloo": m.gloo_built(), "mpi": m.mpi_built(),
                                 "nccl": m.nccl_built()}
    except Exception as e:
        out["frameworks"][fw] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
built = [fw for fw, v in out["frameworks"].items() if "error" not in v]
out["usable"] = bool(built)
ctrl = out["frameworks"].get(built[0], {}) if built else {}
out["controllers"] = [c for c in ("gloo", "mpi") if ctrl.get(c)]
out["reason"] = "" if built else "no framework extension of Horovod loads"
print(json.dumps(out))
""",
    "mxnet": r"""
import json, warnings
warnings.simplefilter("ignore")
import mxnet as mx, numpy
feats = mx.runtime.Features()
print(json.dumps({"usable": True, "version": mx.__version__, "reason": "",
  "numpy": numpy.__version__, "dist_kvstore": feats.is_enabled("DIST_KVSTORE"),
  "cuda": feats.is_enabled("CUDA")}))
""",
    "onnx": r"""
import json, onnx
print(json.dumps({"usable": True, "version": onnx.__version__, "reason": "",
  "opset": onnx.defs.onnx_opset_version()}))
""",
    "onnxruntime": r"""
import json, onnxruntime as ort
print(json.dumps({"usable": True, "version": ort.__version__, "reason": "",
  "providers": ort.get_available_providers()}))
""",
    "onnx_ir": r"""
import json, onnx_ir
print(json.dumps({"usable": True, "version": onnx_ir.__version__, "reason": ""}))
""",
    "onnxscript": r"""
import json, onnxscript
print(json.dumps({"usable": True, "version": onnxscript.__version__, "reason": ""}))
""",
    "tf2onnx": r"""
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tf2onnx
print(json.dumps({"usable": True, "version": tf2onnx.__version__, "reason": ""}))
""",
}

# how to get each probed component: the extra that installs it (legato._extras), except
# Horovod (built from source) and MXNet (an environment of its own, or LEGATO_MXNET_PYTHON)
_INSTALL_HINT = {
    **{name: install_hint(name) for name in ("torch", "tensorflow", "onnx", "onnxruntime",
                                             "onnx_ir", "onnxscript", "tf2onnx")},
    "horovod": "build it with scripts/build_horovod.sh .venv (make setup)",
    "mxnet": "pip install 'legato[mxnet]' in an environment of its own (mxnet 1.9.1 needs "
             "numpy<1.24; make setup: .venv-mxnet), or set LEGATO_MXNET_PYTHON to an "
             "interpreter that has mxnet",
}


def repo_root() -> Path | None:
    """The source checkout legato runs from (it has setup.py), or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "setup.py").exists() else None


def mxnet_python() -> str | None:
    """The interpreter to use for MXNet: $LEGATO_MXNET_PYTHON, .venv-mxnet, or this one."""
    override = os.environ.get("LEGATO_MXNET_PYTHON")
    if override:
        return override
    root = repo_root()
    if root is not None and (root / ".venv-mxnet" / "bin" / "python").exists():
        return str(root / ".venv-mxnet" / "bin" / "python")
    return None


def _probe(name: str, python: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([python, "-c", _PROBES[name]], capture_output=True, text=True,
                              timeout=_PROBE_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"usable": False, "version": None,
                "reason": f"importing {name} took over {_PROBE_TIMEOUT_S} s"}
    except OSError as err:
        return {"usable": False, "version": None, "reason": f"cannot run {python}: {err}"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}"
    if "ModuleNotFoundError" in last or "No module named" in last:
        reason = f"not installed ({last.split(':', 1)[-1].strip()}); {_INSTALL_HINT[name]}"
    else:
        reason = f"import failed: {last[:300]}"
    return {"usable": False, "version": None, "reason": reason}


def _native() -> dict[str, Any]:
    try:
        from legato import _native
    except ImportError as err:
        return {"usable": False, "version": None,
                "reason": f"legato._native is not built ({err}); run `pip install -e .` or "
                          "`make setup`. The pure-Python queue serves meanwhile"}
    from legato import __version__
    info = dict(_native.build_info())
    return {"usable": True, "version": __version__, "reason": "", **info}


def _numpy() -> dict[str, Any]:
    try:
        import numpy
    except ImportError:
        return {"usable": False, "version": None, "reason": "numpy is missing; pip install numpy"}
    return {"usable": True, "version": numpy.__version__, "reason": ""}


def _cuda(torch_info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    lib = ctypes.util.find_library("cuda")
    devices = torch_info.get("cuda_devices") or 0
    if torch_info.get("cuda_available"):
        cuda = {"usable": True, "version": torch_info.get("cuda_build"), "reason": "",
                "devices": devices}
    else:
        why = ("torch is a CPU build" if torch_info.get("usable") and not
               torch_info.get("cuda_build") else "no CUDA device or driver")
        cuda = {"usable": False, "version": None, "reason": why, "driver_library": lib}
    nccl_lib = ctypes.util.find_library("nccl")
    if torch_info.get("nccl_version") or (cuda["usable"] and nccl_lib):
        nccl = {"usable": True, "version": torch_info.get("nccl_version"), "reason": "",
                "library": nccl_lib}
    else:
        nccl = {"usable": False, "version": None, "library": nccl_lib,
                "reason": "needs a CUDA device" if not cuda["usable"] else "libnccl not found"}
    return cuda, nccl


def collect() -> dict[str, dict[str, Any]]:
    """Probe every component; returns {component: {usable, version, reason, ...}}."""
    report: dict[str, dict[str, Any]] = {
        "python": {"usable": sys.version_info >= (3, 10), "version": platform.python_version(),
                   "reason": "" if sys.version_info >= (3, 10) else "legato needs Python >= 3.10",
                   "executable": sys.executable},
        "numpy": _numpy(),
        "native": _native(),
    }
    mx_python = mxnet_python()
    jobs = {name: sys.executable for name in _PROBES if name != "mxnet"}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_probe, name, py) for name, py in jobs.items()}
        mx_future = pool.submit(_probe, "mxnet", mx_python or sys.executable)
        results = {name: f.result() for name, f in futures.items()}
        mx = mx_future.result()
    if mx_python:
        mx["python"] = mx_python
    elif not mx["usable"]:
        mx["reason"] = (".venv-mxnet not found and mxnet is not importable here; "
                        + _INSTALL_HINT["mxnet"])
    torch_info = results["torch"]
    report["torch"] = torch_info
    for backend in ("gloo", "nccl"):
        ok = bool(torch_info.get(backend))
        if not torch_info.get("usable"):
            why = "torch is not usable"
        elif backend == "nccl" and not torch_info.get("cuda_available"):
            why = "torch has no CUDA device here" if ok else "torch was built without NCCL"
            ok = False
        else:
            why = "" if ok else f"torch.distributed was built without {backend}"
        report[f"torch.distributed/{backend}"] = {
            "usable": ok, "version": torch_info.get("version") if ok else None, "reason": why}
    report["tensorflow"] = results["tensorflow"]
    report["mxnet"] = mx
    report["horovod"] = results["horovod"]
    for name in ("onnx", "onnxruntime", "onnx_ir", "onnxscript", "tf2onnx"):
        report[name] = results[name]
    report["cuda"], report["nccl"] = _cuda(torch_info)
    return report


def core_usable(report: dict[str, dict[str, Any]]) -> bool:
    """The core needs Python and numpy; the native queue has a pure-Python fallback."""
    return report["python"]["usable"] and report["numpy"]["usable"]


def _details(name: str, info: dict[str, Any]) -> str:
    if not info.get("usable"):
        return info.get("reason", "")
    if name == "torch":
        return f"cuda build: {info.get('cuda_build') or 'none (CPU)'}"
    if name == "horovod":
        fws = info.get("frameworks", {})
        ok = [fw for fw, v in fws.items() if "error" not in v]
        missing = [fw for fw, v in fws.items() if "error" in v]
        text = f"frameworks: {', '.join(ok)}; controllers: {', '.join(info.get('controllers', []))}"
        if any(fws[fw].get("nccl") for fw in ok):
            text += "; nccl ops"
        return text + (f"; not built for {', '.join(missing)}" if missing else "")
    if name == "mxnet":
        where = f" in {info['python']}" if info.get("python") else ""
        return (f"numpy {info.get('numpy')}, dist kvstore: {info.get('dist_kvstore')}{where}")
    if name == "onnxruntime":
        return "providers: " + ", ".join(info.get("providers", []))
    if name == "native":
        return f"g++ {info.get('compiler', '')}, pybind11 {info.get('pybind11')}, {info.get('flags', '')}"
    if name == "cuda":
        return f"{info.get('devices')} device(s)"
    if name == "python":
        return info.get("executable", "")
    if name == "onnx":
        return f"opset {info.get('opset')}"
    return ""


def format_table(report: dict[str, dict[str, Any]]) -> str:
    """Aligned text table: component, usable, version, details or reason."""
    rows = [("component", "usable", "version", "details")]
    for name, info in report.items():
        rows.append((name, "yes" if info.get("usable") else "no",
                     str(info.get("version") or "-"), _details(name, info)))
    w0 = max(len(r[0]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{r[0]:<{w0}}  {r[1]:<6}  {r[2]:<{w2}}  {r[3]}".rstrip() for r in rows)
