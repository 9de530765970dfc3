"""The Gluon pipeline profiler: a chain of a Sequential's children, sizes, times, and a model left
as it was. Runs in .venv-mxnet (make test)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.mxnet

mx = pytest.importorskip("mxnet", reason="mxnet lives in .venv-mxnet")

from mxnet import gluon, nd  # noqa: E402

from legato.adapters.mxnet import profile_pipeline  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.pipeline.profile import LayerProfile  # noqa: E402

FAST = {"warmup": 1, "repeats": 2}


def cnn(hybrid: bool = True) -> gluon.nn.Sequential:
    mx.random.seed(0)
    net = gluon.nn.HybridSequential() if hybrid else gluon.nn.Sequential()
    net.add(gluon.nn.Conv2D(4, 3, padding=1), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
            gluon.nn.MaxPool2D(2), gluon.nn.Flatten(), gluon.nn.Dense(10))
    net.initialize()  # deferred: shapes come from the first call
    return net


def nbytes(a) -> int:
    return int(a.size) * np.dtype(a.dtype).itemsize


def weight_bytes(block) -> int:
    return sum(int(np.prod(p.shape)) * 4 for p in block.collect_params().values()
               if p.grad_req != "null")


@pytest.mark.parametrize("hybrid", [True, False])
def test_sequential_is_a_chain_of_its_children_with_exact_sizes(hybrid):
    net = cnn(hybrid)
    if hybrid:
        net.hybridize()
    x = nd.random.normal(shape=(4, 3, 8, 8))
    prof = profile_pipeline(net, x, **FAST)
    assert [n.id for n in prof.nodes] == ["0", "1", "2", "3", "4", "5"]
    assert prof.edges == (("0", "1"), ("1", "2"), ("2", "3"), ("3", "4"), ("4", "5"))
    assert prof.is_chain
    h, expected = x, []
    for child in net._children.values():
        h = child(h)
        expected.append(nbytes(h))
    assert [n.activation_bytes for n in prof.nodes] == expected
    assert [n.activation_outputs for n in prof.nodes] == [(b,) for b in expected]
    assert [n.parameter_bytes for n in prof.nodes] == [
        weight_bytes(c) for c in net._children.values()]
    assert prof.node("1").parameter_bytes == 2 * 4 * 4  # gamma, beta; not running statistics
    assert prof.node("0").desc.startswith("Conv2D(3 -> 4")
    assert prof.meta["framework"] == "mxnet" and prof.meta["batch_size"] == 4
    assert prof.meta["hybridized"] is hybrid
    assert prof.meta["inputs"] == [{"name": "input", "bytes": nbytes(x), "readers": ["0"]}]


def test_optimizer_state_bytes_are_measured():
    net = cnn()
    x = nd.ones((2, 3, 8, 8))
    prof = profile_pipeline(net, x, optimizer=mx.optimizer.Adam(), **FAST)
    children = list(net._children.values())
    assert [n.optimizer_state_bytes for n in prof.nodes] == [2 * weight_bytes(c)
                                                              for c in children]
    prof = profile_pipeline(net, x, optimizer=mx.optimizer.SGD(learning_rate=0.1), **FAST)
    assert all(n.optimizer_state_bytes == 0 for n in prof.nodes)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"momentum": 0.9})
    prof = profile_pipeline(net, x, optimizer=trainer, **FAST)
    assert [n.optimizer_state_bytes for n in prof.nodes] == [weight_bytes(c) for c in children]


def test_times_are_positive_split_and_follow_the_work():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(16, in_units=256), gluon.nn.Dense(2048, in_units=16),
            gluon.nn.Dense(2048, in_units=2048), gluon.nn.Dense(4, in_units=2048))
    net.initialize()
    prof = profile_pipeline(net, nd.ones((256, 256)), warmup=1, repeats=3)
    for n in prof.nodes:
        assert n.forward_s > 0 and n.backward_s > 0 and n.backward_weight_s > 0
    assert prof.node("0").backward_input_s == 0.0  # reads the model input
    assert all(n.backward_input_s > 0 for n in prof.nodes[1:])
    tiny, big = prof.node("0"), prof.node("2")  # 256x16 vs 2048x2048: 1024x the FLOPs
    assert big.forward_s > 3 * tiny.forward_s
    assert big.backward_s > 3 * tiny.backward_s
    unsplit = profile_pipeline(net, nd.ones((4, 256)), split_backward=False, **FAST)
    assert all(n.backward_input_s is None and n.backward_weight_s is None
               for n in unsplit.nodes)


@pytest.mark.parametrize("hybrid", [True, False])
def test_calibration_scales_layers_to_whole_passes(hybrid):
    net = cnn(hybrid)
    if hybrid:
        net.hybridize()                      # whole passes run the net as the user runs it
    x = nd.random.normal(shape=(32, 3, 8, 8))
    prof = profile_pipeline(net, x, **FAST)
    cal = prof.meta["calibration"]
    assert cal["forward_measured_s"] > 0 and cal["backward_measured_s"] > 0
    assert sum(n.forward_s for n in prof.nodes) == pytest.approx(cal["forward_measured_s"])
    assert sum(n.backward_s for n in prof.nodes) == pytest.approx(cal["backward_measured_s"])
    assert "calibration" not in profile_pipeline(net, x, calibrate=False, **FAST).meta


def test_update_time_is_measured_with_an_optimizer():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(8, in_units=8), gluon.nn.Activation("relu"),
            gluon.nn.Dense(1024, in_units=8), gluon.nn.Dense(1024, in_units=1024))
    net.initialize()
    adam = mx.optimizer.Adam()
    prof = profile_pipeline(net, nd.ones((4, 8)), optimizer=adam, **FAST)
    assert prof.node("1").update_s == 0.0                   # relu: no parameters
    assert prof.node("3").update_s > 0 and prof.node("0").update_s > 0
    assert adam.num_update == 0 and not adam._index_update_count   # the user's counts nothing
    assert all(n.update_s == 0.0 for n in profile_pipeline(net, nd.ones((4, 8)), **FAST).nodes)


def test_model_is_left_as_it_was():
    net = cnn()
    x = nd.random.normal(shape=(4, 3, 8, 8))
    net(x)  # finish deferred initialization
    params = net.collect_params()
    for p in params.values():
        if p.grad_req != "null":
            p.grad()[:] = 0.25
    before = {k: p.data().asnumpy().copy() for k, p in params.items()}
    grads = {k: p.grad().asnumpy().copy() for k, p in params.items() if p.grad_req != "null"}
    profile_pipeline(net, x, optimizer=mx.optimizer.Adam(), **FAST)
    for k, p in params.items():  # weights and BatchNorm running statistics, bit-equal
        assert np.array_equal(p.data().asnumpy(), before[k]), k
    for k, g in grads.items():
        assert np.array_equal(params[k].grad().asnumpy(), g), k


def test_profile_round_trips_and_takes_a_loss(tmp_path):
    labels = nd.array([0, 1, 2, 3])
    ce = gluon.loss.SoftmaxCrossEntropyLoss()
    prof = profile_pipeline(cnn(), nd.ones((4, 3, 8, 8)), loss_fn=lambda out: ce(out, labels),
                            optimizer=mx.optimizer.Adam(), **FAST)
    assert prof.meta["loss"] == "<lambda>" and prof.meta["loss_forward_s"] > 0
    assert prof.meta["loss_added_to"] == "5"
    assert LayerProfile.load(prof.save(tmp_path / "cnn.json")) == prof


class Custom(gluon.nn.HybridBlock):
    def __init__(self):
        super().__init__()
        self.dense = gluon.nn.Dense(3)

    def hybrid_forward(self, F, x):
        return self.dense(x) + x


def uninitialized() -> gluon.nn.HybridSequential:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(3))
    return net


@pytest.mark.parametrize("make, x, words", [
    (Custom, nd.ones((2, 3)), ["not a plain gluon nn.Sequential", "nn.HybridSequential"]),
    (gluon.nn.HybridSequential, nd.ones((2, 3)), ["is empty", "add its layers"]),
    (uninitialized, nd.ones((2, 3)), ["net.initialize()"]),
    (cnn, nd.ones((2, 5)), ["example_inputs", "[2, 5]", "failed"]),
    (cnn, (nd.ones((2, 3, 8, 8)), nd.ones((2,))), ["takes one input"]),
    (cnn, "pixels", ["not an NDArray"]),
])
def test_bad_models_and_inputs_say_what_to_do(make, x, words):
    with pytest.raises(ConfigError) as info:
        profile_pipeline(make(), x, **FAST)
    for w in words:
        assert w in str(info.value)


def test_bad_arguments_say_what_to_do():
    x = nd.ones((2, 3, 8, 8))
    with pytest.raises(ConfigError, match="repeats=0"):
        profile_pipeline(cnn(), x, repeats=0)
    with pytest.raises(ConfigError, match="must return an NDArray"):
        profile_pipeline(cnn(), x, loss_fn=lambda out: 1.0, **FAST)
    with pytest.raises(ConfigError, match="not an mx.optimizer.Optimizer"):
        profile_pipeline(cnn(), x, optimizer="adam", **FAST)



def test_planner_partitions_a_gluon_profile(tmp_path, planner_check):
    """The planner (and `legato plan` on the saved file) runs on this profiler's output."""
    prof = profile_pipeline(cnn(), nd.ones((16, 3, 8, 8)), **FAST)
    planner_check(prof, tmp_path)
