"""Model workers on 127.0.0.1 (legato/core/parity/{worker,client,wire,faults}.py): real
`legato worker` processes serving an ONNX model, requests in flight, cancellation, errors that
answer one request, malformed frames, seeded faults, and a SIGKILLed worker failing its
pending requests instead of hanging them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from legato.core.errors import ConfigError
from legato.core.parity.client import WorkerClient, WorkerError, WorkerGone
from legato.core.parity.faults import Faults, FaultSpec

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(120)

W = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "linear.onnx"
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                          [numpy_helper.from_array(W, "w")])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def start_worker(model, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "legato.cli", "worker", "--model", model,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.rsplit(":", 1)[1])


@pytest.fixture
def worker(model):
    proc, port = start_worker(model)
    yield proc, port
    proc.kill()
    proc.wait(10)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_requests_in_flight_come_back_in_order_with_the_models_outputs(worker):
    _, port = worker

    async def main():
        client = await WorkerClient.connect("127.0.0.1", port)
        xs = [np.random.default_rng(i).normal(size=(2, 6)).astype(np.float32) for i in range(20)]
        outs = await asyncio.gather(*(client.submit(x) for x in xs))
        for x, out in zip(xs, outs):
            np.testing.assert_allclose(out, x @ W, rtol=1e-5)
        health = await client.health()
        assert health["served"] == 20 and health["shape"] == [None, 6]
        await client.close()

    run(main())


def test_a_bad_input_fails_that_request_only_and_cancel_drops_queued_work(model):
    proc, port = start_worker(model, "--inject", "delay_ms=50")
    try:
        async def main():
            client = await WorkerClient.connect("127.0.0.1", port)
            bad = client.submit(np.zeros((2, 5), np.float32))
            good = client.submit(np.ones((1, 6), np.float32))
            queued = [client.submit(np.ones((1, 6), np.float32)) for _ in range(5)]
            await client.cancel([f.rid for f in queued[2:]])
            with pytest.raises(WorkerError, match="worker 127.0.0.1"):
                await bad
            np.testing.assert_allclose(await good, np.ones((1, 6)) @ W, rtol=1e-5)
            results = await asyncio.gather(*queued, return_exceptions=True)
            assert all(isinstance(r, np.ndarray) for r in results[:2])
            assert all(isinstance(r, WorkerError) and "cancelled" in str(r)
                       for r in results[2:])
            await client.close()

        run(main())
    finally:
        proc.kill()
        proc.wait(10)


def test_a_malformed_frame_gets_an_error_and_the_worker_keeps_serving(worker):
    _, port = worker

    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\x00\x00\x05notjs")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        assert b"not JSON" in data
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = json.dumps({"op": "predict", "id": 1,
                           "arrays": [{"dtype": "float32", "shape": [1 << 30]}]}).encode()
        writer.write(struct.pack(">I", len(head)) + head)      # claims 4 GiB: refused unread
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        assert b"exceed the limit" in data
        writer.close()
        client = await WorkerClient.connect("127.0.0.1", port)   # still serving
        out = await client.submit(np.ones((1, 6), np.float32))
        np.testing.assert_allclose(out, np.ones((1, 6)) @ W, rtol=1e-5)
        await client.close()

    run(main())


def test_a_killed_worker_fails_pending_requests_instead_of_hanging(model):
    proc, port = start_worker(model, "--inject", "delay_ms=300")

    async def main():
        client = await WorkerClient.connect("127.0.0.1", port)
        futs = [client.submit(np.ones((1, 6), np.float32)) for _ in range(3)]
        await asyncio.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, WorkerGone) for r in results), results
        late = client.submit(np.ones((1, 6), np.float32))
        with pytest.raises(WorkerGone):
            await late
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        with pytest.raises(WorkerGone, match="cannot connect"):
            await WorkerClient.connect("127.0.0.1", port, timeout_s=2)

    try:
        run(main())
    finally:
        proc.wait(10)


def test_faults_are_seeded_heavy_tailed_and_replayable():
    spec = FaultSpec.parse("pause=0.1,alpha=1.5,scale_ms=10,seed=3")
    a = [Faults(spec).next_delay_s() for _ in range(1)]
    f1, f2 = Faults(spec), Faults(spec)
    d1 = [f1.next_delay_s() for _ in range(2000)]
    assert d1 == [f2.next_delay_s() for _ in range(2000)] and d1[0] == a[0]
    paused = [d for d in d1 if d > 0]
    assert 140 < len(paused) < 260 and min(paused) >= 0.010 and max(paused) > 0.1
    assert Faults(FaultSpec.parse("delay_ms=5")).next_delay_s() == pytest.approx(0.005)
    for bad in ("pause", "pause=2", "speed=1", "alpha=x"):
        with pytest.raises(ConfigError):
            FaultSpec.parse(bad)


def test_bad_command_lines_exit_2(model, tmp_path):
    for argv, msg in ((["--model", str(tmp_path / "none.onnx")], "does not exist"),
                      (["--model", model, "--inject", "speed=1"], "KEY=VALUE")):
        proc = subprocess.run([sys.executable, "-m", "legato.cli", "worker", *argv],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "legato.cli", "worker", "--model", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot load the model" in proc.stderr
    assert time.monotonic() - t0 < 60


def test_dynamic_batching_runs_queued_requests_together_and_isolates_a_bad_one(model):
    """With --max-batch 4, requests queued behind a slow first one run four at a time; a
    float64 request in a batch makes the batched call fail, and then only it fails."""
    proc, port = start_worker(model, "--max-batch", "4", "--inject", "delay_ms=100")
    try:
        async def main():
            client = await WorkerClient.connect("127.0.0.1", port)
            xs = [np.random.default_rng(i).normal(size=(1 + i % 2, 6)).astype(np.float32)
                  for i in range(9)]
            outs = await asyncio.gather(*(client.submit(x) for x in xs))
            for x, out in zip(xs, outs):
                np.testing.assert_allclose(out, x @ W, rtol=1e-5)
            health = await client.health()
            assert health["served"] == 9 and health["batches"] == 3, health   # 1 + 4 + 4
            first = client.submit(xs[0])              # runs alone while the next four queue
            queued = [client.submit(x) for x in xs[1:4]]
            queued.append(client.submit(np.ones((1, 6), np.float64)))
            results = await asyncio.gather(first, *queued, return_exceptions=True)
            assert isinstance(results[-1], WorkerError), results[-1]
            for x, out in zip(xs, results[:-1]):
                np.testing.assert_allclose(out, x @ W, rtol=1e-5)
            assert (await client.health())["batches"] == 3 + 2      # alone, then one of four
            await client.close()

        run(main())
    finally:
        proc.kill()
        proc.wait(10)


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout.split()
    return [int(p) for p in out]


def _stat(pid):
    """(state, cpu seconds) of a process, or None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    if fields[0] == "Z":
        return None
    return fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_cpu_hog_runs_beside_the_worker_and_dies_with_it(model):
    proc, port = start_worker(model, "--inject", "hog=1")
    try:
        hogs = _children(proc.pid)
        assert len(hogs) == 1
        before, t0 = _stat(hogs[0])[1], time.monotonic()
        time.sleep(1.0)
        used = _stat(hogs[0])[1] - before
        assert used > 0.3 * (time.monotonic() - t0), used      # busy, even on 2 shared cores
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _stat(hogs[0]) is not None:
        time.sleep(0.1)
    assert _stat(hogs[0]) is None, "the hog outlived its worker"


def test_an_array_size_that_wraps_int64_is_not_taken_for_a_small_one():
    """A header whose dims multiply past 2**63 (numpy's int64 product wraps to 0 or a negative
    that cancels a real size) is refused before anything is read or allocated."""
    import asyncio
    import json as _json
    import struct

    from legato.core.parity import wire

    def frame(specs):
        head = _json.dumps({"op": "predict", "arrays": specs}).encode()
        return struct.pack("!I", len(head)) + head

    async def read(raw):
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await wire.read_frame(reader)

    for specs in ([{"dtype": "float32", "shape": [2 ** 62, 4]}],
                  [{"dtype": "float32", "shape": [2 ** 61, 2 ** 3]},
                   {"dtype": "float32", "shape": [16]}]):
        with pytest.raises(wire.WireError, match="exceed the limit"):
            asyncio.run(read(frame(specs)))
    with pytest.raises(wire.WireError, match="must be a list"):
        asyncio.run(read(frame({"dtype": "float32"})))
