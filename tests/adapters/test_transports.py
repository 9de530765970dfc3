"""Every transport of the PyTorch and TensorFlow adapters has the core's Transport shape, and
a live gloo transport is a `Transport` (the protocol is runtime-checkable)."""

from __future__ import annotations

import importlib.util
import inspect

import pytest

from legato.core.protocols import TRANSPORT_METHODS, Transport


TRANSPORTS = [("torch", "legato.adapters.gloo", "TorchDistTransport"),
              ("torch", "legato.adapters.torch.comm", "HorovodTransport"),
              ("tensorflow", "legato.adapters.tensorflow.comm", "GlooTransport"),
              ("tensorflow", "legato.adapters.tensorflow.comm", "HorovodTFTransport")]


def _framework_missing(name: str) -> bool:
    # a test folder of the same name (tests/adapters/tensorflow) is a namespace package
    spec = importlib.util.find_spec(name)
    return spec is None or spec.origin is None


@pytest.mark.parametrize("framework, module, name", TRANSPORTS, ids=lambda v: str(v))
def test_transport_classes_have_the_protocols_members(framework, module, name):
    if _framework_missing(framework):
        pytest.skip(f"{framework} is not installed in this environment")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(getattr(cls, "name", None), str), cls
    for method in TRANSPORT_METHODS:
        assert callable(getattr(cls, method, None)), (cls, method)
    assert "healthy" in inspect.signature(cls.close).parameters
    init = inspect.getsource(cls.__init__)
    for attribute in ("rank", "group_rank", "world"):
        assert f"self.{attribute}" in init or f".{attribute} =" in init, (cls, attribute)


@pytest.mark.timeout(60)
def test_a_live_gloo_transport_is_a_transport():
    pytest.importorskip("torch")
    import torch.distributed as dist

    from legato.adapters.gloo import TorchDistTransport
    from legato.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        transport = TorchDistTransport(None, 30.0)
        assert isinstance(transport, Transport)
        assert transport.all_gather_object({"a": 1}) == [{"a": 1}]
        assert transport.broadcast_object("x") == "x"
        assert transport.any_flag(True) and not transport.any_flag(False)
        transport.close()
    finally:
        dist.destroy_process_group()
