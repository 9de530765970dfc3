"""The frontend <-> model worker protocol: length-prefixed frames over TCP on 127.0.0.1.

A frame is a 4-byte big-endian header length, a UTF-8 JSON header, then the raw bytes of the
arrays the header lists (`"arrays": [{"dtype": "float32", "shape": [2, 64]}, ...]`, C order).
Headers carry `"op"` ("predict", "cancel", "health", "reply", "error") and an `"id"`.
Limits keep a bad peer from making the other side allocate without bound: a header of at most
`MAX_HEADER` bytes and arrays of at most `max_bytes` together; a violation is a `WireError`
naming the limit.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from typing import Any, Sequence

import numpy as np

from legato.core.errors import LegatoError

__all__ = ["MAX_BYTES", "MAX_HEADER", "WireError", "encode_frame", "read_frame", "write_frame"]

MAX_HEADER = 64 * 1024
MAX_BYTES = 64 * 1024 * 1024
_DTYPES = {"float32", "float64", "float16", "int64", "int32", "uint8", "bool"}


class WireError(LegatoError):
    """A malformed or oversized frame; the message names what was wrong."""


async def read_frame(reader: asyncio.StreamReader, *, max_bytes: int = MAX_BYTES
                     ) -> tuple[dict[str, Any], list[np.ndarray]] | None:
    """The next frame, or None at a clean end of stream (between frames)."""
    try:
        prefix = await reader.readexactly(4)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise WireError("the stream ended inside a frame's length prefix") from None
    (size,) = struct.unpack(">I", prefix)
    if size > MAX_HEADER:
        raise WireError(f"frame header of {size} bytes exceeds {MAX_HEADER}")
    try:
        header = json.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise WireError("the stream ended inside a frame header") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"frame header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise WireError("frame header must be a JSON object")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise WireError("frame header \"arrays\" must be a list of array specs")
    arrays, total = [], 0
    sizes = []
    for spec in specs:
        try:
            dtype = np.dtype(spec["dtype"])
            shape = tuple(int(d) for d in spec["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"bad array spec {spec!r} ({err})") from None
        if str(dtype) not in _DTYPES or any(d < 0 for d in shape):
            raise WireError(f"array spec {spec!r}: dtype must be one of {sorted(_DTYPES)} and "
                            "dims non-negative")
        # Python integers: numpy's int64 product wraps, and a huge array then passed as small
        n = math.prod(shape) * dtype.itemsize
        total += n
        sizes.append((dtype, shape, n))
    if total > max_bytes:
        raise WireError(f"frame arrays of {total} bytes exceed the limit of {max_bytes}")
    for dtype, shape, n in sizes:
        try:
            data = await reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise WireError("the stream ended inside a frame's arrays") from None
        arrays.append(np.frombuffer(data, dtype=dtype).reshape(shape))
    return header, arrays


def encode_frame(header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> bytes:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = dict(header)
    head["arrays"] = [{"dtype": str(a.dtype), "shape": list(a.shape)} for a in arrays]
    raw = json.dumps(head).encode()
    if len(raw) > MAX_HEADER:
        raise WireError(f"frame header of {len(raw)} bytes exceeds {MAX_HEADER}")
    return b"".join([struct.pack(">I", len(raw)), raw, *(a.tobytes() for a in arrays)])


async def write_frame(writer: asyncio.StreamWriter, header: dict[str, Any],
                      arrays: Sequence[np.ndarray] = ()) -> None:
    writer.write(encode_frame(header, arrays))
    await writer.drain()
