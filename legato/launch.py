"""Launch multi-process jobs on 127.0.0.1: torch.distributed ranks, horovodrun, an MXNet PS.

Used by the tests, the benchmarks and `legato demo`. It imports no framework: each rank is a
fresh `python -m legato.launch FILE:FUNCTION [JSON_ARGS]` process that loads FUNCTION from the
Python file FILE and calls it with the JSON arguments. The rank reads its place in the job
from the environment (RANK/WORLD_SIZE for torch, HOROVOD_RANK for Horovod, DMLC_* for MXNet).

Every launcher
- writes each rank's stdout and stderr to its own files (kept in `JobResult`),
- enforces a wall-clock timeout that kills every process of the job, grandchildren included,
- stops the remaining ranks `grace_s` after the first one fails, so a dead rank cannot hang
  the others,
- raises `JobFailed`, whose message shows each rank's exit status and the tail of its stderr.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Sequence

from legato.core.errors import BackendUnavailable, LegatoError

__all__ = [
    "JobFailed",
    "JobResult",
    "ProcResult",
    "free_port",
    "run_horovod_job",
    "run_mxnet_ps_job",
    "run_torch_job",
]

_JOB_ENV = "LEGATO_JOB_ID"
_TAIL_LINES = 25


class JobFailed(LegatoError):
    """A launched job had a rank that failed, or ran past its timeout."""

    def __init__(self, message: str, result: "JobResult") -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class ProcResult:
    """One process of a job: its name (rank 0, server 1, ...), exit code and output."""

    name: str
    returncode: int | None  # None: killed by the launcher
    stdout: str
    stderr: str
    killed_reason: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def status(self) -> str:
        if self.returncode is None:
            return f"killed ({self.killed_reason})"
        if self.returncode < 0:
            try:
                return f"died of {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"died of signal {-self.returncode}"
        return f"exit {self.returncode}"


@dataclasses.dataclass
class JobResult:
    """All processes of a job, in launch order, and the job's wall time."""

    procs: list[ProcResult]
    wall_s: float
    log_dir: str

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.procs)

    def rank(self, r: int) -> ProcResult:
        return next(p for p in self.procs if p.name == f"rank {r}")

    def summary(self) -> str:
        lines = []
        for p in self.procs:
            lines.append(f"--- {p.name}: {p.status()}")
            tail = p.stderr.strip().splitlines()[-_TAIL_LINES:]
            lines.extend("    " + line for line in tail)
        return "\n".join(lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _target_arg(target: str, args: Sequence[Any]) -> list[str]:
    path, sep, func = target.rpartition(":")
    if not sep or not path or not func:
        raise ValueError(f"target={target!r} is invalid; pass 'path/to/file.py:function'")
    if not Path(path).is_file():
        raise ValueError(f"target file {path!r} does not exist")
    return [str(Path(path).resolve()) + ":" + func, json.dumps(list(args))]


def _base_env(job_id: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env[_JOB_ENV] = job_id
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Many ranks on 2 cores: one thread each unless the caller says otherwise.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _kill_job(procs: list[subprocess.Popen], job_id: str) -> None:
    """SIGTERM then SIGKILL each process group, then any process still tagged with job_id."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3.0
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    _sweep(job_id)


def _sweep(job_id: str) -> None:
    """Kill processes that left their group (horovodrun's workers do) but carry our tag."""
    marker = f"{_JOB_ENV}={job_id}".encode()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _run(commands: list[tuple[str, list[str], dict[str, str]]], *, timeout_s: float,
         grace_s: float, log_dir: str | None, job_id: str, check: bool,
         watch: Sequence[str] | None = None, cwd: str | None = None) -> JobResult:
    """Start each (name, argv, env), wait, enforce timeout and grace, collect output.

    `watch` names the processes whose exit ends the job (default: all); the others (servers,
    a scheduler) are stopped once the watched ones are done.
    """
    own_dir = log_dir is None
    log_path = Path(tempfile.mkdtemp(prefix="legato-job-") if own_dir else log_dir)
    log_path.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    files = []
    start = time.monotonic()
    try:
        for name, argv, env in commands:
            slug = name.replace(" ", "")
            out = open(log_path / f"{slug}.out", "w+b")
            err = open(log_path / f"{slug}.err", "w+b")
            files.append((out, err))
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=cwd,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        names = [c[0] for c in commands]
        watched = [i for i, n in enumerate(names) if watch is None or n in watch]
        killed: dict[int, str] = {}
        first_failure_at: float | None = None
        deadline = start + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            if all(codes[i] is not None for i in watched):
                break
            now = time.monotonic()
            if first_failure_at is None and any(c not in (None, 0) for c in codes):
                first_failure_at = now
            if first_failure_at is not None and now - first_failure_at > grace_s:
                reason = f"another process failed and {grace_s:g} s passed"
                killed = {i: reason for i, c in enumerate(codes) if c is None}
                break
            if now > deadline:
                reason = f"job timeout of {timeout_s:g} s"
                killed = {i: reason for i, c in enumerate(codes) if c is None}
                break
            time.sleep(0.05)
        # Servers and schedulers that outlive the watched ranks are stopped, not failures.
        for i, p in enumerate(procs):
            if p.poll() is None and i not in killed:
                killed[i] = "stopped after the job ended"
        _kill_job(procs, job_id)
        wall = time.monotonic() - start
        results = []
        for i, (name, (out, err)) in enumerate(zip(names, files)):
            out.seek(0)
            err.seek(0)
            code = procs[i].returncode
            reason = killed.get(i, "")
            if reason == "stopped after the job ended":
                code = 0
            elif reason:
                code = None
            results.append(ProcResult(name, code, out.read().decode(errors="replace"),
                                      err.read().decode(errors="replace"), reason))
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_job(procs, job_id)
                break
        for out, err in files:
            out.close()
            err.close()
    result = JobResult(results, wall, str(log_path))
    if check and not result.ok:
        raise JobFailed(f"job failed after {wall:.1f} s (logs in {log_path}):\n"
                        + result.summary(), result)
    if own_dir and result.ok:
        shutil.rmtree(log_path, ignore_errors=True)
    return result


def run_torch_job(target: str, nprocs: int, *, args: Sequence[Any] = (), timeout_s: float = 120,
                  grace_s: float = 10, env: dict[str, str] | None = None,
                  python: str = sys.executable, log_dir: str | None = None,
                  check: bool = True) -> JobResult:
    """Run `target` ('file.py:function') as `nprocs` torch.distributed ranks on 127.0.0.1.

    Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and a free
    MASTER_PORT, as torchrun sets them, so `dist.init_process_group("gloo")` works unchanged.
    Raises JobFailed (with every rank's status and stderr tail) when a rank fails or the job
    passes `timeout_s`; a failed rank's peers are killed `grace_s` later.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs={nprocs} is invalid; pass at least 1")
    job_id = uuid.uuid4().hex
    tail = _target_arg(target, args)
    port = free_port()
    commands = []
    for rank in range(nprocs):
        rank_env = _base_env(job_id, env)
        rank_env.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                        LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        commands.append((f"rank {rank}", [python, "-m", "legato.launch", *tail], rank_env))
    return _run(commands, timeout_s=timeout_s, grace_s=grace_s, log_dir=log_dir, job_id=job_id,
                check=check)


def horovodrun_path(python: str = sys.executable) -> str:
    """The horovodrun next to `python`, or BackendUnavailable naming the fix."""
    candidate = Path(python).parent / "horovodrun"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("horovodrun")
    if found:
        return found
    raise BackendUnavailable("horovodrun not found; build Horovod with `make .stamps/horovod` "
                             "(scripts/build_horovod.sh)")


def run_horovod_job(target: str, nprocs: int, *, args: Sequence[Any] = (),
                    timeout_s: float = 180, grace_s: float = 10,
                    env: dict[str, str] | None = None, python: str = sys.executable,
                    log_dir: str | None = None, check: bool = True) -> JobResult:
    """Run `target` under `horovodrun --gloo -np nprocs` on localhost.

    Per-rank output comes from horovodrun's --output-filename folder; the result holds one
    entry per rank plus the launcher itself. Timeouts kill horovodrun and every worker.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs={nprocs} is invalid; pass at least 1")
    job_id = uuid.uuid4().hex
    tail = _target_arg(target, args)
    own_dir = log_dir is None
    log_path = Path(tempfile.mkdtemp(prefix="legato-hvd-") if own_dir else log_dir)
    rank_dir = log_path / "ranks"
    argv = [horovodrun_path(python), "--gloo", "-np", str(nprocs), "-H", f"localhost:{nprocs}",
            "--network-interface", "lo", "--start-timeout", str(int(max(30, timeout_s / 2))),
            "--output-filename", str(rank_dir), python, "-m", "legato.launch", *tail]
    hvd_env = _base_env(job_id, env)
    result = _run([("horovodrun", argv, hvd_env)], timeout_s=timeout_s, grace_s=grace_s,
                  log_dir=str(log_path), job_id=job_id, check=False)
    launcher = result.procs[0]
    procs = [launcher]
    for rank in range(nprocs):
        folder = rank_dir / f"rank.{rank}"
        out = _strip_rank_prefix(folder / "stdout", rank)
        err = _strip_rank_prefix(folder / "stderr", rank)
        # horovodrun reports a failing rank through its own exit status; per-rank codes are not
        # recorded, so a rank counts as failed when the launcher failed and its stderr shows it.
        failed = (not launcher.ok) and ("Traceback" in err or "Error" in err)
        code = launcher.returncode if failed else (0 if launcher.ok else None)
        reason = "" if code is not None else launcher.killed_reason or "horovodrun failed"
        procs.append(ProcResult(f"rank {rank}", code, out, err, reason))
    full = JobResult(procs, result.wall_s, str(log_path))
    if check and not full.ok:
        raise JobFailed(f"horovodrun job failed after {full.wall_s:.1f} s (logs in {log_path}):"
                        "\n" + full.summary(), full)
    if own_dir and full.ok:
        shutil.rmtree(log_path, ignore_errors=True)
    return full


def _strip_rank_prefix(path: Path, rank: int) -> str:
    """horovodrun's per-rank files prefix each line with "[rank]<stdout>:"; drop it."""
    if not path.exists():
        return ""
    lines = []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        for stream in ("stdout", "stderr"):
            prefix = f"[{rank}]<{stream}>:"
            if line.startswith(prefix):
                line = line[len(prefix):]
                break
        lines.append(line)
    return "".join(lines)


def run_mxnet_ps_job(target: str, num_workers: int, *, num_servers: int = 1,
                     args: Sequence[Any] = (), timeout_s: float = 120, grace_s: float = 10,
                     env: dict[str, str] | None = None, python: str = sys.executable,
                     log_dir: str | None = None, check: bool = True) -> JobResult:
    """Run `target` as `num_workers` MXNet kvstore workers with a real parameter server.

    Starts one scheduler and `num_servers` servers (`import mxnet` with DMLC_ROLE set runs the
    ps-lite server loop) on 127.0.0.1, then the workers; workers open `mx.kv.create("dist_sync")`
    (or another dist type) and read their rank from `kv.rank`. `python` must have mxnet.
    """
    if num_workers < 1 or num_servers < 1:
        raise ValueError(f"num_workers={num_workers}, num_servers={num_servers} are invalid; "
                         "pass at least one of each")
    job_id = uuid.uuid4().hex
    tail = _target_arg(target, args)
    common = {
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": str(free_port()),
        "DMLC_NUM_SERVER": str(num_servers),
        "DMLC_NUM_WORKER": str(num_workers),
        "DMLC_NODE_HOST": "127.0.0.1",
        "DMLC_INTERFACE": "lo",
        "PS_VERBOSE": "0",
    }
    server_cmd = [python, "-c", "import mxnet"]
    commands = []
    for role, count in (("scheduler", 1), ("server", num_servers)):
        for i in range(count):
            e = _base_env(job_id, env)
            e.update(common, DMLC_ROLE=role)
            commands.append((f"{role} {i}", server_cmd, e))
    for rank in range(num_workers):
        e = _base_env(job_id, env)
        e.update(common, DMLC_ROLE="worker")
        commands.append((f"worker {rank}", [python, "-m", "legato.launch", *tail], e))
    watch = [f"worker {r}" for r in range(num_workers)]
    return _run(commands, timeout_s=timeout_s, grace_s=grace_s, log_dir=log_dir, job_id=job_id,
                check=check, watch=watch)


def _child_main(argv: list[str]) -> int:
    """Entry point of one launched process: load FILE:FUNCTION and call it with JSON args."""
    if len(argv) not in (1, 2):
        print("usage: python -m legato.launch FILE.py:FUNCTION [JSON_ARGS]", file=sys.stderr)
        return 2
    path, _, func_name = argv[0].rpartition(":")
    args = json.loads(argv[1]) if len(argv) == 2 else []
    spec = importlib.util.spec_from_file_location(f"_legato_job_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        print(f"legato.launch: cannot load {path}", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).parent))
    try:
        faulthandler.enable()  # a rank that aborts or segfaults shows its Python stacks
    except (ValueError, OSError):  # stderr without a file descriptor (captured in tests)
        pass
    try:
        spec.loader.exec_module(module)
        func = getattr(module, func_name)
        func(*args)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 (the launcher shows the traceback)
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
