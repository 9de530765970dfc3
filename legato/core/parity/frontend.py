"""The coded-inference serving frontend (`legato serve`): HTTP in front of model workers.

    legato serve --model DIR/base.onnx --parity-model DIR/parity.onnx --k 2 --workers 4 \\
                 --policy parity --deadline-ms 100 --port 8000

The frontend starts its model workers (`legato worker` processes on 127.0.0.1), restarts any that
dies, and answers:
- `POST /v1/predict`: one query, as an npy body (`application/x-npy`) or JSON
  `{"inputs": [...]}`, shaped like one model input (a leading batch of 1 is accepted);
- `GET /v1/health`: the workers, alive or not, and their pids (503 when no base worker is);
- `GET /metrics`: Prometheus text;
- the Open Inference Protocol (KServe v2, `v2.py`): `POST /v2/models/NAME/infer` (a batch of
  queries, each coded on its own), model metadata and readiness, `/v2/health/live|ready`.

Every query gets exactly one reply, `{"outputs", "class", "source", "reason", "ms"}`, with
`source` one of:
- `original`: a worker answered;
- `reconstructed`: decoded from its coding group;
- `backup`: the cheap backup model's answer (policy backup only);
- `default`: nothing came in time, and the reply carries the default output (zeros) with the
  reason.

Policies:
- `none`: `workers` base workers, each query to the one with the fewest outstanding (ties in
  turn), no redundancy;
- `replicate`: the extra servers parity would use (ceil(workers / k)) run more base replicas
  (equal resources);
- `hedge`: the same extra servers take a second copy of a query that has not been answered
  after `hedge_ms` (default: the 95th percentile of recent service times), first answer wins
  and the other copy is cancelled ("The Tail at Scale");
- `adaptive`: the extra servers run both models; each query waits, is hedged or is coded,
  whichever `adaptive.AdaptiveChooser` predicts gives the lowest p99.9 from the base workers'
  recent response times, the arrival rate and the parity model's measured accuracy;
- `parity`: the extra servers run the parity model.
  - Queries from different users form coding groups of k, closing at k queries or after
    `group_timeout_ms` (padded).
  - Each query goes to its worker at once; the parity query goes to a parity worker.
  - As soon as any k of the k + 1 outputs are in, the missing one is decoded, and the work that
    became useless is cancelled where still queued.
- `full`: full replication, N more base workers; every query goes to two at once and the
  first answer wins;
- `backup`: the extra servers run a cheap backup model (`--backup-model`, e.g. the linear
  classifier `legato parity train` writes as backup.onnx); every query also goes there, and
  a query whose worker has not answered by the hedge delay gets the backup's answer (source
  `backup`, an approximate answer like a reconstruction).

A request whose worker failed is retried on another worker while its deadline allows.
Bad input gets a 4xx naming the problem. When more than `max_inflight` queries are open, a 503
with Retry-After is returned rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from legato.core.errors import ConfigError
from legato.core.parity.adaptive import AdaptiveChooser
from legato.core.parity.client import WorkerClient, WorkerError
from legato.core.parity.codes import make_encoder
from legato.core.parity.faults import FaultSpec
from legato.core.parity.group import PARITY, CodingGroup, GroupFormer

__all__ = ["Frontend", "ServeConfig", "faults_for", "parse_inject"]

# the latency histogram's upper bounds (seconds): around deadlines of 10 ms to a few seconds
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                     5.0, 10.0)

POLICIES = ("none", "replicate", "hedge", "parity", "adaptive", "full", "backup")


def parse_inject(text: str | None) -> dict[str, str]:
    """`"0:delay_ms=500;*:pause=0.01,seed=3"` -> {"0": ..., "*": ...}: faults per worker index
    (base workers first, 0..N-1, then the extra ones: replicas, hedging, parity or backup
    workers); "*" is every worker, base and extra, and a worker's own entry wins. A delay
    standing in for a model's compute must slow the parity model too, which costs as much.
    Under "*", worker i draws with seed + i (`faults_for`): the same seed everywhere would
    pause every worker's n-th request, stragglers in lockstep."""
    out: dict[str, str] = {}
    for item in filter(None, (text or "").split(";")):
        key, sep, spec = item.partition(":")
        key = key.strip()
        if not sep or not (key == "*" or key.isdigit()):
            raise ConfigError(f"--inject item {item!r} is not INDEX:SPEC or *:SPEC (e.g. "
                              "0:delay_ms=500;*:pause=0.01,seed=1)")
        FaultSpec.parse(spec)
        out[key] = spec
    return out


def faults_for(inject: dict[str, str], index: int) -> str | None:
    """Worker `index`'s fault spec: its own entry, else "*" with the seed offset by index."""
    if str(index) in inject:
        return inject[str(index)]
    if "*" in inject:
        spec = FaultSpec.parse(inject["*"])
        return spec.with_seed(spec.seed + index).format()
    return None


@dataclasses.dataclass(kw_only=True)
class ServeConfig:
    model: str
    parity_model: str | None = None
    k: int = 2
    workers: int = 4
    policy: str = "parity"
    deadline_ms: float = 100.0
    group_timeout_ms: float = 10.0
    encoder: str = "addition"
    host: str = "127.0.0.1"
    port: int = 0
    inject: str | None = None
    max_inflight: int = 1000
    threads: int = 1
    hedge_ms: float | None = None
    adaptive_warmup: int = 200
    backup_model: str | None = None
    max_batch: int = 1
    model_name: str | None = None     # the v2 API's model name (default: the model file's stem)

    def check(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy {self.policy!r} is unknown; known: {', '.join(POLICIES)}")
        for name in ("deadline_ms", "group_timeout_ms", "hedge_ms"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} {value} is not a finite number "
                                  "of milliseconds")
        if (self.workers < 1 or self.k < 2 or self.deadline_ms <= 0 or self.max_inflight < 1
                or self.adaptive_warmup < 1 or self.max_batch < 1):
            raise ConfigError("need --workers >= 1, --k >= 2, --deadline-ms > 0, "
                              "--max-inflight >= 1, --adaptive-warmup >= 1 and "
                              "--max-batch >= 1")
        for path in (self.model, self.parity_model, self.backup_model):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{path} does not exist")
        if self.policy in ("parity", "adaptive") and self.parity_model is None:
            raise ConfigError(f"--policy {self.policy} needs --parity-model (legato parity "
                              "train writes one)")
        if self.policy == "backup" and self.backup_model is None:
            raise ConfigError("--policy backup needs --backup-model (legato parity train "
                              "writes backup.onnx, a cheap linear classifier)")
        from legato.core.parity.training import pair_id

        pairs = {flag: pair_id(path) for flag, path in (
            ("--model", self.model), ("--parity-model", self.parity_model),
            ("--backup-model", self.backup_model)) if path is not None}
        if len({p for p in pairs.values() if p is not None}) > 1:
            raise ConfigError(
                "these models were not trained together (legato parity train stamps the models "
                f"of one run alike; got {', '.join(f'{k} {v}' for k, v in pairs.items())}); "
                "serve the base.onnx, parity.onnx and backup.onnx of one output folder")
        parse_inject(self.inject)

    @property
    def extra(self) -> int:
        if self.policy == "full":
            return self.workers
        return math.ceil(self.workers / self.k) if self.policy != "none" else 0


class _Worker:
    """One worker process and the frontend's connection to it; restarted when it dies."""

    def __init__(self, index: int, model: str | list[str], inject: str | None,
                 args: list[str], role: str) -> None:
        self.index, self.inject, self.args = index, inject, args
        self.models = [model] if isinstance(model, str) else list(model)
        self.role = role          # base, replica (hedge, full), parity, both (adaptive), backup
        self.proc: subprocess.Popen | None = None
        self.client: WorkerClient | None = None
        self.restarts = 0
        self.outstanding = 0

    @property
    def alive(self) -> bool:
        return self.client is not None and not self.client.closed

    async def start(self) -> None:
        argv = [sys.executable, "-m", "legato.cli", "worker", *self.args, "--exit-with-parent"]
        for model in self.models:
            argv += ["--model", model]
        if self.inject:
            argv += ["--inject", self.inject]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.readline), 60)
        if "serving" not in line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise ConfigError(f"worker {self.index} ({', '.join(self.models)}) did not start: "
                              f"{(line + err).strip()[-500:]}")
        port = int(line.rsplit(":", 1)[1])
        self.client = await WorkerClient.connect("127.0.0.1", port)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, 10)


@dataclasses.dataclass
class _Query:
    qid: int
    x: np.ndarray
    reply: asyncio.Future
    start: float
    requests: list = dataclasses.field(default_factory=list)   # (worker, rid) in flight
    original: np.ndarray | None = None      # the worker's answer, once it came
    backup: np.ndarray | None = None        # the cheap backup model's answer (policy backup)
    late: bool = False                      # the hedge delay passed without the original
    group: CodingGroup | None = None
    position: int = -1


class Frontend:
    def __init__(self, config: ServeConfig) -> None:
        config.check()
        self.config = config
        self.base: list[_Worker] = []
        self.extra_base: list[_Worker] = []     # hedge: where hedged copies go
        self.parity: list[_Worker] = []
        self.hedges = 0
        self._service_ms: collections.deque = collections.deque(maxlen=1000)
        self._arrivals: collections.deque = collections.deque(maxlen=200)
        self.modes = {"wait": 0, "hedge": 0, "parity": 0}
        self.chooser: AdaptiveChooser | None = None
        self.load = 0.0
        self.parity_report: dict | None = None
        self._parity_pool: list = []
        self._parity_model = 0
        self._parity_ok = False
        self.input_shape: list | None = None
        self.input_name = self.output_name = self.model_name = ""
        self.counts: dict[str, int] = {"original": 0, "reconstructed": 0, "backup": 0,
                                       "default": 0}
        self.backup: list[_Worker] = []
        self.rejected = {"bad_request": 0, "overload": 0}
        self.latency_ms: list[float] = []
        self._latency_buckets = [0] * len(LATENCY_BUCKETS_S)   # per bucket, not cumulative
        self._latency_count = 0
        self._latency_sum_s = 0.0
        self.inflight = 0
        self._ids = itertools.count()
        self._rr = itertools.count()
        self._prr = itertools.count()
        self._former: GroupFormer | None = None
        self._tasks: list[asyncio.Task] = []
        self._runner = None
        self.port = config.port

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        from legato._extras import require

        require("aiohttp", what="the coded-inference frontend (legato serve)")
        from aiohttp import web

        c = self.config
        inject = parse_inject(c.inject)
        args = ["--threads", str(c.threads), "--max-batch", str(c.max_batch)]
        n_base = c.workers + (c.extra if c.policy == "replicate" else 0)
        self.base = [_Worker(i, c.model, faults_for(inject, i), args, "base")
                     for i in range(n_base)]
        if c.policy in ("hedge", "adaptive", "full"):   # extra servers for second copies
            models = [c.model, c.parity_model] if c.policy == "adaptive" else c.model
            self.extra_base = [_Worker(n_base + i, models,
                                       faults_for(inject, n_base + i),
                                       args, "both" if c.policy == "adaptive" else "replica")
                               for i in range(c.extra)]
        if c.policy == "parity":
            self.parity = [_Worker(n_base + i, c.parity_model,
                                   faults_for(inject, n_base + i), args, "parity")
                           for i in range(c.extra)]
        if c.policy == "backup":
            self.backup = [_Worker(n_base + i, c.backup_model,
                                   faults_for(inject, n_base + i), args, "backup")
                           for i in range(c.extra)]
        # where parity queries go, and which of the worker's models answers them
        self._parity_pool, self._parity_model = ((self.extra_base, 1) if c.policy == "adaptive"
                                                 else (self.parity, 0))
        self._parity_ok = self._parity_accuracy_ok()
        if c.policy == "adaptive":
            self.chooser = AdaptiveChooser(c.k, parity_ok=self._parity_ok,
                                           min_samples=c.adaptive_warmup,
                                           every=min(100, c.adaptive_warmup))
        await asyncio.gather(*(w.start() for w in self._all()))
        health = await self.base[0].client.health()
        self.input_shape = health["shape"]
        self.input_name, self.output_name = health["input"], health.get("output", "output")
        self.model_name = c.model_name or os.path.splitext(os.path.basename(c.model))[0]
        shape = list(self.input_shape[1:])
        if None in shape:
            raise ConfigError(f"the model's input shape {self.input_shape} has dynamic dims "
                              "beyond the batch; export it with a fixed query shape")
        pad = (await self.base[0].client.submit(np.zeros([1, *shape], np.float32)))[0]
        self._out = tuple(pad.shape)            # the default answer's shape: zeros
        if c.policy in ("parity", "adaptive"):
            encoder = make_encoder(c.encoder, c.k, shape)
            self._former = GroupFormer(encoder, c.group_timeout_ms / 1e3, pad_output=pad)
            self._tasks.append(asyncio.create_task(self._close_partial_groups()))
        self._tasks.append(asyncio.create_task(self._watch_workers()))
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/v1/predict", self._predict)
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        # the Open Inference Protocol (KServe v2): tritonclient, perf_analyzer, KServe
        app.router.add_get("/v2", self._v2_server)
        app.router.add_get("/v2/health/live", self._v2_live)
        app.router.add_get("/v2/health/ready", self._v2_ready)
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.router.add_get(prefix, self._v2_model)
            app.router.add_get(prefix + "/ready", self._v2_model_ready)
            app.router.add_post(prefix + "/infer", self._v2_infer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, c.host, c.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def _all(self) -> list[_Worker]:
        return self.base + self.extra_base + self.parity + self.backup

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.gather(*(w.stop() for w in self._all()))

    async def _watch_workers(self) -> None:
        """Restart a worker whose process died or whose connection was lost."""
        while True:
            await asyncio.sleep(0.05)
            for w in self._all():
                if w.alive and w.proc is not None and w.proc.poll() is None:
                    continue
                await w.stop()
                try:
                    await w.start()
                    w.restarts += 1
                except (ConfigError, OSError, asyncio.TimeoutError):
                    pass                       # tried again on the next round

    async def _close_partial_groups(self) -> None:
        assert self._former is not None
        while True:
            deadline = self._former.deadline()
            wait = (self.config.group_timeout_ms / 1e3 if deadline is None
                    else max(deadline - time.monotonic(), 0.0005))
            await asyncio.sleep(wait)
            group = self._former.poll()
            if group is not None:
                self._start_group(group)

    # -- HTTP ---------------------------------------------------------------------------------
    async def _predict(self, request):
        from aiohttp import web

        start = time.monotonic()
        try:
            x = await self._parse(request)
        except ConfigError as err:
            self.rejected["bad_request"] += 1
            return web.json_response({"error": str(err)}, status=400)
        if self.inflight >= self.config.max_inflight:
            return self._overloaded()
        out, source, reason, ms = await self._answer(x, start, self.config.deadline_ms)
        out = np.asarray(out).reshape(-1)
        return web.json_response({"outputs": out.tolist(), "class": int(out.argmax()),
                                  "source": source, "reason": reason, "ms": ms})

    def _observe(self, seconds: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        if index < len(self._latency_buckets):
            self._latency_buckets[index] += 1
        self._latency_count += 1
        self._latency_sum_s += seconds

    def _overloaded(self):
        from aiohttp import web

        self.rejected["overload"] += 1
        return web.json_response({"error": f"overloaded: {self.inflight} queries open"},
                                 status=503, headers={"Retry-After": "1"})

    async def _answer(self, x: np.ndarray, start: float, deadline_ms: float
                      ) -> tuple[np.ndarray, str, str, float]:
        """One query `x` ([1, *shape]) through the policy: its output, where it came from, why,
        and the milliseconds since `start`; a default answer once `deadline_ms` has passed."""
        self.inflight += 1
        try:
            q = _Query(next(self._ids), x, asyncio.get_running_loop().create_future(), start)
            self._dispatch(q)
            remaining = deadline_ms / 1e3 - (time.monotonic() - start)
            try:
                out, source, reason = await asyncio.wait_for(asyncio.shield(q.reply),
                                                             max(remaining, 0))
            except asyncio.TimeoutError:
                out = np.zeros(self._out, np.float32)
                source, reason = "default", f"no answer within the {deadline_ms:g} ms deadline"
                self._give_up(q)
            self.counts[source] += 1
            ms = (time.monotonic() - start) * 1e3
            self._observe(ms / 1e3)
            self.latency_ms.append(ms)
            if len(self.latency_ms) > 100000:
                del self.latency_ms[:50000]
            return out, source, reason, ms
        finally:
            self.inflight -= 1

    # -- the Open Inference Protocol (KServe v2) ------------------------------------------------
    def _ready(self) -> bool:
        """Every query can be answered: a base worker is alive, and under parity and adaptive a
        parity worker too (a dead base worker is what parity covers)."""
        if not any(w.alive for w in self.base):
            return False
        if self.config.policy in ("parity", "adaptive"):
            return any(w.alive for w in self._parity_pool)
        return True

    def _v2_error(self, message: str, status: int = 400):
        from aiohttp import web

        return web.json_response({"error": message}, status=status)

    def _v2_check_model(self, request):
        name = request.match_info["name"]
        version = request.match_info.get("version")
        if name != self.model_name:
            return self._v2_error(f"model {name!r} is not served here; this server serves "
                                  f"{self.model_name!r}", 404)
        if version not in (None, "1"):
            return self._v2_error(f"model {name!r} has version 1 only, not {version!r}", 404)
        return None

    async def _v2_server(self, request):
        from aiohttp import web

        from legato import __version__

        return web.json_response({"name": "legato", "version": __version__,
                                  "extensions": ["binary_tensor_data", "parameters"]})

    async def _v2_live(self, request):
        from aiohttp import web

        return web.json_response({"live": True})

    async def _v2_ready(self, request):
        from aiohttp import web

        ready = self._ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _v2_model_ready(self, request):
        from aiohttp import web

        bad = self._v2_check_model(request)
        if bad is not None:
            return bad
        ready = self._ready()
        return web.json_response({"name": self.model_name, "ready": ready},
                                 status=200 if ready else 503)

    async def _v2_model(self, request):
        from aiohttp import web

        bad = self._v2_check_model(request)
        if bad is not None:
            return bad
        return web.json_response({
            "name": self.model_name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.input_name, "datatype": "FP32",
                        "shape": [-1, *self.input_shape[1:]]}],
            "outputs": [{"name": self.output_name, "datatype": "FP32",
                         "shape": [-1, *self._out]}],
            "parameters": {"policy": self.config.policy, "k": self.config.k,
                           "deadline_ms": self.config.deadline_ms}})

    async def _v2_infer(self, request):
        from aiohttp import web

        from legato.core.parity.v2 import V2Error, encode_reply, parse_request

        start = time.monotonic()
        bad = self._v2_check_model(request)
        if bad is not None:
            return bad
        try:
            req = parse_request(await request.read(), request.headers,
                                input_name=self.input_name,
                                query_shape=list(self.input_shape[1:]),
                                output_name=self.output_name,
                                max_batch=self.config.max_inflight)
        except V2Error as err:
            self.rejected["bad_request"] += 1
            return self._v2_error(str(err), err.status)
        if self.inflight + len(req.x) > self.config.max_inflight:
            return self._overloaded()
        deadline = min(req.deadline_ms or self.config.deadline_ms, self.config.deadline_ms)
        answers = await asyncio.gather(*(self._answer(row[None], start, deadline)
                                         for row in req.x))
        outputs = np.stack([np.asarray(a[0], np.float32).reshape(self._out) for a in answers])
        body, headers = encode_reply(model_name=self.model_name, request_id=req.request_id,
                                     output_name=self.output_name, outputs=outputs,
                                     sources=[a[1] for a in answers],
                                     reasons=[a[2] for a in answers],
                                     binary=req.binary_output)
        return web.Response(body=body, headers=headers)

    async def _parse(self, request) -> np.ndarray:
        body = await request.read()
        ctype = request.headers.get("Content-Type", "")
        try:
            if "npy" in ctype or body[:6] == b"\x93NUMPY":
                x = np.load(io.BytesIO(body), allow_pickle=False)
            else:
                data = json.loads(body)
                if not isinstance(data, dict) or "inputs" not in data:
                    raise ConfigError('a JSON body needs {"inputs": [...]}')
                x = np.asarray(data["inputs"], dtype=np.float32)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 (whatever is wrong is the body's fault)
            raise ConfigError(f"the body is neither an npy array nor JSON with \"inputs\" "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
        if x.dtype.kind not in "fiu":
            raise ConfigError(f"inputs of dtype {x.dtype} are not numbers")
        if x.dtype.kind == "f" and x.dtype != np.float32 and "npy" in ctype:
            raise ConfigError(f"npy inputs must be float32, not {x.dtype}")
        want = list(self.input_shape[1:])
        if list(x.shape) == want:
            x = x[None]
        if list(x.shape) != [1, *want]:
            raise ConfigError(f"a query has shape {want} (or [1, ...]); got {list(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise ConfigError("inputs contain NaN or infinity")
        return x.astype(np.float32, copy=False)

    async def _health(self, request):
        from aiohttp import web

        workers = [{"index": w.index, "role": w.role, "alive": w.alive,
                    "pid": w.proc.pid if w.proc else None, "restarts": w.restarts,
                    "outstanding": w.outstanding}
                   for w in self._all()]
        ok = any(w.alive for w in self.base)
        return web.json_response({"ok": ok, "ready": self._ready(), "policy":
                                  self.config.policy, "k": self.config.k, "workers": workers,
                                  "inflight": self.inflight, "load": self.load,
                                  "parity_report": self.parity_report,
                                  "adaptive": None if self.chooser is None else {
                                      "mode": self.chooser.mode,
                                      "predicted_p999_ms": self.chooser.predicted}},
                                 status=200 if ok else 503)

    async def _metrics(self, request):
        """Prometheus text exposition (0.0.4): HELP and TYPE for every family, the request
        latency as a cumulative histogram since start (and a summary of the last 100k), and
        each worker's state."""
        from aiohttp import web

        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            out.extend(f"{name}{labels} {value}" for labels, value in samples)

        family("legato_queries_total", "counter", "Queries answered, by where the answer came "
               "from.", [(f'{{source="{s}"}}', n) for s, n in self.counts.items()])
        family("legato_rejected_total", "counter", "Requests refused, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in self.rejected.items()])
        family("legato_inflight", "gauge", "Queries open now.", [("", self.inflight)])
        family("legato_worker_restarts_total", "counter", "Worker restarts, all workers.",
               [("", sum(w.restarts for w in self._all()))])
        family("legato_hedges_total", "counter", "Hedged second copies sent.",
               [("", self.hedges)])
        family("legato_adaptive_mode_total", "counter", "Adaptive policy choices, by mode.",
               [(f'{{mode="{m}"}}', n) for m, n in self.modes.items()])
        family("legato_load", "gauge", "Offered load over the base workers' capacity.",
               [("", f"{self.load:.4f}")])
        workers = [(f'{{worker="{w.index}",role="{w.role}"}}', w) for w in self._all()]
        family("legato_worker_up", "gauge", "Whether the worker is alive (1) or not (0).",
               [(lb, int(w.alive)) for lb, w in workers])
        family("legato_worker_outstanding", "gauge", "Requests sent to the worker and not "
               "answered yet.", [(lb, w.outstanding) for lb, w in workers])
        family("legato_worker_restarted_total", "counter", "Restarts of this worker.",
               [(lb, w.restarts) for lb, w in workers])
        cumulative, samples = 0, []
        for bound, n in zip(LATENCY_BUCKETS_S, self._latency_buckets):
            cumulative += n
            samples.append((f'_bucket{{le="{bound:g}"}}', cumulative))
        samples += [('_bucket{le="+Inf"}', self._latency_count),
                    ("_sum", f"{self._latency_sum_s:.6f}"), ("_count", self._latency_count)]
        family("legato_request_duration_seconds", "histogram", "Time from a query's arrival to "
               "its answer (deadline defaults included).", samples)
        if self.latency_ms:
            lat = np.asarray(self.latency_ms)
            family("legato_latency_ms", "summary", "Answer latency in ms over the last 100k "
                   "queries.", [(f'{{quantile="{q}"}}', f"{np.quantile(lat, q):.3f}")
                                for q in (0.5, 0.99, 0.999)]
                   + [("_sum", f"{float(lat.sum()):.3f}"), ("_count", len(lat))])
        return web.Response(body=("\n".join(out) + "\n").encode(), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- dispatch -----------------------------------------------------------------------------
    def _pick(self, pool: list[_Worker], avoid: _Worker | None = None) -> _Worker | None:
        alive = [w for w in pool if w.alive and w is not avoid] or [w for w in pool if w.alive]
        if not alive:
            return None
        return min(alive, key=lambda w: (w.outstanding, next(self._rr) % len(alive)))

    def _dispatch(self, q: _Query) -> None:
        self._note_arrival()
        w = self._send(q, self.base)
        policy = self.config.policy
        if policy == "adaptive":
            assert self.chooser is not None
            if w is not None:
                self.chooser.model.dispatched(w.index)
            policy = self.chooser.choose(self._hedge_delay_s() * 1e3, self._group_wait_ms())
            self.modes[policy] += 1
        if policy == "hedge":
            delay = self._hedge_delay_s()
            asyncio.get_running_loop().call_later(delay, self._hedge, q, delay)
        elif policy == "full":
            self._send(q, self.extra_base, reason="the first of two replicas to answer")
        elif policy == "backup":
            self._send_backup(q)
        elif policy == "parity" and self._former is not None:
            group = self._former.add(q.x[0], q)
            if group is not None:
                self._start_group(group)

    def _parity_accuracy_ok(self) -> bool:
        """Whether the parity model's measured degraded-mode accuracy (report.json beside it,
        from `legato parity train`) is within 5 points of the base model's; without a report,
        assume so."""
        if self.config.parity_model is None:
            return False
        path = os.path.join(os.path.dirname(self.config.parity_model), "report.json")
        try:
            with open(path) as f:
                report = json.load(f)
            self.parity_report = {k: report[k] for k in ("base_accuracy", "degraded_accuracy")}
        except (OSError, ValueError, KeyError):
            return True
        return report["degraded_accuracy"] >= report["base_accuracy"] - 0.05

    def _note_arrival(self) -> None:
        """Track the arrival rate and the offered load: arrivals per second (last 200) times the
        median recent service time, per base worker (shown in /v1/health and /metrics)."""
        now = time.monotonic()
        self._arrivals.append(now)
        if len(self._arrivals) >= 20 and self._service_ms:
            self.load = (self._rate() * float(np.median(self._service_ms)) / 1e3
                         / len(self.base))

    def _rate(self) -> float:
        if len(self._arrivals) < 2:
            return 0.0
        return (len(self._arrivals) - 1) / max(self._arrivals[-1] - self._arrivals[0], 1e-6)

    def _group_wait_ms(self) -> float:
        """How long a coded query waits, on average, before its group's parity query is sent:
        half the time k - 1 more arrivals take, at most the group timeout."""
        rate = self._rate()
        spread = (self.config.k - 1) / rate * 1e3 if rate > 0 else math.inf
        return min(self.config.group_timeout_ms, spread / 2)

    def _hedge_delay_s(self) -> float:
        """`--hedge-ms`, else the 95th percentile of recent service times (a quarter of the
        deadline until 20 have been seen)."""
        if self.config.hedge_ms is not None:
            return self.config.hedge_ms / 1e3
        if len(self._service_ms) < 20:
            return self.config.deadline_ms / 4e3
        return float(np.percentile(self._service_ms, 95)) / 1e3

    def _hedge(self, q: _Query, delay: float) -> None:
        if q.reply.done():
            return
        self.hedges += 1
        self._send(q, self.extra_base, reason=f"hedged after {delay * 1e3:.0f} ms")

    def _send_backup(self, q: _Query) -> None:
        """Policy backup: the query also goes to the cheap model at once; its answer is
        used if the original is still missing at the hedge delay."""
        delay = self._hedge_delay_s()
        reason = f"the cheap backup model's answer; the original was not in after " \
                 f"{delay * 1e3:.0f} ms"

        def late() -> None:
            q.late = True
            if q.backup is not None and not q.reply.done():
                self._resolve(q, q.backup, "backup", reason)
                self._cancel_requests(q)

        asyncio.get_running_loop().call_later(delay, late)
        w = self._pick(self.backup)
        if w is None:
            return
        w.outstanding += 1
        fut = w.client.submit(q.x)
        q.requests.append((w, fut.rid))

        def done(f: asyncio.Future) -> None:
            w.outstanding -= 1
            if f.cancelled() or f.exception() is not None:
                return
            q.backup = f.result()[0]
            if q.late and not q.reply.done():
                self._resolve(q, q.backup, "backup", reason)
                self._cancel_requests(q, keep=w)

        fut.add_done_callback(done)

    def _send(self, q: _Query, pool: list, avoid: _Worker | None = None,
              reason: str = "") -> _Worker | None:
        w = self._pick(pool, avoid)
        if w is None:
            return None                         # no worker now: the deadline gives a default
        w.outstanding += 1
        sent = time.monotonic()
        fut = w.client.submit(q.x)
        q.requests.append((w, fut.rid))
        fut.add_done_callback(lambda f: self._original_done(q, w, f, sent, reason))
        return w

    def _cancel_requests(self, q: _Query, keep: _Worker | None = None) -> None:
        """Drop the query's other requests where they are still queued."""
        for w, rid in q.requests:
            if w is not keep and w.alive:
                asyncio.ensure_future(w.client.cancel([rid]))

    def _original_done(self, q: _Query, w: _Worker, fut: asyncio.Future, sent: float,
                       reason: str) -> None:
        w.outstanding -= 1
        if fut.cancelled():
            return
        err = fut.exception()
        if err is None:
            ms = (time.monotonic() - sent) * 1e3
            self._service_ms.append(ms)
            if self.chooser is not None and w.role == "base":
                self.chooser.model.observe(w.index, ms)
            if q.reply.done() and q.original is not None:
                return                          # the other copy of a hedged query won
            out = q.original = fut.result()[0]
            if q.group is not None:
                q.group.answer(q.position, out)
                self._after_group_update(q.group)
            if len(q.requests) > 1:
                self._cancel_requests(q, keep=w)
            self._resolve(q, out, "original", reason)
            return
        if q.reply.done() or (isinstance(err, WorkerError) and "cancelled" in str(err)):
            return
        # the worker failed: another worker, while the deadline allows (parity may also decode)
        if time.monotonic() - q.start < self.config.deadline_ms / 1e3:
            self._send(q, self.base + self.extra_base, avoid=w,
                       reason=f"retried after worker {w.index} failed")

    def _start_group(self, group: CodingGroup) -> None:
        for pos, member in enumerate(group.members):
            if member.tag is not None:
                member.tag.group, member.tag.position = group, pos
                if member.tag.original is not None:           # answered before the group closed
                    group.answer(pos, member.tag.original)
        w = self._pick(self._parity_pool)
        if w is None:
            return
        w.outstanding += 1
        fut = w.client.submit(group.parity_query[None].astype(np.float32),
                              model=self._parity_model)
        group.parity_rid, group.parity_worker = fut.rid, w  # type: ignore[attr-defined]

        def done(f: asyncio.Future) -> None:
            w.outstanding -= 1
            if not f.cancelled() and f.exception() is None:
                group.answer_parity(f.result()[0])
                self._after_group_update(group)

        fut.add_done_callback(done)
        self._after_group_update(group)

    def _after_group_update(self, group: CodingGroup) -> None:
        while group.decodable() is not None:
            i, out = group.decode()
            q = group.members[i].tag
            if q is not None:
                self._resolve(q, out, "reconstructed",
                              f"rebuilt from coding group {group.gid} (k={group.k})")
                self._cancel_requests(q)
        if PARITY in group.useless() and getattr(group, "parity_worker", None) is not None:
            w = group.parity_worker
            if w.alive:
                asyncio.ensure_future(w.client.cancel([group.parity_rid]))

    def _resolve(self, q: _Query, out: np.ndarray, source: str, reason: str) -> None:
        if not q.reply.done():
            q.reply.set_result((out, source, reason))

    def _give_up(self, q: _Query) -> None:
        """The deadline passed: drop the query's work where it is still queued."""
        self._cancel_requests(q)


def serve(config: ServeConfig, ready=None) -> None:
    """Run the frontend until SIGINT or SIGTERM, then stop its workers; `ready(port)` once it
    listens."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        fe = Frontend(config)
        try:
            await fe.start()
            if ready is not None:
                ready(fe.port)
            await stop.wait()
        finally:
            await fe.stop()

    asyncio.run(main())
