"""The Open Inference Protocol (KServe v2, as Triton and MLServer speak it) for the coded-inference
frontend: request parsing and reply encoding, with the binary tensor data extension that
tritonclient uses. Framework-free (numpy only); `frontend.py` routes the HTTP calls here.

A request names the model's input, its datatype and shape, and its data (a JSON list, flat or
nested, or raw little-endian bytes after the JSON header when `Inference-Header-Content-Length`
is given). The leading dimension is the batch: each row becomes one query of its own (coded,
hedged or replicated as the policy says). Request parameters: `deadline_ms` (this request's
deadline, at most the server's), `binary_data_output` (all outputs as raw bytes). The reply
holds the model's output for every row and, in its parameters, where each answer came from:
`legato_sources` (comma-separated: original, reconstructed, backup, default) and
`legato_reasons` (a JSON list of strings).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from legato.core.errors import ConfigError

__all__ = ["DATATYPES", "InferRequest", "V2Error", "encode_reply", "parse_request"]

# v2 datatype -> numpy dtype (BYTES and BOOL are not numbers a model of floats takes)
DATATYPES = {
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}
HEADER_LENGTH = "Inference-Header-Content-Length"


class V2Error(ConfigError):
    """A request the protocol or the model cannot take (HTTP 400, or `status`)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    x: np.ndarray                 # [batch, *query shape], float32
    request_id: str | None
    deadline_ms: float | None
    binary_output: bool
    outputs: list[str]            # requested output names ([]: all)


def _json_part(body: bytes, headers) -> tuple[dict, bytes]:
    length = headers.get(HEADER_LENGTH)
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise V2Error(f"{HEADER_LENGTH} {length!r} is not a byte count") from None
        if not 0 < n <= len(body):
            raise V2Error(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        data = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise V2Error(f"the request is not JSON ({type(err).__name__}: {str(err)[:120]})") \
            from None
    if not isinstance(data, dict):
        raise V2Error("the request is a JSON object with \"inputs\"")
    return data, rest


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error(f"{where} parameters must be an object")
    return params


def parse_request(body: bytes, headers, *, input_name: str, query_shape: list[int],
                  output_name: str, max_batch: int) -> InferRequest:
    """One inference request for a model of one input `input_name` taking queries of
    `query_shape`; raises V2Error naming what is wrong."""
    data, binary = _json_part(body, headers)
    params = _parameters(data, "request")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise V2Error("the request needs \"inputs\": a list of named tensors")
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        names = [i.get("name") for i in inputs if isinstance(i, dict)]
        raise V2Error(f"this model takes one input, {input_name!r}; got {names}")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise V2Error(f"input {tensor.get('name')!r} is not this model's; its input is "
                      f"{input_name!r}")
    dtype_name = tensor.get("datatype")
    if dtype_name not in DATATYPES:
        raise V2Error(f"datatype {dtype_name!r} is not one this model takes; use one of "
                      f"{', '.join(DATATYPES)}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise V2Error(f"shape {shape!r} is not a list of non-negative integers")
    if shape == list(query_shape):
        shape = [1, *shape]                  # one query without its batch dimension
    if shape[1:] != list(query_shape) or shape[0] < 1:
        dims = ", ".join(map(str, query_shape))
        raise V2Error(f"shape {tensor.get('shape')} is not [batch, {dims}] with batch >= 1")
    if shape[0] > max_batch:
        raise V2Error(f"a batch of {shape[0]} queries is more than the {max_batch} this server "
                      "takes at once; send smaller batches", status=413)
    dtype = np.dtype(DATATYPES[dtype_name])
    count = math.prod(shape)
    tparams = _parameters(tensor, f"input {input_name!r}")
    if "binary_data_size" in tparams:
        size = tparams["binary_data_size"]
        if not isinstance(size, int) or size != count * dtype.itemsize or size > len(binary):
            raise V2Error(f"binary_data_size {size!r} of input {input_name!r} does not hold "
                          f"{count} {dtype_name} values ({count * dtype.itemsize} bytes; "
                          f"{len(binary)} bytes follow the header)")
        x = np.frombuffer(binary[:size], dtype=dtype.newbyteorder("<")).reshape(shape)
    else:
        if "data" not in tensor:
            raise V2Error(f"input {input_name!r} has neither \"data\" nor binary data")
        try:
            x = np.asarray(tensor["data"], dtype=dtype)
        except (TypeError, ValueError, OverflowError) as err:
            raise V2Error(f"the data of input {input_name!r} are not {dtype_name} numbers "
                          f"({str(err)[:120]})") from None
        if x.size != count:
            raise V2Error(f"input {input_name!r} has {x.size} values; shape {shape} needs "
                          f"{count}")
        x = x.reshape(shape)
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise V2Error("inputs contain NaN or infinity (or values beyond float32)")
    deadline = params.get("deadline_ms")
    if deadline is not None:
        if (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                or not math.isfinite(deadline) or deadline <= 0):
            raise V2Error(f"parameter deadline_ms {deadline!r} is not a positive number of "
                          "milliseconds")
        deadline = float(deadline)
    binary_output = params.get("binary_data_output", False) is True
    wanted = []
    requested = data.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise V2Error("\"outputs\" must be a list of {\"name\": ...} objects")
        for out in requested:
            if out.get("name") != output_name:
                raise V2Error(f"output {out.get('name')!r} is not this model's; its output is "
                              f"{output_name!r}")
            wanted.append(output_name)
            if _parameters(out, f"output {output_name!r}").get("binary_data") is True:
                binary_output = True
    request_id = data.get("id")
    return InferRequest(x, None if request_id is None else str(request_id), deadline,
                        binary_output, wanted)


def encode_reply(*, model_name: str, request_id: str | None, output_name: str,
                 outputs: np.ndarray, sources: list[str], reasons: list[str],
                 binary: bool) -> tuple[bytes, dict[str, str]]:
    """The reply body and its headers: `outputs` is [batch, *output shape] float32."""
    out = np.ascontiguousarray(outputs, dtype=np.float32)
    tensor: dict = {"name": output_name, "datatype": "FP32", "shape": list(out.shape)}
    reply: dict = {"model_name": model_name, "model_version": "1",
                   "parameters": {"legato_sources": ",".join(sources),
                                  "legato_reasons": json.dumps(reasons)},
                   "outputs": [tensor]}
    if request_id is not None:
        reply["id"] = request_id
    if not binary:
        tensor["data"] = out.reshape(-1).tolist()
        return json.dumps(reply).encode(), {"Content-Type": "application/json"}
    raw = out.astype("<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(reply).encode()
    return head + raw, {"Content-Type": "application/octet-stream",
                        HEADER_LENGTH: str(len(head))}
