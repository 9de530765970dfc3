"""The frontend speaks the Open Inference Protocol (KServe v2), checked with a client nobody here
wrote: NVIDIA's tritonclient (HTTP, with its binary tensor extension), plus bad requests over
plain HTTP. The protocol's parsing and encoding alone are in the unit tests at the end."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from legato.core.parity import v2

pytest.importorskip("aiohttp")
pytest.importorskip("onnxruntime")
import aiohttp  # noqa: E402

from test_serve import W, Server, linear, queries  # noqa: E402,F401 (the module fixture)

pytestmark = pytest.mark.timeout(180)


def _client(url: str):
    httpclient = pytest.importorskip("tritonclient.http",
                                     reason="tritonclient[http] is not installed here")
    return httpclient, httpclient.InferenceServerClient(url.removeprefix("http://"))


@pytest.mark.parametrize("binary_output", [False, True])
def test_tritonclient_gets_a_coded_answer_for_every_row(linear, binary_output):
    """Worker 0 straggles: under parity its rows are rebuilt from their coding groups; every
    answer equals the linear model's, and the reply says which were rebuilt."""
    srv = Server("--model", linear, "--parity-model", linear, "--k", "2", "--workers", "2",
                 "--policy", "parity", "--deadline-ms", "1000", "--group-timeout-ms", "20",
                 "--inject", "0:delay_ms=3000")
    try:
        httpclient, client = _client(srv.url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("linear")
        meta = client.get_model_metadata("linear")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
        xs = queries(4)[:, 0]                          # a batch of 4 queries, [4, 1, 8, 8]
        inp = httpclient.InferInput("x", list(xs.shape), "FP32")
        inp.set_data_from_numpy(xs)                    # binary tensor data, tritonclient's way
        out = httpclient.InferRequestedOutput("y", binary_data=binary_output)
        result = client.infer("linear", [inp], outputs=[out], request_id="r1")
        got = result.as_numpy("y")
        reply = result.get_response()
    finally:
        srv.close()
    np.testing.assert_allclose(got, xs.reshape(4, 64) @ W, rtol=1e-4, atol=1e-4)
    sources = reply["parameters"]["legato_sources"].split(",")
    assert len(sources) == 4 and "reconstructed" in sources and "default" not in sources
    assert len(json.loads(reply["parameters"]["legato_reasons"])) == 4
    assert reply["id"] == "r1" and reply["model_name"] == "linear"


def test_bad_v2_requests_get_an_error_naming_the_problem(linear):
    srv = Server("--model", linear, "--workers", "1", "--policy", "none",
                 "--model-name", "digits")
    x = np.ones((1, 1, 8, 8), np.float32)

    def body(**change):
        tensor = {"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                  "data": x.reshape(-1).tolist(), **change.pop("tensor", {})}
        return {"inputs": [tensor], **change}

    cases = [("digits", body(tensor={"name": "img"}), 400, "its input is 'x'"),
             ("digits", body(tensor={"datatype": "BYTES"}), 400, "datatype 'BYTES'"),
             ("digits", body(tensor={"shape": [1, 1, 4, 4]}), 400, "is not [batch, 1, 8, 8]"),
             ("digits", body(tensor={"data": [1.0, 2.0]}), 400, "has 2 values"),
             ("digits", body(parameters={"deadline_ms": -5}), 400, "deadline_ms"),
             ("digits", body(outputs=[{"name": "z"}]), 400, "its output is 'y'"),
             ("linear", body(), 404, "serves 'digits'"),
             ("digits", {"inputs": 3}, 400, "list of named tensors")]

    async def main():
        out = []
        async with aiohttp.ClientSession() as s:
            for model, payload, _, _ in cases:
                async with s.post(f"{srv.url}/v2/models/{model}/infer", json=payload) as r:
                    out.append((r.status, await r.text()))
            async with s.post(f"{srv.url}/v2/models/digits/infer",
                              json=body(parameters={"deadline_ms": 500})) as r:
                ok = (r.status, await r.json())
            async with s.get(f"{srv.url}/v2/health/ready") as r:
                ready = r.status
            async with s.get(f"{srv.url}/v1/health") as r:
                health = (r.status, await r.json())
        return out, ok, ready, health

    try:
        out, ok, ready, health = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        srv.close()
    for (status, text), (_, _, want_status, words) in zip(out, cases):
        assert status == want_status and words in text, (status, text, words)
    assert ok[0] == 200 and ok[1]["parameters"]["legato_sources"] == "original"
    np.testing.assert_allclose(ok[1]["outputs"][0]["data"], (x.reshape(1, 64) @ W)[0],
                               rtol=1e-4, atol=1e-4)
    assert ready == 200 and health[0] == 200 and health[1]["ready"]


# -- the protocol alone ------------------------------------------------------------------------
HEAD = {"input_name": "x", "query_shape": [2, 2], "output_name": "y", "max_batch": 8}


def test_binary_input_and_output_round_trip():
    x = np.arange(8, dtype=np.float64).reshape(2, 2, 2)
    raw = x.astype("<f8").tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 2, 2], "datatype": "FP64",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True, "deadline_ms": 50}}).encode()
    req = v2.parse_request(head + raw, {v2.HEADER_LENGTH: str(len(head))}, **HEAD)
    assert req.x.dtype == np.float32 and req.x.shape == (2, 2, 2)
    np.testing.assert_array_equal(req.x, x)
    assert req.binary_output and req.deadline_ms == 50.0
    body, headers = v2.encode_reply(model_name="m", request_id=None, output_name="y",
                                    outputs=req.x.reshape(2, 4), sources=["original"] * 2,
                                    reasons=["", ""], binary=True)
    n = int(headers[v2.HEADER_LENGTH])
    reply = json.loads(body[:n])
    assert reply["outputs"][0]["parameters"]["binary_data_size"] == 32
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(2, 4),
                                  req.x.reshape(2, 4))


@pytest.mark.parametrize("datatype,data", [("INT64", [[1, 2], [3, 4]]),
                                           ("UINT8", [1, 2, 3, 4]), ("FP16", [0.5] * 4)])
def test_common_datatypes_nested_or_flat_and_a_query_without_its_batch(datatype, data):
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": datatype,
                                   "data": data}]}).encode()
    req = v2.parse_request(body, {}, **HEAD)
    assert req.x.shape == (1, 2, 2) and req.x.dtype == np.float32


@pytest.mark.parametrize("change,words,status", [
    ({"shape": [9, 2, 2], "data": [0.0] * 36}, "more than the 8", 413),
    ({"data": [float("nan")] * 4}, "NaN", 400),
    ({"datatype": "BOOL"}, "datatype 'BOOL'", 400),
    ({"shape": [1, -2, 2]}, "non-negative integers", 400),
    ({"data": ["a"] * 4}, "are not FP32 numbers", 400),
    ({"parameters": {"binary_data_size": 999}}, "binary_data_size 999", 400),
])
def test_malformed_tensors(change, words, status):
    tensor = {"name": "x", "shape": [1, 2, 2], "datatype": "FP32", "data": [0.0] * 4, **change}
    with pytest.raises(v2.V2Error) as err:
        v2.parse_request(json.dumps({"inputs": [tensor]}).encode(), {}, **HEAD)
    assert words in str(err.value) and err.value.status == status


def test_a_header_length_that_does_not_fit_is_refused():
    with pytest.raises(v2.V2Error, match="does not fit"):
        v2.parse_request(b"{}", {v2.HEADER_LENGTH: "99"}, **HEAD)
