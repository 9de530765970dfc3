"""Training step time of 2 MXNet workers and 1 parameter server over a shaped loopback link:
gluon's own dist_sync Trainer against legato's ScheduledTrainer, side by side in one job.

Per model and rate, one job (legato.launch.run_mxnet_ps_job: a real ps-lite scheduler, server
and two workers, in a private network namespace whose loopback is shaped, see
benchmarks/_netns.py) builds the model twice from one seed and trains it with:
  gluon   gluon.Trainer(kvstore=dist_sync, update_on_kvstore=False): every gradient pushed and
          pulled as backward produces it (MXNet's engine orders it), all layers updated after
  legato  ScheduledTrainer(policy="bytescheduler"): front layers first, large gradients cut
          into partitions and small ones merged, a credit window of bytes in flight, each layer
          updated as soon as its gradients are back, and its next forward waiting only for that
(update_on_kvstore=True, gluon's default for dist kvstores, puts an optimizer on the servers
that would apply to legato's keys too, so it cannot share a job with legato; gluon with
update_on_kvstore=False makes the same updates as legato, on the workers.) They take turns in
blocks of --steps steps, --rounds times, the first method alternating (so that drift on this
noisy 2-core machine hits both alike); a block ends when its last update is done. The job also
measures FB (forward and backward, no communication) and C (one push and pull of every
gradient, one after the other), and checks that both methods ended with the same parameters.
With --tune, legato's online tuner (ScheduledTrainer(tune=...)) first runs untimed until it has
chosen, and the timed rounds run its choice; the table's notes give the setting, the steps it
took and its confirmation against plain.

Output: per model a table of median step ms and the ratio gluon/legato (>1: legato faster);
JSON in benchmarks/results/mxnet_scheduler.json, a plot with --plot.
Run: `.venv-mxnet/bin/python benchmarks/mxnet_scheduler.py` (as root: unshare and tc).
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
WORKERS = str(HERE / "_mxnet_scheduler_workers.py")
METHODS = ("gluon", "legato")


def _tune_arg(text: str):
    """--tune: 1 (the defaults) or a JSON object of TuneSettings fields, checked here."""
    from legato.core.scheduler.tune import TuneSettings

    value = True if text.strip() in ("1", "true") else json.loads(text)
    try:
        TuneSettings.from_arg(value)
    except Exception as err:  # ConfigError, TypeError
        raise argparse.ArgumentTypeError(str(err)) from err
    return value


def inner(args: argparse.Namespace) -> int:
    """Inside the namespace: one job per model; print one RATE_RESULT line."""
    from legato.launch import run_mxnet_ps_job

    settings = {k: v for k, v in (("partition_bytes", args.partition_bytes),
                                  ("credit_bytes", args.credit_bytes),
                                  ("merge_bytes", args.merge_bytes)) if v is not None}
    settings["policy"] = args.policy
    if args.tune is not None:
        settings["tune"] = args.tune
    out = {"rate": args.inner_rate, "models": {}}
    for model in args.models:
        job = run_mxnet_ps_job(WORKERS + ":run", 2, timeout_s=args.job_timeout,
                               args=[model, args.steps, args.warmup, args.rounds, settings,
                                     args.batch.get(model), args.timeline and
                                     f"{args.timeline}.{rate_tag(args.inner_rate)}"],
                               python=sys.executable)
        results = [json.loads(line.split("RESULT ", 1)[1]) for p in job.procs
                   for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        out["models"][model] = results[0]
        print(f"  {model} at {rate_label(args.inner_rate)} done", file=sys.stderr, flush=True)
    print("RATE_RESULT " + json.dumps(out), flush=True)
    return 0


def run_rate(rate: int, args: argparse.Namespace, passthrough: list[str]) -> dict:
    proc = run_shaped(rate, [sys.executable, str(Path(__file__).resolve()), "--inner-rate",
                             str(rate), *passthrough], args.rate_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RATE_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise SystemExit(f"rate {rate_label(rate)} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-4000:]}")


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for res in results:
        for model, entry in res["models"].items():
            med = {m: statistics.median(entry["times"][m]) * 1e3 for m in METHODS}
            rows.append({
                "model": model, "rate": res["rate"], "median_ms": med,
                "min_ms": {m: min(entry["times"][m]) * 1e3 for m in METHODS},
                "samples_ms": {m: [t * 1e3 for t in entry["times"][m]] for m in METHODS},
                "ratio": med["gluon"] / med["legato"],
                "FB_ms": entry["FB"] * 1e3, "C_ms": entry["C"] * 1e3,
                "cpu_ms": {m: entry["cpu"][m] * 1e3 for m in METHODS},
                "grad_bytes": entry["grad_bytes"], "batch": entry["batch"],
                "max_param_diff": entry["max_param_diff"], "legato": entry["legato"],
                "messages_per_step": entry["messages_per_step"],
                "steps_each": entry["steps_each"], "trace": entry.get("trace"),
                "tuning_steps": entry.get("tuning_steps", 0), "tuner": entry.get("tuner")})
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        first = next(r for r in rows if r["model"] == model)
        print(f"\n{model} (batch {first['batch']} per worker, {first['grad_bytes'] / 2**20:.1f} "
              f"MiB of gradients, {first['messages_per_step']} legato messages): median step "
              f"ms of {args.rounds} blocks of {args.steps} steps; ratio = gluon/legato, >1 is "
              "faster")
        print(f"{'rate':>13} {'gluon':>9} {'legato':>9} {'ratio':>7} {'':>8} {'FB':>7} "
              f"{'C':>7} {'cpu gluon':>10} {'cpu legato':>10} {'max |dw|':>9}")
        for r in (r for r in rows if r["model"] == model):
            verdict = "faster" if r["ratio"] >= 1 else "slower"
            print(f"{rate_label(r['rate']):>13} {r['median_ms']['gluon']:>9.1f} "
                  f"{r['median_ms']['legato']:>9.1f} {r['ratio']:>6.2f}x {verdict:>8} "
                  f"{r['FB_ms']:>7.1f} {r['C_ms']:>7.1f} {r['cpu_ms']['gluon']:>10.1f} "
                  f"{r['cpu_ms']['legato']:>10.1f} "
                  # after tuning legato has taken more steps than gluon: not comparable
                  f"{'n/a' if r['tuning_steps'] else format(r['max_param_diff'], '.2g'):>9}")
    for r in rows:
        if r["tuner"]:
            conf = r["tuner"]["confirmation"] or {}
            print(f"{r['model']} at {rate_label(r['rate'])}: tuned in {r['tuning_steps']} "
                  f"steps ({len(r['tuner']['trials'])} trials, {r['tuner']['sampler']}) to "
                  f"{r['legato']}; best/plain {conf.get('ratio', float('nan')):.3f} "
                  f"({conf.get('verdict')})")
    print(f"\nlegato: {rows[0]['legato']}; cores: {os.cpu_count()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0,4000,2000,1000",
                        help="loopback rates in Mbit/s, 0 = unshaped (comma-separated)")
    parser.add_argument("--models", default="mlp,cnn", type=lambda s: s.split(","))
    parser.add_argument("--batch", default={}, type=lambda s: {
        k: int(v) for k, v in (kv.split("=") for kv in s.split(","))},
        help="batch per worker, e.g. mlp=256,cnn=32 (default: the worker file's)")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=8, help="timed blocks per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--policy", default="bytescheduler", help="legato's policy")
    parser.add_argument("--partition-bytes", type=int, default=None)
    parser.add_argument("--credit-bytes", type=int, default=None)
    parser.add_argument("--merge-bytes", type=int, default=None)
    parser.add_argument("--tune", type=_tune_arg, default=None, metavar="JSON",
                        help="tune legato online before the timed rounds (untimed): 1, or "
                             'TuneSettings fields as JSON, e.g. \'{"trials": 10, '
                             '"steps_per_trial": 4}\'')
    parser.add_argument("--job-timeout", type=float, default=400)
    parser.add_argument("--rate-timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, default=RESULTS / "mxnet_scheduler.json")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of step times")
    parser.add_argument("--timeline", default=None, metavar="PREFIX",
                        help="after the timed rounds, run legato once more with a trace, to "
                             "PREFIX.RATE.MODEL.legato.json, and print where its steps went "
                             "(legato timeline)")
    parser.add_argument("--inner-rate", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner_rate is not None:
        return inner(args)
    problem = shaping_problem()
    if problem:
        print(f"mxnet scheduler benchmark: {problem}", file=sys.stderr)
        return 2
    passthrough = ["--models", ",".join(args.models), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--rounds", str(args.rounds), "--job-timeout",
                   str(args.job_timeout), "--policy", args.policy]
    if args.batch:
        passthrough += ["--batch", ",".join(f"{k}={v}" for k, v in args.batch.items())]
    args.timeline = trace_prefix(parser, args.timeline)
    for flag, value in (("--partition-bytes", args.partition_bytes),
                        ("--credit-bytes", args.credit_bytes),
                        ("--merge-bytes", args.merge_bytes), ("--timeline", args.timeline),
                        ("--tune", args.tune and json.dumps(args.tune))):
        if value is not None:
            passthrough += [flag, str(value)]
    load_before = os.getloadavg()
    results = []
    for rate in (parse_rate(r) for r in args.rates.split(",") if r):
        print(f"rate {rate_label(rate)} ...", file=sys.stderr, flush=True)
        results.append(run_rate(rate, args, passthrough))
    rows = summarize(results)
    print_table(rows, args)
    for row in rows:  # --timeline: where legato's steps went
        if row["trace"]:
            row["breakdown"] = step_breakdown(read_trace(row["trace"]), skip=args.warmup)
            print(f"\n{row['model']} at {rate_label(row['rate'])}, legato ({row['trace']}):\n"
                  f"{format_breakdown(row['breakdown'])}")
    # Another job on this machine skews both methods' times (FB above its usual value shows it).
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "mxnet_scheduler", "cores": os.cpu_count(),
                                     "steps": args.steps, "rounds": args.rounds,
                                     "warmup": args.warmup, "loadavg": load, "rows": rows},
                                    indent=2))
    if args.plot:
        plot_step_times(rows, METHODS, args.plot, title="MXNet {model}, 2 workers + 1 server")
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
