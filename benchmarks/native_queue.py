"""Per-task overhead of the native priority queue against the pure-Python queue.

Both queues have one contract (legato/core/scheduler/queue.py): the baseline is
`PythonPriorityQueue` (heapq + threading.Condition + a Python dispatcher thread), the same
semantics in pure Python. Cases, each timed as the mean cost per task over a run of N tasks:

  stream    post N tasks back to back from Python; the dispatcher thread calls an executor
            that completes each task at once (post -> dispatch -> complete, what the scheduler
            does with a backend that starts collectives asynchronously)
  pull      one thread: post, pop, complete, task after task (the pull API)
  pingpong  one task at a time: post, then wait until the dispatcher has run and completed it
            (a cross-thread hand-off each way: latency, not throughput)

First the two queues are checked to dispatch a random workload (priorities, sizes, credit,
both admission modes) in the same order. Then each case runs --repeats times alternately for
the two queues (after a warm-up); the median and minimum are printed with the ratio, and the
results go to benchmarks/results/native_queue.json.

Target (issue 2): the native queue at least 10x lower overhead than the Python one and under
5 us per task. Run: `legato bench native-queue` or `python benchmarks/native_queue.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from legato.core.scheduler import NATIVE_AVAILABLE, make_queue

RESULTS = Path(__file__).parent / "results"


def check_same_order(seed: int = 0, n: int = 2000) -> None:
    """Both queues must start the same tasks in the same order on a random workload."""
    for mode in ("overshoot", "fit"):
        rng = random.Random(seed)
        tasks = [(i, rng.randint(0, 20), rng.randint(0, 4096)) for i in range(n)]
        orders = []
        for impl in ("native", "python"):
            q = make_queue(8192, mode, impl=impl)
            crng = random.Random(seed + 1)
            order, flight = [], []
            for task in tasks:
                q.post(*task)
                while (t := q.try_pop()) is not None:
                    order.append(t.id)
                    flight.append(t.id)
                if flight and crng.random() < 0.5:
                    q.complete(flight.pop(crng.randrange(len(flight))))
            while flight or q.stats()["queued"]:
                while (t := q.try_pop()) is not None:
                    order.append(t.id)
                    flight.append(t.id)
                q.complete(flight.pop(0))
            q.shutdown()
            orders.append(order)
        if orders[0] != orders[1]:
            raise SystemExit(f"native and python queues disagree on dispatch order ({mode})")
        if sorted(orders[0]) != list(range(n)):
            raise SystemExit(f"tasks lost or duplicated ({mode})")


def case_stream(impl: str, n: int) -> float:
    q = make_queue(None, "overshoot", impl=impl)
    complete = q.complete
    q.start(lambda task: complete(task.id))
    post = q.post
    start = time.perf_counter()
    for i in range(n):
        post(i, i & 15, 4096)
    q.shutdown(timeout_s=120)
    elapsed = time.perf_counter() - start
    assert q.stats()["completed"] == n
    return elapsed / n


def case_pull(impl: str, n: int) -> float:
    q = make_queue(1 << 20, "overshoot", impl=impl)
    post, pop, complete = q.post, q.try_pop, q.complete
    start = time.perf_counter()
    for i in range(n):
        post(i, i & 15, 4096)
        complete(pop().id)
    elapsed = time.perf_counter() - start
    q.shutdown()
    return elapsed / n


def case_pingpong(impl: str, n: int) -> float:
    q = make_queue(None, "overshoot", impl=impl)
    complete = q.complete
    q.start(lambda task: complete(task.id))
    post, wait = q.post, q.wait_idle
    start = time.perf_counter()
    for i in range(n):
        post(i, 0, 4096)
        wait(10)
    elapsed = time.perf_counter() - start
    q.shutdown()
    return elapsed / n


CASES = {"stream": case_stream, "pull": case_pull, "pingpong": case_pingpong}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks per run (stream, pull)")
    parser.add_argument("--pingpong-tasks", type=int, default=5_000, help="tasks per pingpong run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per queue and case")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--json", type=Path, default=RESULTS / "native_queue.json",
                        help="where to write the results")
    args = parser.parse_args(argv)
    if not NATIVE_AVAILABLE:
        print("legato._native is not built; run `pip install -e .` (make setup)", file=sys.stderr)
        return 2
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or args.repeats < 1 or args.tasks < 1:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}" if unknown
                     else "--repeats and --tasks must be positive")

    check_same_order()
    print("check: native and python queues dispatch a random workload in the same order")
    cores = os.cpu_count()
    header = (f"{'case':<9} {'python us/task':>15} {'native us/task':>15} {'ratio':>8}   "
              f"{'':<8} (median of {args.repeats}; min in brackets; cpu, {cores} cores)")
    print(header)
    results = []
    for case in cases:
        n = args.pingpong_tasks if case == "pingpong" else args.tasks
        fn = CASES[case]
        fn("native", max(100, n // 10))  # warm-up
        fn("python", max(100, n // 10))
        times: dict[str, list[float]] = {"native": [], "python": []}
        for _ in range(args.repeats):  # alternate, so drift on a noisy machine hits both
            for impl in ("python", "native"):
                times[impl].append(fn(impl, n) * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        ratio = med["python"] / med["native"]
        print(f"{case:<9} {med['python']:>8.2f} [{low['python']:5.2f}] "
              f"{med['native']:>8.2f} [{low['native']:5.2f}] {ratio:>7.1f}x   "
              f"{'faster' if ratio >= 1 else 'slower'}")
        results.append({"case": case, "tasks": n, "repeats": args.repeats,
                        "python_us_median": med["python"], "native_us_median": med["native"],
                        "python_us_min": low["python"], "native_us_min": low["native"],
                        "ratio": ratio})
    if any(r["case"] == "stream" for r in results):
        stream = next(r for r in results if r["case"] == "stream")
        met = stream["ratio"] >= 10 and stream["native_us_median"] < 5
        print(f"target (stream): >= 10x and < 5 us/task -> {stream['ratio']:.1f}x, "
              f"{stream['native_us_median']:.2f} us: {'met' if met else 'NOT met'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "native_queue", "python": platform.python_version(), "cores": cores,
        "machine": platform.machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
