"""legato's rewriter on the onnx package's whole backend test corpus (issue 15, item 2): every
model goes through `optimize` with a small budget, and the result is checked (valid, the
original's inputs, outputs, IR version and opsets, and its outputs on the case's own test data;
benchmarks/_onnx_corpus.py). Prints per folder how many models were refused (reasons grouped),
came back unchanged because no rule matched or lowered the predicted cost, were rewritten but
not kept (the guard's reasons grouped), and were rewritten and accepted; then every failed check.

Run: `legato bench rewrite-corpus [-- --folders light,simple --budget 3 --time-limit 2]`.
The settings default to the test's, per folder (`_onnx_corpus.OPTIONS`); the cost cache is a
fresh temporary file unless --cache is given. Results go to
benchmarks/results/rewrite_corpus.json. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# Sibling modules are imported by name from this folder (where `legato bench` runs them).
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    import _onnx_corpus as corpus
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folders", default=",".join(corpus.FOLDERS))
    ap.add_argument("--match", default="", help="only cases whose id contains this")
    ap.add_argument("--budget", type=int, help="graphs per search (default: per folder)")
    ap.add_argument("--time-limit", type=float, help="seconds per search (default: per folder)")
    ap.add_argument("--rounds", type=int, help="A/B rounds (default: per folder)")
    ap.add_argument("--min-speedup", type=float,
                    help="optimize's min_speedup; 0 keeps every rewrite with equal outputs, "
                         "so that every rewritten model is checked")
    ap.add_argument("--cache", default="", help="cost cache file (default: a fresh one)")
    ap.add_argument("--verbose", action="store_true", help="one line per model")
    ap.add_argument("--json", default=str(RESULTS / "rewrite_corpus.json"),
                    help="where to write the outcomes")
    args = ap.parse_args(argv)
    folders = tuple(args.folders.split(","))
    # the cost model tries sessions that may fail (it estimates those segments instead), and
    # onnxruntime logs each failure; failures that matter are reported below
    onnxruntime.set_default_logger_severity(4)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LEGATO_COST_CACHE"] = args.cache or str(Path(tmp) / "op_costs.json")
        t0 = time.perf_counter()
        selected = [c for c in corpus.cases(folders) if args.match in c.id]
        given = {k: v for k, v in (("budget", args.budget), ("time_limit_s", args.time_limit),
                                   ("rounds", args.rounds), ("min_speedup", args.min_speedup))
                 if v is not None}
        settings = {f: {**o, **given} for f, o in corpus.OPTIONS.items()}
        print(f"{len(selected)} models from {', '.join(folders)} "
              f"({time.perf_counter() - t0:.1f} s to collect); optimize settings: "
              + "; ".join(f"{f}: {o}" for f, o in settings.items()), flush=True)
        shared: dict = {}
        outcomes = []
        for case in selected:
            outcome = corpus.run(case, {**corpus.options_for(case), **given}, shared)
            outcomes.append(outcome)
            if args.verbose or outcome.problems:
                print(f"{outcome.seconds:6.2f} s  {outcome.case}: {outcome.status}: "
                      f"{outcome.reason.splitlines()[0] if outcome.reason else ''}"
                      + (f"  FAILED: {' | '.join(outcome.problems)}" if outcome.problems
                         else ""),
                      flush=True)
        elapsed = time.perf_counter() - t0
    print()
    print("\n".join(corpus.summarize(outcomes)))
    slowest = sorted(outcomes, key=lambda o: -o.seconds)[:5]
    print(f"\n{elapsed:.1f} s in all; slowest: " + ", ".join(
        f"{o.case} {o.seconds:.1f} s" for o in slowest))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "folders": folders, "seconds": elapsed,
                               "outcomes": [dataclasses.asdict(o) for o in outcomes]},
                              indent=1) + "\n")
    print(f"results: {out}")
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
