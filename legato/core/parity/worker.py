"""A model worker: ONNX models in onnxruntime behind the frame protocol (`wire.py`).

    legato worker --model base.onnx [--model parity.onnx] --port 7001 [--threads 1]
                  [--max-batch 4] [--inject pause=0.03,seed=1]

With several `--model`s a request names the one to run (`"model": i`, default 0): the adaptive
policy's extra workers serve a hedged copy or a parity query, whichever is needed.

Requests run in arrival order (FCFS, like one model replica), one at a time or, with
`--max-batch B`, up to B queued requests for the same model in one onnxruntime call (dynamic
batching: a batch is whatever queued while the previous one ran; an injected pause delays the
whole batch by the longest pause drawn for its requests). A request still
queued can be cancelled (`{"op": "cancel", "ids": [...]}`): the frontend does so when a
reconstruction made it useless. Every request gets exactly one reply: `{"op": "reply", "id",
"ms"}` with the output array, or `{"op": "error", "id", "error"}` (a bad input, or
"cancelled"). Injected faults (`faults.py`) delay a request before it runs.
A connection that sends a malformed frame gets an error frame and is closed; the worker goes
on serving its other connections.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any

import numpy as np

from legato.core.errors import ConfigError
from legato.core.parity.faults import Faults, FaultSpec, start_hogs
from legato.core.parity.wire import WireError, read_frame, write_frame

__all__ = ["ModelWorker", "serve"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)             # jobs compare by identity
class _Job:
    rid: Any
    x: np.ndarray
    model: int
    writer: asyncio.StreamWriter
    lock: asyncio.Lock


class ModelWorker:
    """Serve `model_path` on host:port (port 0: any free port, see `port` after `start`)."""

    def __init__(self, model_path: str | list[str], *, host: str = "127.0.0.1", port: int = 0,
                 threads: int = 1, faults: FaultSpec | None = None, max_batch: int = 1
                 ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        paths = [model_path] if isinstance(model_path, str) else list(model_path)
        self.sessions = []
        for path in paths:                       # model 0 is the default; a request may pick
            try:
                self.sessions.append(ort.InferenceSession(path, opts,
                                                          providers=["CPUExecutionProvider"]))
            except Exception as err:  # noqa: BLE001 (any load failure is the file's fault)
                raise ConfigError(f"cannot load the model {path} in onnxruntime: "
                                  f"{str(err).splitlines()[0]}") from err
        self._inputs = [s.get_inputs()[0].name for s in self.sessions]
        inp = self.sessions[0].get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = [d if isinstance(d, int) else None for d in inp.shape]
        if max_batch < 1:
            raise ConfigError(f"--max-batch {max_batch} is not >= 1")
        self.host, self.port, self.max_batch = host, port, max_batch
        self.batches = 0
        self.faults = Faults(faults or FaultSpec())
        self.queue: collections.deque[_Job] = collections.deque()
        self.served = 0
        self._wake = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._runner: asyncio.Task | None = None

    def health(self) -> dict:
        return {"op": "health", "ok": True, "queued": len(self.queue), "served": self.served,
                "batches": self.batches, "max_batch": self.max_batch,
                "input": self.input_name, "shape": self.input_shape,
                "output": self.sessions[0].get_outputs()[0].name,
                "models": len(self.sessions)}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._runner = asyncio.create_task(self._run())

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        lock = asyncio.Lock()
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                except WireError as err:
                    async with lock:
                        await write_frame(writer, {"op": "error", "id": None, "error": str(err)})
                    return
                if frame is None:
                    return
                header, arrays = frame
                await self._handle(header, arrays, writer, lock)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _handle(self, header: dict, arrays: list, writer, lock) -> None:
        op, rid = header.get("op"), header.get("id")
        if op == "health":
            async with lock:
                await write_frame(writer, {**self.health(), "id": rid})
        elif op == "cancel":
            ids = set(header.get("ids", []))
            dropped = [j for j in self.queue if j.rid in ids and j.writer is writer]
            gone = {id(j) for j in dropped}
            self.queue = collections.deque(j for j in self.queue if id(j) not in gone)
            for job in dropped:                  # the queue is settled before any await
                async with lock:
                    await write_frame(writer, {"op": "error", "id": job.rid,
                                               "error": "cancelled"})
        elif op == "predict" and len(arrays) == 1:
            model = header.get("model", 0)
            if not isinstance(model, int) or not 0 <= model < len(self.sessions):
                async with lock:
                    await write_frame(writer, {"op": "error", "id": rid, "error":
                                               f"model {model!r} is not one of the "
                                               f"{len(self.sessions)} this worker serves"})
                return
            self.queue.append(_Job(rid, arrays[0], model, writer, lock))
            self._wake.set()
        else:
            async with lock:
                await write_frame(writer, {"op": "error", "id": rid,
                                           "error": f"unknown op {op!r} or wrong number of "
                                                    "arrays (predict takes one)"})

    def _next_batch(self) -> list[_Job]:
        """The oldest queued request and, up to max_batch, the next ones for the same model
        with the same query shape (the others keep their places)."""
        first = self.queue.popleft()
        batch, keep = [first], collections.deque()
        while self.queue and len(batch) < self.max_batch:
            job = self.queue.popleft()
            same = job.model == first.model and job.x.shape[1:] == first.x.shape[1:]
            (batch if same else keep).append(job)
        keep.extend(self.queue)
        self.queue = keep
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._next_batch()
            delay = max(self.faults.next_delay_s() for _ in batch)
            t0 = time.perf_counter()
            if delay:
                await asyncio.sleep(delay)
            replies = None
            if len(batch) > 1:
                try:
                    out = await loop.run_in_executor(
                        None, self._predict, np.concatenate([j.x for j in batch]),
                        batch[0].model)
                    outs = np.split(out, np.cumsum([len(j.x) for j in batch])[:-1])
                    replies = [({"op": "reply", "id": j.rid}, [o]) for j, o in zip(batch, outs)]
                except Exception:  # noqa: BLE001 (one bad input: run them one by one below)
                    replies = None
            if replies is None:
                replies = [await self._predict_one(loop, j) for j in batch]
            ms = (time.perf_counter() - t0) * 1e3
            self.served += len(batch)
            self.batches += 1
            for job, (header, arrays) in zip(batch, replies):
                header["ms"] = ms
                try:
                    async with job.lock:
                        await write_frame(job.writer, header, arrays)
                except (ConnectionError, RuntimeError):
                    pass                          # the client went away

    async def _predict_one(self, loop, job: _Job) -> tuple[dict, list]:
        try:
            out = await loop.run_in_executor(None, self._predict, job.x, job.model)
            return {"op": "reply", "id": job.rid}, [out]
        except Exception as err:  # noqa: BLE001 (a bad input answers that request only)
            return {"op": "error", "id": job.rid,
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}, []

    def _predict(self, x: np.ndarray, model: int = 0) -> np.ndarray:
        return self.sessions[model].run(None, {self._inputs[model]: x})[0]


def serve(model_path: str | list[str], *, host: str = "127.0.0.1", port: int = 0, threads: int = 1,
          inject: str | None = None, ready=None, exit_with_parent: bool = False,
          max_batch: int = 1) -> None:
    """Run a worker until killed; `ready(port)` is called once it listens. With
    `exit_with_parent` it also exits when the process that started it is gone (a frontend
    killed with SIGKILL leaves no orphan workers)."""
    import os

    async def main() -> None:
        parent = os.getppid()
        spec = FaultSpec.parse(inject)
        worker = ModelWorker(model_path, host=host, port=port, threads=threads,
                             faults=spec, max_batch=max_batch)
        await worker.start()
        hogs = start_hogs(spec.hog)
        try:
            if ready is not None:
                ready(worker.port)
            while True:
                await asyncio.sleep(0.5)
                if exit_with_parent and os.getppid() != parent:
                    return
        finally:
            for hog in hogs:
                hog.kill()

    asyncio.run(main())
