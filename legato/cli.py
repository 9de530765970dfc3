"""The `legato` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from legato import __version__

__all__ = ["main"]

BENCHMARKS = {
    "native-queue": "native_queue.py",
    "parity": "parity_serving.py",
    "pipeline": "pipeline_training.py",
    "planner": "pipeline_planner.py",
    "rewrite": "rewrite_zoo.py",
    "rewrite-corpus": "rewrite_corpus.py",
    "scheduler": "scheduler_step_time.py",
    "tensorflow-scheduler": "tensorflow_scheduler.py",
    "mxnet-scheduler": "mxnet_scheduler.py",
}
# Benchmarks that run in another virtualenv than legato's own (MXNet needs numpy < 1.24).
BENCHMARK_VENVS = {"mxnet-scheduler": ".venv-mxnet"}


def _cmd_doctor(args: argparse.Namespace) -> int:
    from legato import doctor

    report = doctor.collect()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(doctor.format_table(report))
    return 0 if doctor.core_usable(report) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from legato import demo

    if args.list:
        print("\n".join(demo.SECTIONS))
        return 0
    return demo.run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from legato.doctor import repo_root

    root = repo_root()
    if root is None or not (root / "benchmarks").is_dir():
        print("legato bench: benchmarks/ not found; run it from a source checkout of legato "
              "(pip install -e .)", file=sys.stderr)
        return 2
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    status = 0
    for name in names:
        script = root / "benchmarks" / BENCHMARKS[name]
        python = sys.executable
        if name in BENCHMARK_VENVS:
            python = str(root / BENCHMARK_VENVS[name] / "bin" / "python")
            if not Path(python).exists():
                print(f"legato bench {name}: {python} not found; it runs in "
                      f"{BENCHMARK_VENVS[name]} (make setup builds it)", file=sys.stderr)
                status |= 2
                continue
        print(f"=== legato bench {name}: {script.relative_to(root)} ===", flush=True)
        status |= subprocess.call([python, str(script), *args.bench_args])
    return status


def _cmd_plan(args: argparse.Namespace) -> int:
    from legato.core.errors import LegatoError
    from legato.core.pipeline import LayerProfile, Topology, parse_bytes, plan
    from legato.core.pipeline.predict import predict

    try:
        profile = (LayerProfile.from_pipedream(args.profile) if args.from_pipedream
                   else LayerProfile.load(args.profile))
        if (args.workers is None) == (args.topology is None):
            raise LegatoError("give either --workers N (one level) or --topology 4x4 (workers "
                              "per level, innermost first)")
        topology = (Topology.flat(args.workers, args.bandwidth or "1GB/s")
                    if args.workers is not None
                    else Topology.parse(args.topology, args.bandwidth or "1GB/s"))
        memory = parse_bytes(args.memory, what="--memory") if args.memory else None
        result = plan(profile, topology, mode=args.mode, objective=args.objective,
                      microbatches=args.microbatches,
                      activation_compression_ratio=args.activation_compression_ratio,
                      memory_bytes=memory, straight=args.straight,
                      fewer_machines=args.fewer_machines, max_states=args.max_states,
                      keep_tied=True if args.keep_tied else None,
                      boundary_slack=args.boundary_slack)
        prediction = None
        if args.simulate:
            prediction = predict(profile, result, args.simulate,
                                 microbatches=args.microbatches or 8)
        if args.output:
            if Path(args.output).resolve() == Path(args.profile).resolve():
                raise LegatoError(f"-o {args.output} is the profile itself; write the plan to "
                                  "another file")
            result.save(args.output)
        if args.gantt:
            if prediction is None:
                raise LegatoError("--gantt draws a simulated schedule; add --simulate SCHEDULE")
            prediction.result.gantt(args.gantt)
    except LegatoError as err:
        print(f"legato plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = result.to_json()
        if prediction is not None:
            r = prediction.result
            out["simulation"] = {"schedule": r.schedule, "microbatches": args.microbatches or 8,
                                 "makespan_s": r.makespan_s,
                                 "time_per_minibatch_s": prediction.time_per_minibatch_s,
                                 "bubble_fraction": r.bubble_fraction,
                                 "peak_memory_bytes": {str(k): v for k, v in
                                                       r.peak_memory_bytes.items()}}
        print(json.dumps(out, indent=1))
        return 0
    print(result.describe())
    if prediction is not None:
        r = prediction.result
        print(f"simulated {r.schedule} with {args.microbatches or 8} microbatches: makespan "
              f"{r.makespan_s * 1e3:.1f} ms, {prediction.time_per_minibatch_s * 1e3:.1f} ms per "
              f"minibatch, bubble {r.bubble_fraction:.1%}")
        for rank, peak in sorted(r.peak_memory_bytes.items()):
            print(f"  rank {rank}: peak memory {peak / 2**30:.2f} GiB")
    if args.output:
        print(f"plan written to {args.output}")
    if args.gantt:
        print(f"Gantt chart written to {args.gantt}")
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    if args.action == "generate":
        return _cmd_rules_generate(args)
    from legato.core.errors import LegatoError
    from legato.core.rewrite.pattern import load_rules, save_rules
    from legato.core.rewrite.rules import RULES_DIR
    from legato.core.rewrite.prove import verify_formal
    from legato.core.rewrite.verify import verify_numeric

    if args.action != "verify":
        print(f"legato rules: unknown action {args.action!r}; use verify", file=sys.stderr)
        return 2
    files = [Path(f) for f in args.files] or sorted(RULES_DIR.glob("*.json"))
    failed = 0
    results = []
    try:
        for path in files:
            rules = load_rules(path)
            checked = []
            for rule in rules:
                try:
                    record = verify_numeric(rule, trials=args.trials)
                    status = record.pop("numeric")
                    formal = verify_formal(rule)
                except Exception as err:  # noqa: BLE001 (one broken rule must not stop the rest)
                    record, status = {"detail": f"{type(err).__name__}: {err}"}, "error"
                    formal = {"z3": "not run"}
                failed += status != "passed" or formal["z3"] != "proved"
                results.append({"file": str(path), "rule": rule.name, "numeric": status,
                                "numeric_detail": record.get("detail", ""), **formal})
                if not args.json:
                    print(f"{path.name}: {rule.name}: numeric {status} "
                          f"({record.get('detail', '')}); z3 {formal['z3']} "
                          f"({formal.get('z3_detail', '')})")
                checked.append(rule.with_verification(
                    numeric=status, numeric_detail=record.get("detail", ""), **formal))
            if args.write:
                meta = json.loads(path.read_text()).get("meta", {})
                save_rules(path, checked, meta=meta)
    except LegatoError as err:
        print(f"legato rules: {err}", file=sys.stderr)
        return 2
    if args.json:
        _print_json({"rules": results, "failed": failed})
    return 1 if failed else 0


def _cmd_rules_generate(args: argparse.Namespace) -> int:
    from legato.core.errors import LegatoError
    from legato.core.rewrite.generate import generate_rules, parse_shapes
    from legato.core.rewrite.pattern import save_rules

    if args.files:
        print(f"legato rules generate: takes no rule files ({' '.join(args.files)}); name the "
              "output with -o rules.json", file=sys.stderr)
        return 2
    if not args.output:
        print("legato rules generate: -o rules.json is required", file=sys.stderr)
        return 2
    if args.ship and args.no_verify:
        print("legato rules generate: --ship keeps rules that passed the float64 check; drop "
              "--no-verify", file=sys.stderr)
        return 2
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        print(f"legato rules generate: {out} exists; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        bar = bars.get(stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    try:
        result = generate_rules(
            args.max_ops, ops=args.ops.split(",") if args.ops else None, seed=args.seed,
            envs=parse_shapes(args.shapes) if args.shapes else None, max_vars=args.max_vars,
            time_limit_s=args.time_limit, verify=not args.no_verify,
            formal=args.z3 or args.ship, progress=progress)
        if args.ship:
            result.keep_shippable()
    except LegatoError as err:
        print(f"legato rules generate: {err}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    save_rules(out, result.rules, meta=result.meta())
    if args.json:
        _print_json({"output": str(out), "rules": len(result.rules),
                     "dropped": [rule.name for rule, _ in result.failed], **result.meta()})
        return 0
    print(result.summary())
    for rule, record in result.failed:
        print(f"dropped by numeric verification: {rule.name}: {rule.doc} "
              f"({record.get('detail', '')})", file=sys.stderr)
    print(f"{len(result.rules)} rules written to {out}")
    return 0


class _PhaseBar:
    """A long command's phases on stderr: a tqdm bar on a terminal (when tqdm is installed),
    else the phase names come as log lines (INFO); nothing with --quiet."""

    def __init__(self, what: str, *, quiet: bool) -> None:
        self.what = what
        self.bar = None
        self.on = not quiet and sys.stderr.isatty()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.on:
            return
        if self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                self.on = False
                return
            self.bar = tqdm(total=total, desc=self.what, file=sys.stderr, leave=False)
        self.bar.set_postfix_str(phase)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "_PhaseBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_parity(args: argparse.Namespace) -> int:
    from legato.core.errors import LegatoError

    if args.k < 2 or args.base_epochs < 1 or args.parity_steps < 1:
        print("legato parity train: --k must be >= 2, --base-epochs and --parity-steps >= 1",
              file=sys.stderr)
        return 2
    out = Path(args.output)
    # the output folder is checked before minutes of training, not after
    if out.exists() and not out.is_dir():
        print(f"legato parity train: -o {out} is a file, not a folder; the trained models go "
              "into a folder (it is created if missing)", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"legato parity train: cannot create the output folder {out}: {err.strerror}",
              file=sys.stderr)
        return 2
    if not os.access(out, os.W_OK | os.X_OK):
        print(f"legato parity train: the output folder {out} is not writable",
              file=sys.stderr)
        return 2
    existing = [n for n in ("base.onnx", "parity.onnx", "backup.onnx", "report.json")
                if (out / n).exists()]
    if existing and not args.overwrite:
        print(f"legato parity train: {out} already holds {', '.join(existing)}; pass "
              "--overwrite to replace them", file=sys.stderr)
        return 2
    try:
        from legato.adapters.torch.parity import train_parity_pair

        with _PhaseBar("legato parity train", quiet=args.quiet) as bar:
            report = train_parity_pair(args.dataset, args.k, args.encoder, out,
                                       base_epochs=args.base_epochs,
                                       parity_steps=args.parity_steps, seed=args.seed,
                                       time_limit_s=args.time_limit, progress=bar)
    except LegatoError as err:
        print(f"legato parity train: {err}", file=sys.stderr)
        return 2
    if args.json:
        _print_json({**report, "output": str(out)})
        return 0
    print(f"{args.dataset}, k={args.k}, {args.encoder} encoder: base accuracy "
          f"{report['base_accuracy']:.2%}; on {report['reconstructions']} rebuilt test "
          f"predictions, reconstruction accuracy {report['reconstruction_accuracy']:.2%} and "
          f"degraded-mode accuracy {report['degraded_accuracy']:.2%} (a default answer: "
          f"{report['default_answer_accuracy']:.2%}, the cheap backup model: "
          f"{report['backup_accuracy']:.2%}); {report['seconds']:.0f} s")
    print(f"wrote {out / 'base.onnx'}, {out / 'parity.onnx'}, {out / 'backup.onnx'} (a cheap "
          f"backup model, for --policy backup), {out / 'report.json'}")
    return 0


def _listen_error(err: OSError, host: str, port: int) -> str:
    """One line for a server that could not start listening (or otherwise hit the OS)."""
    import errno

    if err.errno == errno.EADDRINUSE:
        return (f"cannot listen on {host}:{port}: the address is in use (another server "
                "there?); pick another --port, or --port 0 for any free one")
    if err.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
        return f"cannot listen on {host}:{port}: {err.strerror}; check --host and --port"
    return f"{type(err).__name__}: {err}"


def _cmd_worker(args: argparse.Namespace) -> int:
    from legato.core.errors import LegatoError
    from legato.core.parity.faults import FaultSpec
    from legato.core.parity.worker import serve

    for model in args.model:
        if not Path(model).is_file():
            print(f"legato worker: {model} does not exist", file=sys.stderr)
            return 2
    try:
        FaultSpec.parse(args.inject)
        serve(args.model, host=args.host, port=args.port, threads=args.threads,
              inject=args.inject, exit_with_parent=args.exit_with_parent,
              max_batch=args.max_batch,
              ready=lambda port: print(f"legato worker: serving {', '.join(args.model)} on "
                                       f"{args.host}:{port}", flush=True))
    except LegatoError as err:
        print(f"legato worker: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"legato worker: {_listen_error(err, args.host, args.port)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from legato.core.errors import LegatoError
    from legato.core.parity.frontend import ServeConfig, serve

    import dataclasses

    config = ServeConfig(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(ServeConfig)})
    try:
        config.check()
        serve(config, ready=lambda port: print(
            f"legato serve: {config.policy} policy, {config.workers} workers (+{config.extra} "
            f"extra), k={config.k}, deadline {config.deadline_ms:g} ms, listening on "
            f"http://{config.host}:{port}", flush=True))
    except LegatoError as err:
        print(f"legato serve: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"legato serve: {_listen_error(err, config.host, config.port)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _cmd_loadgen(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from legato.core.errors import LegatoError
    from legato.core.parity import datasets
    from legato.core.parity.loadgen import run_load

    if args.rate <= 0 or args.queries < 1 or args.timeout_s <= 0:
        print("legato loadgen: --rate and --timeout-s must be > 0, --queries >= 1",
              file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print(f"legato loadgen: --url {args.url!r} is not an http:// URL", file=sys.stderr)
        return 2
    try:
        ds = datasets.load(args.dataset, seed=args.seed)
        report = asyncio.run(run_load(args.url, [x[None] for x in ds.x_test], args.rate,
                                      n=args.queries, seed=args.seed,
                                      deadline_ms=args.deadline_ms, timeout_s=args.timeout_s))
    except LegatoError as err:
        print(f"legato loadgen: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{report['queries_sent']} sent, {report['replies']} replies, errors "
              f"{report['errors'] or 'none'}; p50 {fmt(report['p50_ms'])} ms, p99 "
              f"{fmt(report['p99_ms'])} ms, p99.9 {fmt(report['p99.9_ms'])} ms; by source "
              f"{report['by_source']}; goodput {fmt(report['goodput_qps'])} qps")
    return 0 if report["replies"] == report["queries_sent"] else 1


class _SearchProgress:
    """The search's progress on stderr: graphs explored, best predicted cost, elapsed time; one
    updating line on a terminal, a line every `interval_s` seconds otherwise."""

    def __init__(self, stream=None, *, interval_s: float = 5.0, clock=None) -> None:
        import time

        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock or time.monotonic
        self.interval_s = interval_s if not self.tty else 0.1
        self.start = self.last = self.clock()
        self.shown = False

    def __call__(self, explored: int, best_cost_s: float) -> None:
        now = self.clock()
        if now - self.last < self.interval_s and not (self.tty and not self.shown):
            return
        self.last = now
        text = (f"searching: {explored} graphs explored, best predicted "
                f"{best_cost_s * 1e3:.3f} ms, {now - self.start:.1f} s")
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from legato.core.errors import LegatoError
    from legato.core.rewrite import modelio
    from legato.core.rewrite.optimize import optimize_file

    def fail(message: str) -> int:
        print(f"legato rewrite: {message}", file=sys.stderr)
        return 2

    try:
        shapes = dict(modelio.parse_input_shape(s) for s in args.input_shape or [])
    except LegatoError as err:
        return fail(str(err))
    # optimize_file refuses an output path that cannot or must not be written, and a model it
    # cannot read, before the search starts
    progress = None if args.quiet else _SearchProgress()
    try:
        report = optimize_file(args.model, args.output, overwrite=args.overwrite,
                               input_shapes=shapes,
                               freeze_initializer_inputs=args.freeze_initializer_inputs,
                               alpha=args.alpha, budget=args.budget,
                               time_limit_s=args.time_limit, level=args.ort_level,
                               threads=args.threads, min_speedup=args.min_speedup,
                               use_cache=not args.no_cache, explain=args.explain,
                               progress=progress)
    except LegatoError as err:
        return fail(str(err))
    except OSError as err:                  # the output folder went away or filled up
        return fail(f"cannot write {args.output}: {type(err).__name__}: {err}")
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        _print_json({**report.to_json(), "output": str(args.output)})
        return 0
    print(report.explain() if args.explain else report.reason)
    if not args.explain:
        for note in report.notes:
            print(f"note: {note}")
    print(f"written: {args.output}" + ("" if report.accepted else " (the original model)"))
    return 0


def _print_json(obj) -> None:
    """One JSON document on stdout; NaN and infinities (not JSON) become null."""
    import math

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    print(json.dumps(clean(obj), indent=1, default=str))


LOG_LEVELS = ("debug", "info", "warning", "error")


def _finite(text: str) -> float:
    """A float option: NaN and infinities are refused by argparse (exit 2), as a typo is."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _output_options(parser: argparse.ArgumentParser, default=None) -> None:
    """-v, --log-level and -q: accepted before and after every command."""
    def flag(value):
        return value if default is None else default

    parser.add_argument("-v", "--verbose", action="store_true", default=flag(False),
                        help="log at debug level (as --log-level debug)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=flag(None),
                        help="logging threshold (default: info)")
    parser.add_argument("-q", "--quiet", action="store_true", default=flag(False),
                        help="no progress bars or progress lines; log warnings and errors only")


def _parser_doctor(add) -> None:
    """`legato doctor`."""
    p = add("doctor", help="show which frameworks, backends and native paths are "
                           "usable here, and why not")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object keyed by component instead of a table")
    p.set_defaults(func=_cmd_doctor)


def _parser_demo(add) -> None:
    """`legato demo`."""
    p = add("demo", help="run the tour of legato's capabilities on built-in models")
    p.add_argument("--section", action="append", metavar="NAME",
                   help="run only this section (repeatable); see --list")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.set_defaults(func=_cmd_demo)


def _parser_plan(add) -> None:
    """`legato plan`."""
    from legato.core.pipeline.planner import MODES, OBJECTIVES
    from legato.core.pipeline.schedules import SCHEDULES

    p = add(
        "plan", help="partition a profiled model into pipeline stages (PipeDream's planner)",
        description="Plan pipeline-parallel training: which layers form each stage, how many "
                    "workers replicate it, and the predicted time per minibatch against data "
                    "parallelism. PROFILE is a legato profile (JSON) or, with --from-pipedream, "
                    "PipeDream's graph.txt.")
    p.add_argument("profile", metavar="PROFILE")
    p.add_argument("--from-pipedream", action="store_true",
                   help="PROFILE is PipeDream's graph.txt (times in ms)")
    p.add_argument("--workers", type=int, metavar="N", help="N workers on one level")
    p.add_argument("--topology", metavar="AxB",
                   help="workers per level, innermost first: 4x4 = 4 servers of 4 GPUs")
    p.add_argument("--bandwidth", metavar="B[,B...]",
                   help="bandwidth per level, innermost first (10GB/s,1.25GB/s; bits as "
                        "10Gbit/s); default 1GB/s")
    p.add_argument("--mode", choices=MODES, default="pipedream",
                   help="cost arithmetic: PipeDream's released optimizer (default) or the "
                        "paper's equations")
    p.add_argument("--objective", choices=OBJECTIVES, default="async",
                   help="async: PipeDream's 1F1B (slowest stage); sync: GPipe/1F1B-flush "
                        "makespan (needs --microbatches)")
    p.add_argument("--microbatches", type=int, metavar="M",
                   help="microbatches per minibatch (sync objective, --simulate; default 8)")
    p.add_argument("--activation-compression-ratio", type=_finite, metavar="R",
                   help="pipedream mode: count activation transfer, divided by R")
    p.add_argument("--memory", metavar="SIZE", help="memory cap per worker (16GiB, 16GB)")
    p.add_argument("--straight", action="store_true", help="no stage replication")
    p.add_argument("--fewer-machines", action="store_true",
                   help="allow plans that leave workers idle")
    p.add_argument("--boundary-slack", type=_finite, default=0.02, metavar="F",
                   help="profiles of traced models: move each cut to the outermost module "
                        "boundary whose plan is at most F slower than the best (default 0.02; "
                        "0 keeps the best plan's cuts)")
    p.add_argument("--keep-tied", action="store_true",
                   help="keep layers sharing a parameter (tied embedding and head) in one "
                        "stage also under the sync objective (the async objective always does)")
    p.add_argument("--max-states", type=int, metavar="N",
                   help="cut points searched exactly before the graph is linearized "
                        "(default 1000 for one level, 500 for several)")
    p.add_argument("--simulate", metavar="SCHEDULE",
                   choices=list(SCHEDULES),
                   help="also simulate the plan under this schedule")
    p.add_argument("--gantt", metavar="PNG", help="with --simulate: draw its Gantt chart")
    p.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan as JSON")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)


def _parser_rewrite(add) -> None:
    """`legato rewrite`."""
    p = add(
        "rewrite", help="rewrite an ONNX model into a faster equivalent (TASO-style search)",
        description="Search for a faster equivalent graph with verified rules, measured in "
                    "onnxruntime; the result is written only if measured faster with equal "
                    "outputs, otherwise the original is written and the reason printed. Any "
                    "IR version from 3 and opset from 7; the output stays valid for the "
                    "input's IR version, keeps its symbolic dimensions, and is written with "
                    "external data (OUT.data) when the input had it or it exceeds 2 GB. -o "
                    "must be a regular file or a new path in a writable folder, checked "
                    "before the search (exit 2 otherwise).")
    p.add_argument("model", metavar="in.onnx")
    p.add_argument("-o", "--output", required=True, metavar="out.onnx")
    p.add_argument("--alpha", type=_finite, default=1.05,
                   help="keep candidates up to alpha x the best cost, or within twice their "
                        "measured error of it (default 1.05)")
    p.add_argument("--budget", type=int, default=200, help="graphs explored at most")
    p.add_argument("--time-limit-s", "--time-limit", dest="time_limit", type=_finite,
                   default=60.0, metavar="S",
                   help="wall-clock limit of the graph search in seconds (default 60; both "
                        "searches together when the guard has it search again), "
                        "checked between graphs: the graph under way is finished and the "
                        "costing of the input model's operators (slow only on an empty cost "
                        "cache) is not cut short; reading the model and the final A/B "
                        "measurement come on top")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                   help="static shape to search and time with for an input with symbolic "
                        "dimensions (repeatable); the output keeps the symbolic dimensions")
    p.add_argument("--no-cache", action="store_true",
                   help="measure operator costs afresh, without reading or writing the cost "
                        "cache (as LEGATO_NO_COST_CACHE=1)")
    p.add_argument("--freeze-initializer-inputs", action="store_true",
                   help="let rules fold initializers that are also graph inputs (IR >= 4 "
                        "makes them overridable at run time, so by default they stay inputs); "
                        "the output no longer lists them as inputs")
    p.add_argument("--ort-level", choices=["disabled", "basic", "extended", "all"],
                   default="all", help="onnxruntime optimization level to measure under")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--min-speedup", type=_finite, default=1.03, metavar="X",
                   help="keep the rewrite only if two A/B runs both measure it X times faster "
                        "(median of the per-round ratios) and faster in three rounds of four "
                        "(default 1.03)")
    p.add_argument("--explain", action="store_true",
                   help="print the rules applied, costs and measurements, how many places "
                        "each rule matches, and each other rule's closest near-miss")
    p.add_argument("--overwrite", action="store_true",
                   help="allow -o to be the input file (also through a symlink); its external "
                        "data file is never overwritten")
    p.add_argument("--json", action="store_true",
                   help="print the report (decision, costs, measurements, search) as JSON")
    p.set_defaults(func=_cmd_rewrite)


def _parser_rules(add) -> None:
    """`legato rules`."""
    p = add("rules", help="verify or generate rewrite rule files",
            description="legato rules verify [FILE ...] [--write]: prove every rule "
                        "with Z3 against the operator axioms and check it "
                        "numerically in float64 on its example shapes; --write "
                        "stores each rule's record in its file; exit 1 if any rule "
                        "is not both proved and passed. legato rules generate "
                        "--max-ops N -o rules.json: enumerate graphs of up to N "
                        "operators, pair equal ones by fingerprint, prune, verify "
                        "and write the rules (TASO section 3).")
    p.add_argument("action", choices=["verify", "generate"])
    p.add_argument("files", nargs="*", help="verify: rule files (default: the shipped ones)")
    p.add_argument("--trials", type=int, default=3,
                   help="verify: random inputs per example shape")
    p.add_argument("--write", action="store_true", help="verify: store the records in the files")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (verify: every rule's record)")
    g = p.add_argument_group("generate")
    g.add_argument("--max-ops", type=int, default=3, metavar="N",
                   help="largest graph in operators (default 3)")
    g.add_argument("--ops", metavar="OP,OP,...", help="operators (default: all of them)")
    g.add_argument("--seed", type=int, default=0, help="seed of the fingerprints (default 0)")
    g.add_argument("--shapes", metavar="SPEC",
                   help="shape environments, 'a=2,b=4,c=6,d=3,n=2,k=4,h=3,w=5;...'")
    g.add_argument("--max-vars", type=int, default=4, metavar="N",
                   help="most distinct variables per graph (default 4)")
    g.add_argument("--time-limit-s", "--time-limit", dest="time_limit", type=_finite,
                   metavar="S",
                   help="stop enumerating after S seconds and keep what was found")
    g.add_argument("--no-verify", action="store_true",
                   help="skip float64 verification of the generated rules")
    g.add_argument("--z3", action="store_true",
                   help="also record a Z3 proof attempt per rule (slow)")
    g.add_argument("--ship", action="store_true",
                   help="keep only rules proved with Z3 (implies --z3), passed in float64 and "
                        "shrinking the graph: how rules/generated.json is made")
    g.add_argument("-o", "--output", metavar="rules.json", help="the rule file to write")
    g.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.set_defaults(func=_cmd_rules)


def _parser_parity(add) -> None:
    """`legato parity`."""
    from legato.core.parity.codes import ENCODERS
    from legato.core.parity.datasets import DATASETS

    p = add("parity", help="train a parity model for coded inference",
            description="legato parity train --dataset digits|mnist5k --k K "
                        "--encoder addition|concat -o DIR: train the base model "
                        "(BaseMLP 200-100) and its parity model in PyTorch, judge "
                        "them on coding groups of test images, and write "
                        "DIR/base.onnx, DIR/parity.onnx, DIR/backup.onnx (a "
                        "linear classifier for the cheap-backup baseline) and "
                        "DIR/report.json.")
    p.add_argument("action", choices=["train"])
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--k", type=int, default=2, help="queries per coding group (default 2)")
    p.add_argument("--encoder", choices=ENCODERS, default="addition")
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="folder for base.onnx, parity.onnx and report.json")
    p.add_argument("--base-epochs", type=int, default=60, metavar="N")
    p.add_argument("--parity-steps", type=int, default=40000, metavar="N",
                   help="optimizer steps of the parity model, each on fresh random groups")
    p.add_argument("--time-limit-s", "--time-limit", dest="time_limit", type=_finite,
                   metavar="S",
                   help="stop training the parity model after S seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the training report as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files already in the output folder")
    p.set_defaults(func=_cmd_parity)


def _parser_worker(add) -> None:
    """`legato worker`."""
    p = add("worker", help="serve one ONNX model to a coded-inference frontend",
            description="legato worker --model M.onnx --port P: run the model in "
                        "onnxruntime behind legato's frame protocol on 127.0.0.1, "
                        "one request at a time, cancellable while queued; "
                        "--inject adds seeded faults (docs/parity.md).")
    p.add_argument("--model", required=True, action="append",
                   help="the .onnx model to serve (repeat to serve several; requests pick one "
                        "by index, default the first)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free one, printed)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--inject", metavar="SPEC",
                   help="faults, e.g. pause=0.03,alpha=1.5,scale_ms=10,delay_ms=0,seed=1,hog=0 "
                        "(hog=N: N busy processes beside the worker)")
    p.add_argument("--max-batch", type=int, default=1, metavar="B",
                   help="run up to B queued requests for the same model in one call "
                        "(default 1)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the process that started this worker is gone")
    p.set_defaults(func=_cmd_worker)


def _parser_serve(add) -> None:
    """`legato serve`."""
    from legato.core.parity.codes import ENCODERS
    from legato.core.parity.frontend import POLICIES as SERVE_POLICIES

    p = add("serve", help="the coded-inference serving frontend (HTTP)",
            description="legato serve --model base.onnx --parity-model parity.onnx "
                        "--k K --workers N --policy "
                        "none|replicate|hedge|parity|adaptive|full|backup "
                        "--deadline-ms D --port P: start N model workers (plus "
                        "ceil(N/k) extra for the other policies, N for full) "
                        "and serve "
                        "POST /v1/predict, GET /v1/health, GET /metrics and the "
                        "Open Inference Protocol (KServe v2: POST "
                        "/v2/models/NAME/infer, metadata, readiness) "
                        "(docs/parity.md).")
    p.add_argument("--model", required=True, help="the base model (.onnx)")
    p.add_argument("--parity-model", help="the parity model (.onnx), for --policy parity")
    p.add_argument("--k", type=int, default=2, help="queries per coding group (default 2)")
    p.add_argument("--workers", type=int, default=4, help="base model workers (default 4)")
    p.add_argument("--policy", default="parity",
                   choices=SERVE_POLICIES,
                   help="redundancy (default parity); full and backup are baselines: full "
                        "replication, and a cheap backup model (docs/parity.md)")
    p.add_argument("--backup-model", help="the cheap backup model (.onnx), for --policy "
                   "backup (legato parity train writes backup.onnx)")
    p.add_argument("--adaptive-warmup", type=int, default=200,
                   help="adaptive: responses observed before the first choice between "
                        "waiting, hedging and parity (it hedges until then; default 200)")
    p.add_argument("--hedge-ms", type=_finite,
                   help="hedge and backup: send a second copy, or use the backup's answer, "
                        "after this long (default: the 95th percentile of recent service "
                        "times)")
    p.add_argument("--deadline-ms", type=_finite, default=100.0)
    p.add_argument("--group-timeout-ms", type=_finite, default=10.0,
                   help="how long a partial coding group waits before it is padded")
    p.add_argument("--encoder", choices=ENCODERS, default="addition")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free one)")
    p.add_argument("--max-inflight", type=int, default=1000,
                   help="open queries beyond which requests get 503 with Retry-After")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker")
    p.add_argument("--max-batch", type=int, default=1, metavar="B",
                   help="each worker runs up to B queued queries in one call; coding groups "
                        "are formed per query, so they span batches (default 1)")
    p.add_argument("--inject", metavar="SPEC",
                   help="faults per worker index (base workers 0..N-1, then the extra ones; "
                        "*: all), e.g. '0:delay_ms=500;*:pause=0.01,seed=1'")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model's name in the v2 API (/v2/models/NAME/infer; default: the "
                        "base model file's name without .onnx)")
    p.set_defaults(func=_cmd_serve)


def _parser_loadgen(add) -> None:
    """`legato loadgen`."""
    from legato.core.parity.datasets import DATASETS

    p = add("loadgen", help="open-loop Poisson load on a prediction service",
            description="legato loadgen --url http://127.0.0.1:P --rate QPS "
                        "--queries N --dataset digits: POST test images to "
                        "URL/v1/predict on an absolute Poisson schedule (no "
                        "coordinated omission) and report latency percentiles "
                        "measured at the client, replies by source and goodput.")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=_finite, required=True, help="queries per second (Poisson)")
    p.add_argument("--queries", type=int, required=True, metavar="N")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-ms", type=_finite, help="what counts toward goodput")
    p.add_argument("--timeout-s", type=_finite, default=30.0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_loadgen)


def _parser_timeline(add) -> None:
    """`legato timeline`."""
    p = add("timeline", help="where each training step went, from a trace a scheduled "
                             "optimizer wrote (timeline=...)",
            description="Sum up a legato trace (ScheduledOptimizer(timeline=PATH) on any "
                        "framework, or a rank's PATH.rankN.partial.json) per step: compute, "
                        "waits at the gates, the training thread otherwise, link busy and "
                        "idle, updates; medians over the steps.")
    p.add_argument("trace", type=Path, help="the trace (JSON) to read")
    p.add_argument("--rank", type=int, default=0, help="which rank's steps (default 0)")
    p.add_argument("--skip", type=int, default=1,
                   help="leave out the first SKIP steps, as warm-up (default 1)")
    p.add_argument("--json", action="store_true", help="print the medians as one JSON object")
    p.set_defaults(func=_cmd_timeline)


def _cmd_timeline(args: argparse.Namespace) -> int:
    from legato.core.timeline import format_breakdown, read_trace, step_breakdown

    def fail(message: str) -> int:
        print(f"legato timeline: error: {message}", file=sys.stderr)
        return 2

    if args.skip < 0:
        return fail(f"--skip must be 0 or more, not {args.skip}")
    if not args.trace.is_file():
        return fail(f"{args.trace} is not a file; give the path passed as timeline=")
    try:
        result = step_breakdown(read_trace(args.trace), rank=args.rank, skip=args.skip)
    except (ValueError, OSError) as err:
        return fail(str(err))
    if args.json:
        _print_json(result)
    else:
        print(format_breakdown(result))
    return 0


def _parser_bench(add) -> None:
    """`legato bench`."""
    p = add("bench", help="run a benchmark from benchmarks/ and print its ratios")
    p.add_argument("name", choices=[*BENCHMARKS, "all"],
                   help="which benchmark ('all' for every one)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments passed to the benchmark script (after --)")
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legato",
        description="legato: communication scheduling, pipeline parallelism, graph "
                    "superoptimization and coded inference for existing PyTorch, TensorFlow "
                    "and MXNet jobs.")
    parser.add_argument("--version", action="version", version=f"legato {__version__}")
    _output_options(parser)
    # the same options after the command too (`legato rewrite -v ...`); SUPPRESS keeps a
    # subcommand's unset option from overwriting what was given before the command
    common = argparse.ArgumentParser(add_help=False)
    _output_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    for define in (_parser_doctor, _parser_demo, _parser_plan, _parser_rewrite, _parser_rules,
                   _parser_parity, _parser_worker, _parser_serve, _parser_loadgen,
                   _parser_timeline, _parser_bench):
        define(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("legato: error: a command is required (doctor, demo, plan, rewrite, rules, "
              "parity, worker, serve, loadgen, timeline, bench)", file=sys.stderr)
        return 2
    level = (args.log_level or ("debug" if args.verbose else "warning" if args.quiet
                                else "info")).upper()
    logging.basicConfig(level=getattr(logging, level),
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "bench_args", None) and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    try:
        return args.func(args)
    except ImportError as err:
        # an optional dependency the command needs: one line naming the extra that installs it
        from legato._extras import missing_message

        message = missing_message(err, f"legato {args.command}")
        if message is None:
            raise
        print(f"legato {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
