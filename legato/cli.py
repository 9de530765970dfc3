"""The `legato` command."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

from legato import __version__

__all__ = ["main"]

BENCHMARKS = {
    "native-queue": "native_queue.py",
    "scheduler": "scheduler_step_time.py",
}


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
        print(f"=== legato bench {name}: {script.relative_to(root)} ===", flush=True)
        status |= subprocess.call([sys.executable, str(script), *args.bench_args])
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legato",
        description="legato: communication scheduling, pipeline parallelism, graph "
                    "superoptimization and coded inference for existing PyTorch, TensorFlow "
                    "and MXNet jobs.")
    parser.add_argument("--version", action="version", version=f"legato {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("doctor", help="show which frameworks, backends and native paths are "
                                      "usable here, and why not")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object keyed by component instead of a table")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("demo", help="run the tour of legato's capabilities on built-in models")
    p.add_argument("--section", action="append", metavar="NAME",
                   help="run only this section (repeatable); see --list")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ and print its ratios")
    p.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark ('all' for every one)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments passed to the benchmark script (after --)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("legato: error: a command is required (doctor, demo, bench)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "bench_args", None) and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
