"""Training step time of 2 TensorFlow workers under horovodrun over a shaped loopback link:
plain Horovod-TensorFlow against legato's ScheduledOptimizer over Horovod's ops, side by side.

Per model and rate, one horovodrun job (in a private network namespace whose loopback is shaped,
see benchmarks/_netns.py) builds the model twice from one seed and trains it with:
  horovod           hvd.DistributedGradientTape and the Keras optimizer's apply_gradients, eager
  horovod-compiled  the same step in a tf.function (Horovod's all-reduces then run inside the
                    graph as backward produces gradients: the stronger baseline)
  legato            ScheduledOptimizer(backend="horovod"), eager: gradients sent as backward
                    produces them, front layers first, partitioned, within a credit window;
                    each layer's next forward waits only for its own update
  legato-compiled   the same with forward and backward in a tf.function returning the gradients
                    (legato's gates and backward hooks are ops in it); apply_gradients eager
They take turns in blocks of --steps steps, --rounds times (so drift on this noisy machine hits
them alike); a block ends when its last update is done. The job also measures F and B (forward
and backward, no communication) and C (one grouped all-reduce of every gradient). With no
--partition-bytes or --credit-bytes, legato runs at its defaults, whose check (the fixed sizes
measured against plain in the first steps) runs first, untimed, with the compiled step; the
table's note says what it chose.

Output: per model a table of median step ms and the ratios baseline/legato (>1: legato is
faster): eager against eager, tf.function against tf.function, and the faster of each; JSON
in benchmarks/results/tensorflow_scheduler.json, and a plot with --plot.
Run: `legato bench tensorflow-scheduler` or `python benchmarks/tensorflow_scheduler.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _netns import (  # noqa: E402
    parse_rate,
    plot_step_times,
    rate_label,
    rate_tag,
    run_shaped,
    shaping_problem,
    trace_prefix,
)

from legato.core.timeline import format_breakdown, read_trace, step_breakdown  # noqa: E402

RESULTS = HERE / "results"
WORKERS = str(HERE / "_tf_scheduler_workers.py")
METHODS = ("horovod", "horovod-compiled", "legato", "legato-compiled")


def inner(args: argparse.Namespace) -> int:
    from legato.launch import run_horovod_job

    settings = {k: v for k, v in (("partition_bytes", args.partition_bytes),
                                  ("credit_bytes", args.credit_bytes)) if v is not None}
    out = {"rate": args.inner_rate, "models": {}}
    for model in args.models:
        job = run_horovod_job(WORKERS + ":run", 2, timeout_s=args.job_timeout,
                              args=[model, args.steps, args.warmup, args.rounds, settings,
                                    args.batch, args.timeline and
                                    f"{args.timeline}.{rate_tag(args.inner_rate)}"])
        results = [json.loads(line.split("RESULT ", 1)[1]) for line in
                   job.rank(0).stdout.splitlines() if "RESULT " in line]
        out["models"][model] = results[0]
        print(f"  {model} at {rate_label(args.inner_rate)} done", file=sys.stderr, flush=True)
    print("RATE_RESULT " + json.dumps(out), flush=True)
    return 0


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for res in results:
        for model, r in res["models"].items():
            med = {m: statistics.median(t) * 1e3 for m, t in r["times"].items()}
            rows.append({"model": model, "rate": res["rate"], "median_ms": med,
                         "runs": len(next(iter(r["times"].values()))),
                         "F_ms": r["F"] * 1e3, "B_ms": r["B"] * 1e3, "C_ms": r["C"] * 1e3,
                         "grad_bytes": r["grad_bytes"], "legato": r["stats"]["config"],
                         "messages_per_step": r["stats"]["messages_per_step"],
                         "traces": r.get("traces", {}),
                         "check_steps": r.get("check_steps", 0),
                         "defaults": r["stats"].get("defaults"),
                         "tuner": r["stats"].get("tuner"),
                         "eager": med["horovod"] / med["legato"],
                         "compiled": med["horovod-compiled"] / med["legato-compiled"],
                         "best": min(med["horovod"], med["horovod-compiled"])
                         / min(med["legato"], med["legato-compiled"])})
    return rows


def print_table(rows: list[dict]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n{model}: median step ms over {rows[0]['runs']} blocks "
              "(ratio = baseline / legato; >1: legato is faster)")
        print(f"{'rate':>13} {'horovod':>9} {'legato':>9} {'ratio':>6} | {'hvd tf.fn':>9} "
              f"{'legato tf.fn':>12} {'ratio':>6} | {'best/best':>9} {'F+B':>7} {'C':>7}")
        for r in (r for r in rows if r["model"] == model):
            m = r["median_ms"]
            print(f"{rate_label(r['rate']):>13} {m['horovod']:>9.1f} {m['legato']:>9.1f} "
                  f"{r['eager']:>5.2f}x | {m['horovod-compiled']:>9.1f} "
                  f"{m['legato-compiled']:>12.1f} {r['compiled']:>5.2f}x | {r['best']:>8.2f}x "
                  f"{r['F_ms'] + r['B_ms']:>7.1f} {r['C_ms']:>7.1f}")
            if r["check_steps"]:  # the default's check (or a tuner) ran first, untimed
                conf = (r["tuner"] or {}).get("confirmation") or {}
                print(f"{'':>13} after {r['check_steps']} untimed steps of legato's "
                      f"{r['defaults']} check: {r['legato']} (fixed/plain "
                      f"{conf.get('ratio', float('nan')):.3f}, {conf.get('verdict')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="500,1000,2000,unshaped",
                        help="comma-separated Mbit/s, 'unshaped' for plain loopback")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch per rank (default: the model's own, 256 mlp, 32 cnn)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="blocks of each method, in turn")
    parser.add_argument("--partition-bytes", type=int, default=None)
    parser.add_argument("--credit-bytes", type=int, default=None)
    parser.add_argument("--job-timeout", type=float, default=1500)
    parser.add_argument("--json", type=Path, default=RESULTS / "tensorflow_scheduler.json")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--timeline", default=None, metavar="PREFIX",
                        help="after the timed rounds, run each legato way once more with a "
                             "trace, to PREFIX.RATE.MODEL.WAY.json, and print where its steps "
                             "went (legato timeline)")
    parser.add_argument("--inner-rate", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.inner_rate is not None:
        return inner(args)
    problem = shaping_problem()
    if problem:
        print(f"tensorflow scheduler benchmark: {problem}", file=sys.stderr)
        return 2
    passthrough = ["--models", ",".join(args.models), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--rounds", str(args.rounds), "--job-timeout",
                   str(args.job_timeout)]
    args.timeline = trace_prefix(parser, args.timeline)
    for flag, value in (("--partition-bytes", args.partition_bytes),
                        ("--credit-bytes", args.credit_bytes), ("--batch", args.batch),
                        ("--timeline", args.timeline)):
        if value is not None:
            passthrough += [flag, str(value)]
    results = []
    for rate in (parse_rate(r) for r in args.rates.split(",") if r):
        print(f"rate {rate_label(rate)} ...", file=sys.stderr, flush=True)
        proc = run_shaped(rate, [sys.executable, str(Path(__file__).resolve()), "--inner-rate",
                                 str(rate), *passthrough], timeout_s=args.job_timeout * 2)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RATE_RESULT ")),
                    None)
        if line is None:
            print(f"rate {rate_label(rate)} failed (exit {proc.returncode}):\n"
                  f"{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line.split(" ", 1)[1]))
    rows = summarize(results)
    print_table(rows)
    for row in rows:  # --timeline: where legato's steps went
        for way, path in row["traces"].items():
            found = step_breakdown(read_trace(path), skip=args.warmup)
            row.setdefault("breakdown", {})[way] = found
            print(f"\n{row['model']} at {rate_label(row['rate'])}, {way} ({path}):\n"
                  f"{format_breakdown(found)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "tensorflow_scheduler", "cores": os.cpu_count(),
                                     "steps": args.steps, "rounds": args.rounds,
                                     "rows": rows}, indent=2))
    if args.plot:
        plot_step_times(rows, METHODS, args.plot, "TensorFlow, {model}")
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
