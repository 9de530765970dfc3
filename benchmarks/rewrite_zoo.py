"""legato's graph superoptimizer on a zoo of 8 models and the 9 CNNs the onnx package ships,
against onnxruntime alone, onnxsim and onnxoptimizer (issue 5, item 10; issue 15, item 8).

Models:
- the zoo (benchmarks/_rewrite_zoo.py: ResNet-18/50-style, SqueezeNet, Inception, ResNeXt, an
  unfused BERT encoder, NasNet-A cells, an unrolled NasRNN; random weights with denormals
  flushed to zero), exported at each batch;
- `light:NAME`: onnx's own backend test models (`onnx/backend/test/data/light/light_NAME.onnx`:
  bvlc_alexnet, densenet121, inception_v1, inception_v2, resnet50, shufflenet, squeezenet,
  vgg19, zfnet512; IR 3, opset 9, weights as ConstantOfShape fills), at their batch of 1.

For each model at each batch and thread count: run `legato.core.rewrite.optimize` (search
limited by --budget and --time-limit; its own guard decides whether the rewrite is kept), run
onnxsim and onnxoptimizer, then time the original, legato's output and both baselines side by
side under ORT_ENABLE_ALL in interleaved rounds (benchmarks/_ort_harness.py, spinning threads
off) and compare every output with the original's. Columns: ratio = original time / tool's
time (>1 is faster). When legato keeps the original, its output is the same model and counts as
1.00x; the table shows "=r", r being that model timed against itself in the same rounds (the
run's noise). "pred/meas" is legato's predicted time of the original over its time measured
here (the cost model's accuracy; target within 15%).

The cost cache starts empty in a temporary folder (`--cache fresh`, the default), so a run
shows what a fresh machine gets; `--cache user` uses ~/.cache/legato. `--ceiling` also profiles
each original once with onnxruntime's profiler and prints the share of its kernel time spent
in Conv, Gemm and MatMul kernels, which no rule removes: 1 / (1 - the rest) bounds what any
graph rewrite can gain on this CPU.

Targets: zoo geometric mean at least 1.15x over onnxruntime alone with at least two models at
1.5x or more; on the nine light CNNs none slower than 0.99x and a geometric mean of at least
1.03x; search under 60 s per model.

Run: `legato bench rewrite [-- --models nasrnn,light:inception_v1 --batches 1 --threads 1]`.
Results go to benchmarks/results/rewrite_zoo.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# Sibling modules are imported by name from this folder (where `legato bench` runs them).
sys.path.insert(0, str(HERE))


LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512"]
HEAVY = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QLinearConv",
         "MatMulInteger", "ConvTranspose")


def _light(name: str) -> Path:
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.exists():
        raise SystemExit(f"{path} is missing: this onnx package ships no light model {name!r}")
    return path


def _ceiling(path: Path, inputs: dict, threads: int) -> dict:
    """onnxruntime's profile of one model: the share of kernel time in heavy kernels."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        feed = {k: v for k, v in inputs.items() if k in names}
        for _ in range(20):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    heavy = rest = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            if e["args"].get("op_name") in HEAVY:
                heavy += e["dur"]
            else:
                rest += e["dur"]
    share = heavy / max(heavy + rest, 1e-9)
    return {"heavy_share": share, "bound": 1 / max(share, 1e-9)}


def _predict(model: onnx.ModelProto, threads: int) -> float:
    """legato's predicted time of a model (the cost model alone, as optimize prices it)."""
    import onnx_ir.passes.common as passes

    from legato.core.rewrite import modelio
    from legato.core.rewrite.cost import OrtCostModel, graph_price

    working = modelio.prepare(model).model.clone()
    passes.ShapeInferencePass(strict_mode=False)(working)
    cost_model = OrtCostModel(level="all", threads=threads)
    cost_model.bind(working)
    seconds = graph_price(working.graph, cost_model)[0]
    cost_model.save()
    return seconds


def main(argv: list[str] | None = None) -> int:
    import _ort_harness as harness
    import _rewrite_zoo as zoo
    from legato.core.rewrite import optimize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join([*zoo.ZOO, *(f"light:{n}" for n in LIGHT)]),
                    help="zoo names and light:NAME (default: all 8 + all 9)")
    ap.add_argument("--batches", default="1,8", help="zoo batches (light models: 1)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cache", choices=["fresh", "user"], default="fresh",
                    help="fresh: an empty cost cache in a temporary folder (default)")
    ap.add_argument("--ceiling", action="store_true",
                    help="profile each original: the share of time no rule removes")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in zoo.ZOO
               and not (m.startswith("light:") and m[6:] in LIGHT)]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {list(zoo.ZOO)} and "
                 f"{[f'light:{n}' for n in LIGHT]}")
    rows = []
    print(f"{'model':<18} {'b':>2} {'t':>2} {'ORT ms':>8} {'legato':>8} {'onnxsim':>8} "
          f"{'onnxopt':>8} {'pred/meas':>9} {'total s':>8} {'rules':>5} {'max err':>8}"
          f"  decision")
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache == "fresh":
            os.environ["LEGATO_COST_CACHE"] = str(Path(tmp) / "op_costs.json")
        for name in models:
            light = name.startswith("light:")
            batches = [1] if light else [int(b) for b in args.batches.split(",")]
            for batch in batches:
                path = (_light(name[6:]) if light
                        else zoo.export(name, batch, Path(tmp) / f"{name}-{batch}.onnx"))
                model = onnx.load(str(path))
                inputs = zoo.inputs_for(model, batch)
                base = harness.baselines(model)
                for threads in (int(t) for t in args.threads.split(",")):
                    t0 = time.perf_counter()
                    out, report = optimize(model, level="all", threads=threads,
                                           budget=args.budget, time_limit_s=args.time_limit)
                    search_s = time.perf_counter() - t0
                    tools = {"original": model, "legato": out, **dict(base)}
                    timed = harness.ab_time(tools, inputs, level="all", threads=threads,
                                            rounds=args.rounds)
                    err = harness.compare_outputs(model, out, inputs, "all", threads)
                    ref = timed["original"]["median_s"]
                    ratio = {k: ref / v["median_s"] for k, v in timed.items()}
                    # a kept original is the same model: 1.00x by construction; its measured
                    # ratio (one model timed against itself) is the noise of this run
                    unchanged = out is model
                    self_ratio = ratio["legato"]
                    if unchanged:
                        ratio["legato"] = 1.0
                    predicted = report.predicted_before_s
                    if math.isnan(predicted):      # no rule matched: optimize priced nothing
                        predicted = _predict(model, threads)
                    accuracy = predicted / ref
                    row = {"model": name, "batch": batch, "threads": threads,
                           "original_ms": ref * 1e3, "ratios": ratio, "search_s": search_s,
                           "unchanged": unchanged, "legato_measured": self_ratio,
                           "rules_applied": report.applied if report.accepted else [],
                           "accepted": report.accepted, "reason": report.reason,
                           "predicted_ms": predicted * 1e3,
                           "predicted_over_measured": accuracy,
                           "candidates": report.candidates, "searches": report.searches,
                           "remeasured": report.remeasured, "search_only_s": report.search_s,
                           "max_abs_error": err["max_abs"], "max_rel_error": err["max_rel"],
                           "baseline_failures": dict(base.failures)}
                    if args.ceiling:
                        row["ceiling"] = _ceiling(path, inputs, threads)
                    rows.append(row)
                    shown = (f"={self_ratio:.2f}x" if unchanged else f"{ratio['legato']:.2f}x")
                    print(f"{name:<18} {batch:>2} {threads:>2} {ref * 1e3:>8.2f} "
                          f"{shown:>8} {ratio.get('onnxsim', math.nan):>7.2f}x "
                          f"{ratio.get('onnxoptimizer', math.nan):>7.2f}x {accuracy:>9.2f} "
                          f"{search_s:>8.1f} {len(row['rules_applied']):>5} "
                          f"{err['max_abs']:>8.1e}  "
                          f"{'kept' if report.accepted else 'original'}: {report.reason}"
                          + (f"  [ceiling {row['ceiling']['bound']:.2f}x, heavy kernels "
                             f"{row['ceiling']['heavy_share']:.0%}]" if args.ceiling else ""),
                          flush=True)
    summary = {}
    for group, pick in (("zoo", lambda r: not r["model"].startswith("light:")),
                        ("light", lambda r: r["model"].startswith("light:"))):
        chosen = [r for r in rows if pick(r)]
        if not chosen:
            continue
        ratios = [r["ratios"]["legato"] for r in chosen]
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        acc = [abs(r["predicted_over_measured"] - 1) for r in chosen]
        summary[group] = {
            "cells": len(chosen), "geomean": geo, "slowest": min(ratios),
            "models_at_1.5x": sorted({r["model"] for r in chosen
                                      if r["ratios"]["legato"] >= 1.5}),
            "longest_search_s": max(r["search_only_s"] for r in chosen),
            "longest_total_s": max(r["search_s"] for r in chosen),
            "within_15pct": sum(a <= 0.15 for a in acc), "worst_prediction": max(acc)}
        s = summary[group]
        print(f"\n{group}: geometric mean {geo:.3f}x, slowest {s['slowest']:.3f}x, at >= 1.5x "
              f"in some cell: {s['models_at_1.5x'] or 'none'}, longest search "
              f"{s['longest_search_s']:.1f} s (with the guard's measurements "
              f"{s['longest_total_s']:.1f} s); predicted original within 15% of measured in "
              f"{s['within_15pct']} of {len(chosen)} cells (worst off by "
              f"{s['worst_prediction']:.0%})")
    noise = [r["legato_measured"] for r in rows if r["unchanged"]]
    if noise:
        print(f"'=r' marks a kept original (ratio 1 by construction); r is that model timed "
              f"against itself: {min(noise):.2f}x-{max(noise):.2f}x, this run's noise")
    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / "rewrite_zoo.json"
    out_path.write_text(json.dumps({"rows": rows, "summary": summary, "argv": argv or sys.argv[1:]},
                                   indent=1, default=str) + "\n")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
