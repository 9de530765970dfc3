"""The frontend's side of the worker protocol: one connection, many requests in flight.

    client = await WorkerClient.connect("127.0.0.1", port)
    fut = client.submit(x)            # an asyncio.Future of the output array
    await client.cancel([fut.rid])    # if still queued there, it fails with WorkerError
    out = await fut

A lost connection fails every pending future with `WorkerGone`, so no request waits forever.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import numpy as np

from legato.core.errors import LegatoError
from legato.core.parity.wire import WireError, encode_frame, read_frame

__all__ = ["WorkerClient", "WorkerError", "WorkerGone"]


class WorkerError(LegatoError):
    """The worker answered a request with an error (bad input, "cancelled")."""


class WorkerGone(WorkerError):
    """The connection to the worker was lost (killed, crashed, closed)."""


class WorkerClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 address: str) -> None:
        self.address = address
        self._reader, self._writer = reader, writer
        self._pending: dict[Any, asyncio.Future] = {}
        self._ids = itertools.count()
        self._drainer: asyncio.Task | None = None
        self.closed = False
        self._task = asyncio.create_task(self._read_replies())

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout_s: float = 5.0) -> "WorkerClient":
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                    timeout_s)
        except (OSError, asyncio.TimeoutError) as err:
            raise WorkerGone(f"cannot connect to the worker at {host}:{port} ({err})") from None
        return cls(reader, writer, f"{host}:{port}")

    def submit(self, x: np.ndarray, model: int = 0) -> asyncio.Future:
        """Send one predict request (to the worker's model `model`); the future resolves to the
        output (`fut.rid` is its id)."""
        fut = asyncio.get_running_loop().create_future()
        rid = next(self._ids)
        fut.rid = rid  # type: ignore[attr-defined]
        if self.closed:
            fut.set_exception(WorkerGone(f"the worker at {self.address} is gone"))
            return fut
        self._pending[rid] = fut
        self._send({"op": "predict", "id": rid, "model": model}, [x])
        return fut

    async def cancel(self, rids: list) -> None:
        """Ask the worker to drop these requests if they are still queued (they then fail
        with WorkerError "cancelled"); frames go out in call order, so a cancel never passes
        the request it names."""
        if rids and not self.closed:
            self._send({"op": "cancel", "ids": list(rids)}, [])
            await self._drain()

    async def health(self, timeout_s: float = 5.0) -> dict:
        fut = asyncio.get_running_loop().create_future()
        rid = f"h{next(self._ids)}"
        self._pending[rid] = fut
        self._send({"op": "health", "id": rid}, [])
        return await asyncio.wait_for(fut, timeout_s)

    def _send(self, header: dict, arrays: list) -> None:
        """Queue a frame on the connection now (in call order); flow control drains later."""
        try:
            self._writer.write(encode_frame(header, arrays))
        except (ConnectionError, RuntimeError, WireError) as err:
            self._fail_all(WorkerGone(f"lost the worker at {self.address} while sending "
                                      f"({type(err).__name__}: {err})"))
            return
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as err:
            self._fail_all(WorkerGone(f"lost the worker at {self.address} while sending "
                                      f"({type(err).__name__}: {err})"))

    async def _read_replies(self) -> None:
        why = "the worker closed the connection"
        try:
            while True:
                frame = await read_frame(self._reader)
                if frame is None:
                    break
                header, arrays = frame
                fut = self._pending.pop(header.get("id"), None)
                if fut is None or fut.done():
                    continue
                if header.get("op") == "reply":
                    fut.set_result(arrays[0] if arrays else None)
                elif header.get("op") == "health":
                    fut.set_result(header)
                else:
                    fut.set_exception(WorkerError(f"worker {self.address}: "
                                                  f"{header.get('error', header)}"))
        except (ConnectionError, WireError, asyncio.IncompleteReadError) as err:
            why = f"{type(err).__name__}: {err}"
        self._fail_all(WorkerGone(f"lost the worker at {self.address} ({why})"))

    def _fail_all(self, err: Exception) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def close(self) -> None:
        self.closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, RuntimeError):
            pass
        self._task.cancel()
        self._fail_all(WorkerGone(f"the client closed its connection to {self.address}"))
