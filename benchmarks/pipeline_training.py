"""Pipeline training, measured: the simulator against the runtime, 1F1B against GPipe, and a
planned pipeline against data parallelism on a shaped link (issue 4, item 8).

(a) sim: a straight pipeline of an MLP (8 equal Linear+ReLU layers, batch 256) over 4 ranks
    and over 2 ranks, GPipe and 1F1B with 8 microbatches. The simulator gets the stage costs
    of `profile_pipeline` (taken on as many ranks at once as there are cores, so that memory
    bandwidth is shared as in the run), a link fitted to gloo round trips and, where ranks
    outnumber cores, processor sharing (`simulate(..., cores=)`); the runtime's step time is
    the median of --steps steps. Target: makespan error <= 15%. Also shown: the simulator given
    the per-stage action times measured in the warm-up steps of the same run ("warm-up",
    `costs_from_timeline`: what the running pipeline shares is in them) or in another
    schedule's run ("other run"); PipeDream's asynchronous 1F1B too; and ZB-H1 against 1F1B
    (step time, simulated bubble, measured idle time between actions).
(c) memory: from the same runs, the step time of 1F1B against GPipe and the peak activation
    bytes each rank held (tensors autograd saved for backward, weights excluded, measured with
    saved_tensors_hooks) next to the simulator's bound.
(b) dp: a VGG-style network (small convolutions, then 38 MB of fully connected weights; batch
    64) on 2 workers over loopback shaped with tc (`--rate` Mbit/s, in a private network
    namespace; needs root). The planner (paper mode) gets the profile and the bandwidth that a
    measured gloo all-reduce of all weights achieved, and predicts its plan's time per minibatch
    and data parallelism's. Measured: DDP's step time against the planned pipeline under
    PipeDream's asynchronous 1F1B (--minibatches per call, fill and drain included). Targets:
    measured speedup >= 1.5x where the planner predicts one, prediction within 15%.

Run: `legato bench pipeline [-- --parts sim,dp --rate 1000 --steps 7]`. Results go to
benchmarks/results/pipeline_training.json, Gantt charts to docs/img/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORKERS = str(ROOT / "benchmarks" / "_pipeline_workers.py")


def _result(job) -> dict:
    for p in job.procs:
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line.split(" ", 1)[1])
    raise SystemExit("the job printed no RESULT line:\n" + job.summary())


def part_sim(args) -> list[dict]:
    from legato.launch import run_torch_job

    out = []
    for ranks in args.ranks:
        prefix = str(ROOT / "docs" / "img" / f"pipeline_{ranks}ranks") if args.gantt else None
        job = run_torch_job(f"{WORKERS}:vs_sim", ranks, timeout_s=args.job_timeout,
                            args=["mlp", 256, 8, ["gpipe", "1f1b", "pipedream",
                                                  "interleaved-1f1b", "zb-h1"],
                                  args.steps, 2, prefix])
        res = _result(job)
        out.append(res)
        print(f"\n(a)/(c) MLP, straight pipeline over {ranks} ranks, 8 microbatches, "
              f"median of {args.steps} steps")
        print(f"  {'schedule':<16} {'measured ms':>11} {'from profile':>12} {'error':>7} "
              f"{'warm-up':>8} {'error':>7} {'other run':>9} {'error':>7}   peak activations "
              "MiB per rank: measured / simulated")
        for name, r in res["runs"].items():
            mem = " ".join(f"{a / 2**20:.1f}/{b / 2**20:.1f}" for a, b in
                           zip(r["peak_activation_bytes_measured"],
                               r["peak_activation_bytes_simulated"]))
            cal = (f"{r['calibrated_s'] * 1e3:>9.1f} {r['calibrated_error']:>+7.1%}"
                   if "calibrated_s" in r else f"{'-':>9} {'-':>7}")
            print(f"  {name:<16} {r['measured_s'] * 1e3:>11.1f} {r['simulated_s'] * 1e3:>12.1f} "
                  f"{r['error']:>+7.1%} {r['warmup_calibrated_s'] * 1e3:>8.1f} "
                  f"{r['warmup_error']:>+7.1%} {cal}   {mem}")
        print("  (warm-up: the simulator given each stage's mean action times, sends included, "
              "from the warm-up steps of the same run; other run: from the measured steps of "
              "another schedule's run)")
        g, o = res["runs"]["gpipe"], res["runs"]["1f1b"]
        print(f"  1F1B vs GPipe: throughput {g['measured_s'] / o['measured_s']:.2f}x, peak "
              f"activations on rank 0 {o['peak_activation_bytes_measured'][0] / max(1, g['peak_activation_bytes_measured'][0]):.2f}x")
        if "zb-h1" in res["runs"]:
            z = res["runs"]["zb-h1"]
            idle = lambda r: sum(r["gaps_between_actions_s"].values()) / len(  # noqa: E731
                r["gaps_between_actions_s"])
            print(f"  ZB-H1 vs 1F1B: throughput {o['measured_s'] / z['measured_s']:.2f}x; "
                  f"simulated bubble {z['bubble_simulated']:.1%} vs {o['bubble_simulated']:.1%}; "
                  f"measured idle between actions per rank {idle(z) * 1e3:.1f} ms vs "
                  f"{idle(o) * 1e3:.1f} ms; peak activations on the last rank "
                  f"{z['peak_activation_bytes_measured'][-1] / 2**20:.1f} MiB vs "
                  f"{o['peak_activation_bytes_measured'][-1] / 2**20:.1f} MiB")
    return out


def part_dp(args) -> list[dict]:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("tc"):
        print("(b) skipped: shaping loopback needs root, unshare and tc (iproute2)")
        return []
    out = []
    for rate in args.rate:
        inner = " ".join([sys.executable, str(Path(__file__).resolve()), "--inner-dp",
                          "--steps", str(args.steps), "--minibatches", str(args.minibatches),
                          "--job-timeout", str(args.job_timeout)])
        shape = f"tc qdisc add dev lo root tbf rate {rate}mbit burst 256kb latency 100ms"
        proc = subprocess.run(["unshare", "-n", "--", "sh", "-c",
                               f"ip link set lo up && {shape} && exec {inner}"],
                              capture_output=True, text=True, timeout=args.job_timeout + 60)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"(b) at {rate} Mbit/s failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        res = json.loads(line.split(" ", 1)[1])
        res["rate_mbit"] = rate
        out.append(res)
        p, m = res["plan"], res["measured"]
        err = p["speedup"] / m["speedup"] - 1
        print(f"\n(b) VGG-style, 2 workers, loopback shaped to {rate} Mbit/s (all-reduce of "
              f"the weights: {res['allreduce_s'] * 1e3:.0f} ms, {res['bandwidth_Bps'] / 1e6:.0f} "
              f"MB/s effective); median of {args.steps} steps")
        print(f"  plan {p['shape']} ({len(p['stages'])} stages): predicted pipeline "
              f"{p['time_per_minibatch_s'] * 1e3:.0f} ms, data parallel "
              f"{p['dp_time_s'] * 1e3:.0f} ms, speedup {p['speedup']:.2f}x")
        print(f"  measured: pipeline {m['pipeline_s'] * 1e3:.0f} ms per minibatch, DDP "
              f"{m['ddp_s'] * 1e3:.0f} ms, speedup {m['speedup']:.2f}x (prediction "
              f"{err:+.1%}); target >= 1.5x and within 15%: "
              f"{'met' if m['speedup'] >= 1.5 and abs(err) <= 0.15 else 'NOT met'}")
    return out


def inner_dp(args) -> int:
    from legato.launch import run_torch_job

    job = run_torch_job(f"{WORKERS}:vs_dp", 2, timeout_s=args.job_timeout,
                        args=["vgg-fc", 64, args.minibatches, args.steps, 2])
    print("RESULT " + json.dumps(_result(job)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sim,dp", help="comma list of sim (a+c) and dp (b)")
    ap.add_argument("--ranks", default="4,2", help="ranks for the sim part")
    ap.add_argument("--rate", default="1000", help="Mbit/s of the shaped link (dp part)")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--minibatches", type=int, default=16,
                    help="PipeDream minibatches per step() call (dp part)")
    ap.add_argument("--job-timeout", type=float, default=900)
    ap.add_argument("--no-gantt", dest="gantt", action="store_false")
    ap.add_argument("--inner-dp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner_dp:
        return inner_dp(args)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.rate = [int(r) for r in args.rate.split(",")]
    parts = args.parts.split(",")
    unknown = set(parts) - {"sim", "dp"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; use sim and/or dp")
    results = {}
    if "sim" in parts:
        results["sim"] = part_sim(args)
    if "dp" in parts:
        results["dp"] = part_dp(args)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "pipeline_training.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
