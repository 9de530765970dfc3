"""`legato demo`: a tour of what legato can do here, one section per capability.

Sections register themselves in SECTIONS in the order they run; each takes an argparse
namespace and returns True when it succeeded. Later capabilities add their own section.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["SECTIONS", "run"]

log = logging.getLogger(__name__)

Section = Callable[[argparse.Namespace], bool]


def _doctor(args: argparse.Namespace) -> bool:
    from legato import doctor

    report = doctor.collect()
    print(doctor.format_table(report))
    return doctor.core_usable(report)


def _native_queue(args: argparse.Namespace) -> bool:
    """Check the native queue against its contract, then time it against the Python queue."""
    from legato.core.scheduler import NATIVE_AVAILABLE, make_queue

    impls = ["native", "python"] if NATIVE_AVAILABLE else ["python"]
    if not NATIVE_AVAILABLE:
        print("legato._native is not built; checking the pure-Python queue only")
    ok = True
    for impl in impls:
        # Priority order and the credit window: 3 tasks of 40 bytes under a 100-byte credit.
        q = make_queue(100, "fit", impl=impl)
        for task_id, prio in ((0, 3), (1, 1), (2, 2), (3, 1)):
            q.post(task_id, prio, 40)
        first = q.try_pop_many(10)
        order = [t.id for t in first]
        stats = q.stats()
        for t in first:
            q.complete(t.id)
        rest = [t.id for t in q.try_pop_many(10)]
        for task_id in rest:
            q.complete(task_id)
        q.shutdown()
        good = order == [1, 3] and rest == [2, 0] and stats["bytes_in_flight"] == 80
        ok &= good
        print(f"{impl:>6} queue: fit mode, credit 100 B, four 40 B tasks -> first window "
              f"{order}, then {rest}; {'ok' if good else 'WRONG'}")
    for impl in impls:
        n = 20000
        q = make_queue(None, impl=impl)
        q.start(lambda t, q=q: q.complete(t.id))
        start = time.perf_counter()
        for i in range(n):
            q.post(i, i % 16, 1024)
        q.shutdown(timeout_s=60)
        per_task_us = (time.perf_counter() - start) / n * 1e6
        print(f"{impl:>6} queue: {n} tasks post -> dispatch -> complete, "
              f"{per_task_us:.2f} us per task (one run; `legato bench native-queue` measures "
              "the ratio properly)")
    return ok


def _scheduler(args: argparse.Namespace) -> bool:
    """2 workers on a 1000 Mbit/s loopback: DDP against legato, and a timeline."""
    import os
    import shutil
    import subprocess
    import sys

    from legato.doctor import repo_root

    root = repo_root()
    if root is None:
        print("skipped: the scheduler demo runs benchmarks/, which only a source checkout has "
              "(an installed legato has no benchmarks)")
        return True
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("tc"):
        print("skipped: shaping a private loopback needs root, unshare and tc; run "
              "`legato bench scheduler` as root")
        return True
    trace = Path("legato-demo-timeline.json").resolve()
    cmd = [sys.executable, str(root / "benchmarks" / "scheduler_step_time.py"), "--rates",
           "1000", "--models", "vgg", "--methods", "ddp,bytescheduler", "--steps", "6",
           "--warmup", "2", "--rounds", "2", "--no-tune", "--timeline", str(trace), "--json",
           str(Path(os.environ.get("TMPDIR", "/tmp")) / "legato-demo-scheduler.json")]
    print("VGG-style CNN (7.3 MB of gradients), 2 gloo workers, loopback shaped to 1000 Mbit/s;"
          " legato with its default sizes (`legato bench scheduler` tunes them)")
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=900)
    print(proc.stdout.strip())
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return False
    print(f"timeline of both ranks: {trace} (open it at https://ui.perfetto.dev)")
    return trace.exists()


def _pipeline(args: argparse.Namespace) -> bool:
    """Profile a CNN, plan 2 stages, simulate 1F1B, run it, and compare."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("skipped: torch is not installed here (pip install 'legato[torch]'; make setup puts "
              "it in .venv)")
        return True
    from legato._demo_pipeline import run_demo

    print("a small CNN with fully connected layers, 2 gloo workers on 127.0.0.1: profile, "
          "plan, simulate 1F1B, then train it with PipelineTrainer")
    return run_demo()


def _rewrite(args: argparse.Namespace) -> bool:
    """Rewrite an unrolled NasRNN-style cell (the zoo's, smaller) with the shipped rules and
    onnxruntime at 2 threads; show the rules applied, the measured decision and the error.

    The section's verdict is about correctness only: it fails if the model that comes back is
    not valid ONNX or computes other outputs than the original (checked here, independently of
    optimize's own check). Whether the rewrite is kept is a timing decision on this machine at
    this moment; it is printed either way, with the measurements behind it."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnx_ir", "onnxscript")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed here (pip install 'legato[onnx]'; "
              "make setup puts them in .venv)")
        return True
    import collections

    import onnx

    from legato.core.rewrite import optimize, shipped_rules
    from legato.core.rewrite.measure import compare_outputs, random_feed, session

    model = _nasrnn_cell(hidden=256, steps=3)
    rules = shipped_rules()
    kinds = collections.Counter(r.family or r.origin for r in rules)
    print(f"{len(rules)} shipped rules, each proved with Z3 and checked in float64 ("
          + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
    print("model: a NasRNN cell unrolled 3 steps (8 gates x W + h U + b per step), hidden 256; "
          "onnxruntime ORT_ENABLE_ALL, 2 threads")
    out, report = optimize(model, rules=rules, threads=2, budget=100, time_limit_s=30)
    print(report.explain())
    print("decision: " + (f"kept the rewrite, measured {report.speedup:.2f}x faster"
                          if report.accepted else "kept the original (a timing decision; "
                          "the model is correct either way)"))
    try:
        onnx.checker.check_model(out, full_check=True)
    except onnx.checker.ValidationError as err:
        print(f"FAILED: the model that came back is not valid ONNX: {err}")
        return False
    feeds = [random_feed(model, seed=100 + k) for k in range(3)]
    same = compare_outputs(session(model, threads=2), session(out, threads=2), feeds)
    print(f"check: the returned model is valid ONNX; its outputs against the original's on 3 "
          f"new random inputs: max abs error {same['max_abs']:.3g}, max rel error "
          f"{same['max_rel']:.3g} ({'equal' if same['equal'] else 'NOT equal'} within rtol "
          f"{same['rtol']}, atol {same['atol']})")
    return bool(same["equal"])


def _nasrnn_cell(hidden: int, steps: int):
    """TASO's NasRNN cell as ONNX: per step, 8 gates x W_i + h U_i + b_i, then a fixed tree."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def weight(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    def op(kind: str, *ins: str) -> str:
        out = f"v{len(nodes)}"
        nodes.append(helper.make_node(kind, list(ins), [out]))
        return out

    wx = [weight(f"wx{i}", hidden, hidden) for i in range(8)]
    wh = [weight(f"wh{i}", hidden, hidden) for i in range(8)]
    b = [weight(f"b{i}", hidden) for i in range(8)]
    h = "h0"
    for t in range(steps):
        g = [op("Add", op("Add", op("MatMul", f"x{t}", wx[i]), op("MatMul", h, wh[i])), b[i])
             for i in range(8)]
        m0 = op("Add", op("Relu", g[0]), op("Sigmoid", g[3]))
        m1 = op("Add", op("Sigmoid", g[1]), op("Tanh", g[2]))
        m2 = op("Mul", op("Sigmoid", g[4]), op("Tanh", g[5]))
        m3 = op("Mul", op("Sigmoid", g[6]), op("Relu", g[7]))
        m4 = op("Add", op("Sigmoid", m1), op("Tanh", m2))
        m5 = op("Mul", op("Tanh", m0), op("Tanh", m3))
        h = op("Tanh", op("Mul", op("Tanh", m4), op("Tanh", m5)))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, hidden])
              for n in [*(f"x{t}" for t in range(steps)), "h0"]]
    graph = helper.make_graph(nodes, "nasrnn", inputs,
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, hidden])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _parity(args: argparse.Namespace) -> bool:
    """Train a parity model on digits, then serve it behind stragglers without redundancy, with
    hedging, with parity and with the adaptive policy."""
    import importlib.util

    missing = [m for m in ("sklearn", "onnxruntime", "aiohttp", "hdrh", "torch")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed here (pip install "
              "'legato[torch,parity]'; make setup puts them in .venv)")
        return True
    import asyncio
    import tempfile

    from legato.adapters.torch.parity import train_parity_pair
    from legato.core.parity import datasets
    from legato.core.parity.frontend import Frontend, ServeConfig
    from legato.core.parity.loadgen import run_load

    out = Path(tempfile.mkdtemp(prefix="legato-demo-parity-"))
    report = train_parity_pair("digits", 2, "addition", out, base_epochs=20, parity_steps=4000)
    print(f"digits, k=2: base accuracy {report['base_accuracy']:.1%}; a parity model rebuilds "
          f"a missing prediction with {report['degraded_accuracy']:.1%} accuracy "
          f"({report['seconds']:.0f} s of training, short for the demo)")
    faults = "*:pause=0.05,alpha=1.5,scale_ms=40,seed=1"
    print(f"serving: 4 workers with injected Pareto pauses ({faults}), deadline 200 ms, "
          "open-loop Poisson load 120 queries/s, 1,200 queries per policy")
    queries = [x[None] for x in datasets.load("digits").x_test]

    async def one(policy: str) -> dict:
        fe = Frontend(ServeConfig(model=str(out / "base.onnx"),
                                  parity_model=str(out / "parity.onnx"), k=2,
                                  workers=4, policy=policy, deadline_ms=200, port=0,
                                  inject=faults))
        await fe.start()
        try:
            return await run_load(f"http://127.0.0.1:{fe.port}", queries, 120.0, n=1200,
                                  seed=1, deadline_ms=200)
        finally:
            await fe.stop()

    ok = True
    extras = {"none": "", "hedge": " (+2 workers)", "parity": " (+2 parity workers)",
              "adaptive": " (+2, both models)"}
    for policy, extra in extras.items():
        r = asyncio.run(one(policy))
        print(f"  {policy:8s}{extra:20s} p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
              f"p99.9 {r['p99.9_ms']:6.1f} ms  by source {r['by_source']}")
        ok &= r["replies"] == r["queries_sent"]
    print(f"one run of one seed on a shared CPU (`legato bench parity` runs loads, seeds and "
          f"baselines); the models are in {out} for `legato serve`")
    return ok


SECTIONS: dict[str, Section] = {
    "doctor": _doctor,
    "native-queue": _native_queue,
    "scheduler": _scheduler,
    "pipeline": _pipeline,
    "rewrite": _rewrite,
    "parity": _parity,
}


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections (all by default); exit status 1 if any failed."""
    chosen = args.section or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"legato demo: unknown section(s) {', '.join(unknown)}; "
              f"known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"\n=== {name} ===")
        start = time.perf_counter()
        try:
            good = SECTIONS[name](args)
        except Exception:  # noqa: BLE001 (one broken section must not hide the others)
            log.exception("demo section %s failed", name)
            good = False
        print(f"--- {name}: {'ok' if good else 'FAILED'} ({time.perf_counter() - start:.1f} s)")
        if not good:
            failed.append(name)
    print(f"\nlegato demo: {len(chosen) - len(failed)} of {len(chosen)} sections ok"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
