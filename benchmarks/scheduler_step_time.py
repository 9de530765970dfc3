"""Training step time of 2 gloo workers over a shaped loopback link: DDP, plain all-reduce,
Horovod, legato priority and legato bytescheduler, side by side in one run per rate.

Each rate runs in a private network namespace (`unshare -n`, as root) whose loopback is shaped
with `tc qdisc add dev lo root tbf rate R burst 256kb latency 100ms` (a burst below 64 KiB
stalls connections); "unshaped" runs in a namespace with plain loopback. Shaping loopback
limits the sum of both ranks' traffic. Per model and rate, every torch method runs in one job:
each is built (and tuned) once, then they take turns in blocks of `--steps` timed steps,
`--rounds` times (so that drift on this noisy machine hits them all alike); Horovod runs in a
horovodrun job right after. The job also measures, on each rank, forward F and backward B with
no communication and C, one all-reduce of all gradients, which give the bounds: DDP about
F + max(B, C), all-reduce after backward about F + B + C, and no schedule beats max(F + B, C).

legato bytescheduler is tuned online (tune=True: Bayesian optimization of partition and credit
sizes, and the plain pass-through as a candidate) before its timed steps; `--no-tune` runs it
with the default or given sizes. In the same job the simulator is calibrated (per-layer
forward, backward and update times on this rank; alpha and bandwidth fitted to all-reduce times
of 16 KiB to 4 MiB on the real group) and predicts each method's step time, printed beside the
measurement; `--simulate` only calibrates and predicts, without training.

`--loop amp` runs every method's training loop under bf16 autocast with a GradScaler of its
own (scaler.scale(loss).backward(), scaler.step(opt), scaler.update()); `--loop accumulate`
takes two backward passes per step (DDP: the first under no_sync; legato:
backward_passes_per_step=2; the plain all-reduce after both; Horovod: its own
backward_passes_per_step=2, and for AMP its documented GradScaler recipe, synchronize() then
scaler.step(opt) under skip_synchronize()). The ratio to DDP under a loop is the claim that
legato keeps its gain there.

`--methods ...,legato-horovod` adds legato over Horovod (`ScheduledOptimizer(backend=
"horovod")` at its defaults, no tuning) beside `hvd.DistributedOptimizer` in one horovodrun job,
in alternating blocks as the torch methods (whose `horovod` times it then gives), and prints
their ratio.

`--device cuda` puts each rank's model, inputs and gradients on `cuda:{local rank % GPUs}` (both
ranks share the GPU when there is one) and synchronizes the device before every clock reading;
gloo moves the CUDA tensors through host memory. `--backend nccl` (with `--device cuda` and one
GPU per rank) reduces over NCCL instead; on a shaped rate its ranks are told to use sockets
(NCCL_P2P_DISABLE, NCCL_SHM_DISABLE, NCCL_IB_DISABLE, NCCL_SOCKET_IFNAME=lo), so that their
traffic crosses the shaped loopback. Horovod (built for CPU here) and bytescheduler-sim (whose
start-up measurements are taken on CPU tensors only) are skipped on CUDA, with the reason
printed. `--host-loopback` runs the unshaped rate on the host's own loopback, for machines
where `unshare` or `tc` do not work. benchmarks/gpu/scheduler_gpu.sh is the prepared GPU run.

Output: one table per model (median step ms, ratio against DDP, legato against the bound),
JSON in benchmarks/results/scheduler_step_time.json (scheduler_step_time_cuda.json with `--device
cuda`) and a plot of step time against bandwidth per method (--plot). Run: `legato bench
scheduler` or `python benchmarks/scheduler_step_time.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _netns import (  # noqa: E402
    parse_rate,
    plot_step_times,
    rate_label,
    run_shaped,
    shaping_problem,
)

RESULTS = HERE / "results"
WORKERS = str(HERE / "_scheduler_workers.py")
TORCH_METHODS = ("ddp", "allreduce", "priority", "bytescheduler", "bytescheduler-sim",
                 "bytescheduler-or-plain", "plain", "ddp-hook")
ALL_METHODS = ("ddp", "allreduce", "horovod", "priority", "bytescheduler", "bytescheduler-sim",
               "bytescheduler-or-plain", "plain", "ddp-hook", "legato-horovod")
DEFAULT_METHODS = ("ddp", "allreduce", "horovod", "priority", "bytescheduler")
RANKS = 2
# Methods that do not run on --device cuda, and why (printed when they are skipped).
CUDA_SKIPS = {
    "horovod": "scripts/build_horovod.sh builds Horovod for CPU tensors (no GPU operations), "
               "and the GPU machines have no Horovod",
    "legato-horovod": "legato over Horovod needs Horovod, built here for CPU tensors only",
    "bytescheduler-sim": "defaults='simulated' takes its start-up measurements on CPU tensors "
                         "only (ScheduledOptimizer refuses it for a model on the GPU)",
    "bytescheduler-or-plain": "defaults='fixed-or-plain' takes its start-up measurements on "
                              "CPU tensors only",
}
# On a shaped rate, NCCL ranks use sockets, so their traffic crosses the shaped loopback
# (intra-node NCCL otherwise goes over peer-to-peer copies or shared memory, which no qdisc
# sees).
NCCL_SOCKET_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1",
                   "NCCL_SOCKET_IFNAME": "lo"}


def device_problem(device: str, backend: str, ranks: int = RANKS) -> str | None:
    """Why `--device device --backend backend` cannot run here (one line naming the fix), or
    None. Imports torch only when CUDA or NCCL is asked for."""
    if device == "cpu" and backend == "gloo":
        return None
    if backend == "nccl" and device != "cuda":
        return ("--backend nccl reduces CUDA tensors only; pass --device cuda with it, or "
                "--backend gloo")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "nccl" and gpus < ranks:
        return (f"--backend nccl needs one GPU per rank ({ranks}) and torch {torch.__version__}"
                f" sees {gpus} here; pass --backend gloo, which moves CUDA tensors and lets the"
                " ranks share one GPU")
    if gpus == 0:
        return (f"--device cuda needs a CUDA device and torch {torch.__version__} sees none "
                "here; run it on a GPU machine (benchmarks/gpu/scheduler_gpu.sh) or pass "
                "--device cpu")
    if backend == "nccl":
        import torch.distributed as dist

        if not dist.is_nccl_available():
            return (f"--backend nccl: torch {torch.__version__} was built without NCCL; pass "
                    "--backend gloo")
    return None


def inner(args: argparse.Namespace) -> int:
    """Inside the namespace: run every model's jobs, print one RATE_RESULT line."""
    from legato.launch import run_horovod_job, run_torch_job

    bs = {k: v for k, v in (("partition_bytes", args.partition_bytes),
                            ("credit_bytes", args.credit_bytes), ("timeline", args.timeline))
          if v is not None}
    if args.tune:
        bs["tune"] = {"trials": args.tune_trials, "sampler": args.tune_sampler}
    settings = {"bytescheduler": bs}
    out = {"rate": args.inner_rate, "models": {}}
    torch_methods = [m for m in args.methods if m in TORCH_METHODS]
    env = NCCL_SOCKET_ENV if args.backend == "nccl" and args.inner_rate else None
    for model in args.models:
        entry: dict = {}
        if torch_methods:
            job = run_torch_job(f"{WORKERS}:run", RANKS, timeout_s=args.job_timeout, env=env,
                                args=[model, torch_methods, args.steps, args.warmup, args.rounds,
                                      settings, args.simulate, args.loop, args.device,
                                      args.backend])
            results = [json.loads(line.split(" ", 1)[1]) for p in job.procs
                       for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            r0 = next(r for r in results if r["rank"] == 0)
            entry.update({k: r0[k] for k in ("F", "B", "C", "grad_bytes", "predicted", "configs",
                                             "predicted_config", "link", "layers", "device",
                                             "backend", "torch", "card")})
            # What was measured ran with the setting tuning ended with: predict that one.
            entry["predicted"].update(r0.get("predicted_actual", {}))
            entry["times"] = {m: r0["times"][m] for m in torch_methods if r0["times"][m]}
            if "horovod" in args.methods:
                entry["predicted"]["horovod"] = r0["predicted"]["ddp"]
        if "legato-horovod" in args.methods and not args.simulate:
            # side by side in one horovodrun job: its horovod times replace the per-step ones
            job = run_horovod_job(f"{WORKERS}:run_horovod_pair", RANKS,
                                  timeout_s=args.job_timeout,
                                  args=[model, args.steps, args.warmup, args.rounds])
            lines = [line for line in job.rank(0).stdout.splitlines()
                     if line.startswith("RESULT ")]
            pair = json.loads(lines[0].split(" ", 1)[1])
            entry.setdefault("times", {}).update(pair["times"])
            entry["legato_horovod"] = {k: pair.get(k) for k in ("legato", "messages_per_step",
                                                                 "startup", "check")}
        elif "horovod" in args.methods and not args.simulate:
            job = run_horovod_job(f"{WORKERS}:run_horovod", RANKS, timeout_s=args.job_timeout,
                                  args=[model, args.steps, args.warmup, args.rounds,
                                        args.loop])
            lines = [line for line in job.rank(0).stdout.splitlines()
                     if line.startswith("RESULT ")]
            entry.setdefault("times", {})["horovod"] = json.loads(
                lines[0].split(" ", 1)[1])["times"]["horovod"]
        out["models"][model] = entry
        print(f"  {model} at {rate_label(args.inner_rate)} done", file=sys.stderr, flush=True)
    print("RATE_RESULT " + json.dumps(out), flush=True)
    return 0


def run_rate(rate: int, args: argparse.Namespace, passthrough: list[str]) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--inner-rate", str(rate),
            *passthrough]
    if args.host_loopback:  # unshaped, on the host's own loopback (no namespace)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.rate_timeout)
    else:
        proc = run_shaped(rate, argv, timeout_s=args.rate_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RATE_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise SystemExit(f"rate {rate_label(rate)} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-4000:]}")


def summarize(results: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for res in results:
        for model, entry in res["models"].items():
            med = {m: statistics.median(t) * 1e3 for m, t in entry["times"].items()}
            row = {"model": model, "rate": res["rate"], "median_ms": med,
                   "predicted_ms": {m: t * 1e3 for m, t in entry.get("predicted", {}).items()
                                    if t is not None},
                   "configs": entry.get("configs", {}),
                   "predicted_config": entry.get("predicted_config"),
                   "link": entry.get("link"), "layers": entry.get("layers"),
                   "legato_horovod": entry.get("legato_horovod"),
                   "device": entry.get("device", "cpu"), "backend": entry.get("backend"),
                   "card": entry.get("card"), "torch": entry.get("torch")}
            if "F" in entry:
                f, b, c = (entry[k] * 1e3 for k in ("F", "B", "C"))
                row.update(F_ms=f, B_ms=b, C_ms=c, bound_ms=max(f + b, c),
                           ddp_model_ms=f + max(b, c), allreduce_model_ms=f + b + c,
                           grad_bytes=entry["grad_bytes"])
            rows.append(row)
    return rows


def device_label(rows: list[dict]) -> str:
    """"cpu", or the card and backend the rows ran on ("cuda:0 (NVIDIA H100 ...), gloo")."""
    row = next((r for r in rows if r.get("card")), None)
    if row is None:
        return "cpu"
    return f"{row['device']} ({row['card']}), {row['backend']}"


def print_table(rows: list[dict], methods: list[str], loop: str = "plain") -> None:
    where = device_label(rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n{model} ({loop} loop{'' if where == 'cpu' else ', ' + where}): median step "
              "ms (ratio = DDP time / method time; >1 is faster)")
        head = f"{'rate':>13} " + " ".join(f"{m:>16}" for m in methods)
        print(head + f" {'F+B':>7} {'C':>7} {'bound':>7} {'legato/bound':>12}")
        for r in (r for r in rows if r["model"] == model):
            ddp = r["median_ms"].get("ddp")
            cells = []
            for m in methods:
                t = r["median_ms"].get(m)
                if t is None:
                    cells.append(f"{'-':>16}")
                else:
                    ratio = f" ({ddp / t:.2f}x)" if ddp else ""
                    cells.append(f"{t:>8.1f}{ratio:>8}")
            extra = ""
            if "bound_ms" in r:
                best = min((r["median_ms"][m] for m in ("priority", "bytescheduler")
                            if m in r["median_ms"]), default=float("nan"))
                extra = (f" {r['F_ms'] + r['B_ms']:>7.1f} {r['C_ms']:>7.1f} "
                         f"{r['bound_ms']:>7.1f} {best / r['bound_ms']:>12.2f}")
            print(f"{rate_label(r['rate']):>13} " + " ".join(cells) + extra)
            med = r["median_ms"]
            if "legato-horovod" in med and "horovod" in med:
                print(f"{'':>13} legato over Horovod against hvd.DistributedOptimizer, side by "
                      f"side: {med['horovod'] / med['legato-horovod']:.2f}x "
                      f"({r['legato_horovod']['legato']}, "
                      f"{r['legato_horovod']['messages_per_step']} messages a step)")
                check = r["legato_horovod"].get("check")
                if check:  # the default's measured check chose
                    conf = check.get("confirmation") or {}
                    print(f"{'':>13} check: {check['chosen']} (fixed/plain "
                          f"{conf.get('ratio', float('nan')):.3f}, {conf.get('verdict')})")
                startup = r["legato_horovod"].get("startup")
                if startup:  # the default's start-up check chose
                    print(f"{'':>13} start-up: {startup['chosen']} (predicted "
                          f"{startup['best_s'] * 1e3:.1f} ms scheduled, "
                          f"{startup['plain_s'] * 1e3:.1f} ms plain; link {startup['link']})")


def print_predictions(rows: list[dict], methods: list[str]) -> None:
    """Simulator vs measurement (or the predictions alone, with --simulate)."""
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n{model}: simulated step ms (measured; error), calibrated link per rate")
        for r in (r for r in rows if r["model"] == model):
            cells = []
            for m in methods:
                p = r["predicted_ms"].get(m)
                t = r["median_ms"].get(m)
                if p is None:
                    cells.append(f"{m} -")
                elif t is None:
                    ddp = r["predicted_ms"].get("ddp")
                    cells.append(f"{m} {p:.1f}" + (f" ({ddp / p:.2f}x)" if ddp else ""))
                else:
                    cells.append(f"{m} {p:.1f} ({t:.1f}; {p / t - 1:+.0%})")
            print(f"{rate_label(r['rate']):>13}  " + ", ".join(cells))
            print(f"{'':>13}  link: {r['link']}; bytescheduler: "
                  f"{r['configs'].get('bytescheduler') or r['predicted_config']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,200,1000,unshaped",
                        help="comma-separated Mbit/s, 'unshaped' for plain loopback")
    parser.add_argument("--models", default="vgg,resnet,transformer")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of: {', '.join(ALL_METHODS)}")
    parser.add_argument("--simulate", action="store_true",
                        help="only calibrate (layer costs, link alpha and bandwidth) and print "
                             "the simulator's predicted step time of each method")
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="run bytescheduler with the given or default sizes, untuned")
    parser.add_argument("--tune-trials", type=int, default=20)
    parser.add_argument("--tune-sampler", default="gp", choices=("gp", "tpe"))
    parser.add_argument("--loop", default="plain", choices=("plain", "amp", "accumulate"),
                        help="the training loop every method runs (see above)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6,
                        help="blocks of each method, taken in turn")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where each rank computes: cuda puts rank r on cuda:{r %% GPUs}")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                        help="torch.distributed backend (nccl: --device cuda, one GPU per rank)")
    parser.add_argument("--host-loopback", action="store_true",
                        help="run on the host's own loopback, unshaped, without a network "
                             "namespace (for machines where unshare or tc fail); only with "
                             "--rates unshaped")
    parser.add_argument("--partition-bytes", type=int, default=None)
    parser.add_argument("--credit-bytes", type=int, default=None)
    parser.add_argument("--job-timeout", type=float, default=1200)
    parser.add_argument("--rate-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/scheduler_step_time.json "
                             "(scheduler_step_time_cuda.json with --device cuda)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--timeline", default=None,
                        help="write a Chrome trace of legato bytescheduler's last run here")
    parser.add_argument("--inner-rate", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(ALL_METHODS)}")
    if "legato-horovod" in args.methods and args.loop != "plain":
        parser.error("legato-horovod runs the plain loop only; leave out --loop or the method")
    if args.inner_rate is not None:
        return inner(args)
    problem = device_problem(args.device, args.backend)
    rates = [parse_rate(r) for r in args.rates.split(",") if r]
    if problem is None and args.host_loopback and any(rates):
        problem = ("--host-loopback runs on the host's loopback, which is not shaped; pass "
                   "--rates unshaped with it")
    if problem is None and not args.host_loopback:
        problem = shaping_problem()
        if problem:
            problem += " (or pass --host-loopback --rates unshaped)"
    if problem:
        print(f"scheduler benchmark: {problem}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        for method, why in CUDA_SKIPS.items():
            if method in args.methods:
                args.methods.remove(method)
                print(f"scheduler benchmark: {method} skipped on --device cuda: {why}")
        if not args.methods:
            print("scheduler benchmark: no method left to run on --device cuda; add one of "
                  f"{', '.join(m for m in ALL_METHODS if m not in CUDA_SKIPS)}", file=sys.stderr)
            return 2
    if args.json is None:
        suffix = "_cuda" if args.device == "cuda" else ""
        args.json = RESULTS / f"scheduler_step_time{suffix}.json"
    passthrough = ["--loop", args.loop, "--device", args.device, "--backend", args.backend,
                   "--models", ",".join(args.models), "--methods", ",".join(args.methods),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds",
                   str(args.rounds), "--job-timeout", str(args.job_timeout),
                   "--tune-trials", str(args.tune_trials), "--tune-sampler", args.tune_sampler]
    if args.simulate:
        passthrough.append("--simulate")
    if not args.tune:
        passthrough.append("--no-tune")
    if args.timeline:
        args.timeline = str(Path(args.timeline).resolve())
    for flag, value in (("--partition-bytes", args.partition_bytes),
                        ("--credit-bytes", args.credit_bytes), ("--timeline", args.timeline)):
        if value is not None:
            passthrough += [flag, str(value)]
    results = []
    for rate in rates:
        print(f"rate {rate_label(rate)} ...", file=sys.stderr, flush=True)
        results.append(run_rate(rate, args, passthrough))
    rows = summarize(results, args.methods)
    if not args.simulate:
        print_table(rows, args.methods, args.loop)
    print_predictions(rows, args.methods)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    card = next((r["card"] for r in rows if r.get("card")), None)
    args.json.write_text(json.dumps({"benchmark": "scheduler_step_time", "cores": os.cpu_count(),
                                     "steps": args.steps, "rounds": args.rounds,
                                     "loop": args.loop, "device": args.device,
                                     "backend": args.backend, "card": card,
                                     "torch": next((r["torch"] for r in rows if r.get("torch")),
                                                   None),
                                     "loopback": "host" if args.host_loopback
                                     else "private namespace",
                                     "rows": rows}, indent=2))
    if args.plot and not args.simulate:
        plot_step_times(rows, args.methods, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
