"""The serving frontend (`legato serve`, legato/core/parity/frontend.py) as a real process in
front of real worker processes on 127.0.0.1: exact reconstruction around a straggler, defaults
at the deadline without parity, a SIGKILLed worker restarted with every query answered once,
4xx for bad bodies, health and metrics."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

pytest.importorskip("aiohttp")
pytest.importorskip("onnxruntime")
import aiohttp  # noqa: E402

pytestmark = pytest.mark.timeout(180)

W = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """F(x) = flatten(x) @ W for 1x8x8 images; linear, so P = F rebuilds answers exactly."""
    return write_linear(tmp_path_factory.mktemp("serve") / "linear.onnx", W)


def write_linear(path, w):
    shape = numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["f"]),
                           helper.make_node("MatMul", ["f", "w"], ["y"])], "linear",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 10])],
                          [numpy_helper.from_array(w, "w"), shape])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


class Server:
    def __init__(self, *argv):
        self.proc = subprocess.Popen([sys.executable, "-m", "legato.cli", "serve", "--port", "0",
                                      *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        assert "listening on" in line, (line, self.proc.stderr.read()
                                        if self.proc.poll() is not None else "")
        self.url = line.strip().rsplit(" ", 1)[1]

    def close(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def npy(x):
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


async def ask(session, url, x):
    async with session.post(url + "/v1/predict", data=npy(x),
                            headers={"Content-Type": "application/x-npy"}) as r:
        return r.status, await r.json()


def pairs_then_metrics(url, xs, timeout_s):
    """Send the queries two at a time (a pair arriving together forms one coding group of
    k=2), then read /metrics: (replies, metrics text)."""
    async def main():
        async with aiohttp.ClientSession() as s:
            replies = []
            for i in range(0, len(xs), 2):
                replies += await asyncio.gather(ask(s, url, xs[i]), ask(s, url, xs[i + 1]))
            async with s.get(url + "/metrics") as r:
                return replies, await r.text()

    return asyncio.run(asyncio.wait_for(main(), timeout_s))


def assert_exact(xs, replies):
    """Every reply carries F(x) = flatten(x) @ W for its query (original or rebuilt)."""
    for x, (_, r) in zip(xs, replies):
        np.testing.assert_allclose(r["outputs"], (x.reshape(1, 64) @ W)[0], rtol=1e-4,
                                   atol=1e-4)


def queries(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 1, 8, 8), dtype=np.float32)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_parity_rebuilds_a_stragglers_answers_exactly_before_the_deadline(linear, batch):
    """Also with workers batching queued queries (--max-batch): coding groups are formed per
    query, so a group's members and its parity query may sit in different batches."""
    srv = Server("--model", linear, "--parity-model", linear, "--k", "2", "--workers", "2",
                 "--policy", "parity", "--deadline-ms", "400", "--group-timeout-ms", "20",
                 "--inject", "0:delay_ms=1500;1:delay_ms=30", "--max-batch", str(batch))
    try:
        xs = queries(12)
        replies, metrics = pairs_then_metrics(srv.url, xs, 120)
    finally:
        srv.close()
    sources = [r["source"] for _, r in replies]
    assert all(status == 200 for status, _ in replies)
    assert "reconstructed" in sources and "default" not in sources, sources
    for x, (_, r) in zip(xs, replies):
        want = x.reshape(1, 64) @ W
        np.testing.assert_allclose(r["outputs"], want[0], rtol=1e-4, atol=1e-4)
        assert r["class"] == int(want.argmax()) and r["ms"] < 400
    assert 'legato_queries_total{source="reconstructed"}' in metrics
    _check_exposition(metrics, queries=len(xs), workers=3)


def _check_exposition(text, *, queries, workers):
    """/metrics as Prometheus' own parser reads it: every family typed and described, the
    latency histogram cumulative and counting every query, one up-gauge per worker."""
    parser = pytest.importorskip("prometheus_client.parser",
                                 reason="prometheus-client is not installed here")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert all(f.documentation for f in families.values()), families
    hist = families["legato_request_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [s.value for s in hist.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == queries
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count == queries
    up = [s for s in families["legato_worker_up"].samples]
    assert len(up) == workers and {s.labels["role"] for s in up} >= {"base"}
    # the parser names a counter's family without its _total suffix
    assert families["legato_queries"].type == "counter"
    assert families["legato_worker_restarted"].type == "counter"


def test_without_redundancy_a_straggler_gives_defaults_at_the_deadline(linear):
    srv = Server("--model", linear, "--workers", "1", "--policy", "none", "--deadline-ms",
                 "150", "--inject", "0:delay_ms=1000")
    try:
        async def main():
            async with aiohttp.ClientSession() as s:
                return await ask(s, srv.url, queries(1)[0])

        status, r = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        srv.close()
    assert status == 200 and r["source"] == "default" and "150 ms deadline" in r["reason"]
    assert r["outputs"] == [0.0] * 10


def test_a_killed_worker_is_restarted_and_every_query_answered_once(linear):
    srv = Server("--model", linear, "--parity-model", linear, "--k", "2", "--workers", "2",
                 "--policy", "parity", "--deadline-ms", "1000")
    try:
        async def main():
            async with aiohttp.ClientSession() as s:
                async with s.get(srv.url + "/v1/health") as r:
                    before = await r.json()
                victim = before["workers"][0]["pid"]
                xs = queries(60, seed=1)
                tasks = []
                for i, x in enumerate(xs):
                    tasks.append(asyncio.create_task(ask(s, srv.url, x)))
                    await asyncio.sleep(0.01)
                    if i == 20:
                        os.kill(victim, signal.SIGKILL)
                replies = await asyncio.gather(*tasks)
                for _ in range(100):                     # the frontend restarts it
                    async with s.get(srv.url + "/v1/health") as r:
                        after = await r.json()
                    if after["workers"][0]["alive"] and after["workers"][0]["restarts"]:
                        break
                    await asyncio.sleep(0.1)
                return xs, replies, after

        xs, replies, after = asyncio.run(asyncio.wait_for(main(), 150))
    finally:
        srv.close()
    assert len(replies) == 60 and all(status == 200 for status, _ in replies)
    assert after["workers"][0]["restarts"] >= 1 and after["workers"][0]["alive"]
    answered = [(x, q) for x, q in zip(xs, replies) if q[1]["source"] != "default"]
    assert_exact([x for x, _ in answered], [q for _, q in answered])
    assert sum(r["source"] == "default" for _, r in replies) <= 2


def test_bad_bodies_get_4xx_with_a_message(linear):
    srv = Server("--model", linear, "--workers", "1", "--policy", "none")
    try:
        async def main():
            out = []
            async with aiohttp.ClientSession() as s:
                for data, ctype in ((npy(np.zeros((1, 1, 4, 4), np.float32)),
                                     "application/x-npy"),
                                    (npy(np.zeros((1, 1, 8, 8), np.float64)),
                                     "application/x-npy"),
                                    (b"{not json", "application/json"),
                                    (json.dumps({"x": 1}).encode(), "application/json"),
                                    (b"\0" * (5 << 20), "application/x-npy")):
                    async with s.post(srv.url + "/v1/predict", data=data,
                                      headers={"Content-Type": ctype}) as r:
                        out.append((r.status, await r.text()))
                ok = await ask(s, srv.url, np.ones((1, 8, 8), np.float32))
                js = await s.post(srv.url + "/v1/predict",
                                  json={"inputs": np.ones((1, 8, 8)).tolist()})
                out.append((js.status, await js.text()))
            return out, ok

        out, ok = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        srv.close()
    assert [s for s, _ in out[:5]] == [400, 400, 400, 400, 413]
    assert "a query has shape [1, 8, 8]" in out[0][1] and "float32" in out[1][1]
    assert "inputs" in out[3][1]
    assert ok[0] == 200 and ok[1]["source"] == "original" and out[5][0] == 200


def test_bad_command_lines_exit_2(linear, tmp_path):
    for argv, msg in ((["--model", linear, "--policy", "parity"], "needs --parity-model"),
                      (["--model", str(tmp_path / "none.onnx")], "does not exist"),
                      (["--model", linear, "--policy", "none", "--inject", "x:1"], "INDEX:SPEC")):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "legato.cli", "serve", *argv],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
        assert time.monotonic() - t0 < 60


def test_overload_gets_503_with_retry_after_not_an_unbounded_queue(linear):
    srv = Server("--model", linear, "--workers", "1", "--policy", "none", "--max-inflight", "2",
                 "--deadline-ms", "2000", "--inject", "0:delay_ms=300")
    try:
        async def main():
            async with aiohttp.ClientSession() as s:
                async def one(x):
                    async with s.post(srv.url + "/v1/predict", data=npy(x),
                                      headers={"Content-Type": "application/x-npy"}) as r:
                        return r.status, r.headers.get("Retry-After")
                return await asyncio.gather(*(one(x) for x in queries(6, seed=3)))

        results = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        srv.close()
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 503, 503, 503, 503], results
    assert all(ra == "1" for s, ra in results if s == 503)


def _workers_of(url):
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/health") as r:
                return [w["pid"] for w in (await r.json())["workers"]]
    return asyncio.run(asyncio.wait_for(main(), 30))


def _gone(pid, within_s=10.0):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:                                          # reap it if it is our grandchild's zombie
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_its_frontend(linear, sig):
    srv = Server("--model", linear, "--workers", "2", "--policy", "none")
    pids = _workers_of(srv.url)
    srv.proc.send_signal(sig)
    srv.proc.wait(30)
    assert all(_gone(pid) for pid in pids), pids


def test_hedging_sends_a_late_query_to_an_extra_worker_and_the_first_answer_wins(linear):
    srv = Server("--model", linear, "--workers", "2", "--k", "2", "--policy", "hedge",
                 "--hedge-ms", "50", "--deadline-ms", "600", "--inject", "0:delay_ms=1500")
    try:
        async def main():
            async with aiohttp.ClientSession() as s:
                xs = queries(8, seed=4)
                replies = [await ask(s, srv.url, x) for x in xs]   # one at a time
                async with s.get(srv.url + "/metrics") as r:
                    metrics = await r.text()
                return xs, replies, metrics

        xs, replies, metrics = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        srv.close()
    assert all(status == 200 and r["source"] == "original" for status, r in replies), replies
    hedged = [r for _, r in replies if r["reason"].startswith("hedged after 50 ms")]
    assert hedged and all(r["ms"] < 600 for _, r in replies)
    assert_exact(xs, replies)
    assert "legato_hedges_total" in metrics


def adaptive_run(model, parity_model, *extra):
    srv = Server("--model", model, "--parity-model", parity_model, "--k", "2", "--workers",
                 "2", "--policy", "adaptive", "--adaptive-warmup", "10", "--deadline-ms", "3000",
                 "--group-timeout-ms", "20", "--inject", "0:delay_ms=600", *extra)
    try:
        xs = queries(60, seed=5)
        replies, metrics = pairs_then_metrics(srv.url, xs, 150)
        health = asyncio.run(get_json(srv.url + "/v1/health"))
    finally:
        srv.close()
    assert all(status == 200 and r["source"] != "default" for status, r in replies), replies
    assert_exact(xs, replies)
    modes = {line.split('"')[1]: int(line.split()[-1]) for line in metrics.splitlines()
             if line.startswith("legato_adaptive_mode_total{")}
    return replies, modes, health["adaptive"]


async def get_json(url):
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


def test_adaptive_codes_when_hedges_would_come_too_late(linear):
    """Worker 0 answers 600 ms late and hedges wait 1000 ms: once worker 0's slowness is seen,
    parity is predicted far faster than hedging, and queries are coded and rebuilt."""
    replies, modes, adaptive = adaptive_run(linear, linear, "--hedge-ms", "1000")
    assert adaptive["mode"] == "parity", adaptive
    assert adaptive["predicted_p999_ms"]["parity"] < adaptive["predicted_p999_ms"]["hedge"]
    assert modes["parity"] >= 10, modes
    assert any(r["source"] == "reconstructed" for _, r in replies[-20:])


def test_adaptive_never_codes_with_an_inaccurate_parity_model(linear, tmp_path):
    """The same straggler, but the parity model's report (beside it) says degraded mode is 45
    points less accurate than the base model: the adaptive policy hedges instead."""
    parity = tmp_path / "parity.onnx"
    parity.write_bytes(open(linear, "rb").read())
    (tmp_path / "report.json").write_text(json.dumps({"base_accuracy": 0.95,
                                                      "degraded_accuracy": 0.5}))
    replies, modes, adaptive = adaptive_run(linear, str(parity), "--hedge-ms", "50")
    assert modes["parity"] == 0 and "parity" not in adaptive["predicted_p999_ms"], adaptive
    assert adaptive["mode"] in ("hedge", "wait") and modes["hedge"] >= 10, modes
    assert all(r["source"] == "original" for _, r in replies)


def test_full_replication_sends_every_query_twice_and_the_first_answer_wins(linear):
    srv = Server("--model", linear, "--workers", "2", "--policy", "full", "--deadline-ms",
                 "600", "--inject", "0:delay_ms=1500")
    try:
        xs = queries(10, seed=6)
        replies, _ = pairs_then_metrics(srv.url, xs, 120)
        health = asyncio.run(get_json(srv.url + "/v1/health"))
    finally:
        srv.close()
    assert len(health["workers"]) == 4                  # 2 base workers and 2 replicas
    assert all(status == 200 and r["source"] == "original" and r["ms"] < 600
               for status, r in replies), replies
    assert_exact(xs, replies)


def test_a_cheap_backup_answers_for_a_late_worker(linear, tmp_path):
    """The backup model (here a different linear map) answers the queries whose worker is
    1.5 s late, once the hedge delay passed; the others get their original answers."""
    w_backup = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)
    backup = write_linear(tmp_path / "backup.onnx", w_backup)
    srv = Server("--model", linear, "--backup-model", backup, "--workers", "2", "--k", "2",
                 "--policy", "backup", "--hedge-ms", "100", "--deadline-ms", "600",
                 "--inject", "0:delay_ms=1500")
    try:
        xs = queries(10, seed=7)
        replies, metrics = pairs_then_metrics(srv.url, xs, 120)
    finally:
        srv.close()
    assert all(status == 200 and r["source"] in ("original", "backup") for status, r in replies)
    sources = [r["source"] for _, r in replies]
    assert "backup" in sources and "original" in sources, sources
    for x, (_, r) in zip(xs, replies):
        want = x.reshape(1, 64) @ (W if r["source"] == "original" else w_backup)
        np.testing.assert_allclose(r["outputs"], want[0], rtol=1e-4, atol=1e-4)
        if r["source"] == "backup":
            assert 100 <= r["ms"] < 600 and "backup model" in r["reason"], r
    assert 'legato_queries_total{source="backup"}' in metrics


def test_backup_policy_needs_a_backup_model(linear):
    proc = subprocess.run([sys.executable, "-m", "legato.cli", "serve", "--model", linear,
                           "--policy", "backup"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--backup-model" in proc.stderr, proc.stderr


def test_faults_for_every_worker_slow_the_parity_workers_too(linear):
    """`*:` reaches the extra workers: the parity model costs what the base model costs, so a
    delay standing in for compute must slow it too (worker 1 overrides it with no delay)."""
    srv = Server("--model", linear, "--parity-model", linear, "--k", "2", "--workers", "2",
                 "--policy", "parity", "--deadline-ms", "1000", "--group-timeout-ms", "20",
                 "--inject", "*:delay_ms=150;0:delay_ms=1500;1:delay_ms=0")
    try:
        replies, _ = pairs_then_metrics(srv.url, queries(8, seed=8), 120)
    finally:
        srv.close()
    rebuilt = [r for _, r in replies if r["source"] == "reconstructed"]
    assert rebuilt and all(150 <= r["ms"] < 1000 for r in rebuilt), replies


def test_faults_for_every_worker_draw_with_a_seed_per_worker():
    """The same seed on every worker would pause their n-th requests together."""
    from legato.core.parity.faults import FaultSpec
    from legato.core.parity.frontend import faults_for, parse_inject

    inject = parse_inject("*:delay_ms=20,pause=0.03,seed=7;1:delay_ms=5")
    specs = [FaultSpec.parse(faults_for(inject, i)) for i in range(4)]
    assert [s.seed for s in specs] == [7, 0, 9, 10]
    assert specs[1].delay_ms == 5 and specs[3].delay_ms == 20 and specs[3].pause == 0.03
    assert faults_for(parse_inject(None), 0) is None
