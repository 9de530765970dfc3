"""The Keras pipeline profiler: layer DAGs (Sequential and functional), sizes, times, and a model
left as it was."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow

tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed")
keras = pytest.importorskip("keras", reason="keras is not installed")

from legato.adapters.tensorflow import profile_pipeline  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.pipeline.profile import LayerProfile  # noqa: E402

FAST = {"warmup": 1, "repeats": 2}


def cnn() -> keras.Sequential:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same", name="conv"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu"),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(10, name="fc")])


def branchy() -> keras.Model:
    """A residual branch joined by an Add layer, and a raw op folded into the merge."""
    keras.utils.set_random_seed(0)
    x = keras.Input((12,), name="x")
    stem = keras.layers.Dense(16, name="stem")(x)
    h = keras.layers.Dense(16, name="inner1")(stem)
    h = keras.layers.Dense(16, name="inner2")(h)
    merged = keras.layers.Add(name="merge")([stem, h])
    act = keras.ops.relu(merged)
    side = keras.layers.Dense(8, name="side")(stem)
    joined = keras.layers.Concatenate(name="cat")([act, side])
    return keras.Model(x, keras.layers.Dense(3, name="head")(joined))


def nbytes(t) -> int:
    return int(np.prod(t.shape)) * t.dtype.size


def weight_bytes(layer) -> int:
    return sum(int(np.prod(v.shape)) * 4 for v in layer.trainable_variables)


def test_sequential_is_a_chain_of_its_layers_with_exact_sizes():
    model = cnn()
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32")
    prof = profile_pipeline(model, x, **FAST)
    assert [n.id for n in prof.nodes] == ["conv", "bn", "relu", "flat", "fc"]
    assert prof.edges == (("conv", "bn"), ("bn", "relu"), ("relu", "flat"), ("flat", "fc"))
    assert prof.is_chain
    h, expected = tf.constant(x), []
    for layer in model.layers:
        h = layer(h)
        expected.append(nbytes(h))
    assert [n.activation_bytes for n in prof.nodes] == expected
    assert [n.activation_outputs for n in prof.nodes] == [(b,) for b in expected]
    assert [n.parameter_bytes for n in prof.nodes] == [weight_bytes(lay) for lay in model.layers]
    assert prof.node("bn").parameter_bytes == 2 * 4 * 4  # gamma, beta; not moving statistics
    assert prof.node("conv").desc.startswith("Conv2D(filters=4")
    assert prof.meta["framework"] == "tensorflow" and prof.meta["batch_size"] == 4
    assert prof.meta["source"] == "legato tensorflow profiler"
    assert prof.meta["inputs"] == [{"name": "input", "bytes": x.nbytes, "readers": ["conv"]}]


def test_functional_branches_are_in_the_dag():
    model = branchy()
    prof = profile_pipeline(model, np.ones((5, 12), "float32"), **FAST)
    # graph order (Keras's depth order), which is a forward order
    assert [n.id for n in prof.nodes] == ["stem", "inner1", "inner2", "merge", "side", "cat",
                                          "head"]
    assert prof.topological_order() == [n.id for n in prof.nodes]
    assert set(prof.edges) == {("stem", "inner1"), ("inner1", "inner2"), ("stem", "side"),
                               ("stem", "merge"), ("inner2", "merge"), ("merge", "cat"),
                               ("side", "cat"), ("cat", "head")}
    assert not prof.is_chain
    assert prof.node("merge").desc == "Add + Relu"  # keras.ops.relu folded into the merge
    assert prof.node("cat").activation_bytes == 5 * 24 * 4
    assert prof.node("stem").activation_outputs == (5 * 16 * 4,)
    assert prof.parameter_bytes == sum(weight_bytes(lay) for lay in model.layers)
    assert prof.meta["inputs"] == [{"name": "x", "bytes": 5 * 12 * 4, "readers": ["stem"]}]
    assert prof.meta["graph"] == "functional" and prof.meta["loss_added_to"] == "head"


def test_shared_layer_is_a_node_per_call_and_counts_its_weights_once():
    dense = keras.layers.Dense(6, name="shared")
    x = keras.Input((6,), name="x")
    model = keras.Model(x, dense(dense(x)))
    prof = profile_pipeline(model, np.ones((2, 6), "float32"), **FAST)
    assert [n.id for n in prof.nodes] == ["shared", "shared#2"]
    assert prof.edges == (("shared", "shared#2"),)
    assert prof.node("shared").parameter_bytes == weight_bytes(dense)
    assert prof.node("shared#2").parameter_bytes == 0
    assert prof.node("shared#2").backward_weight_s > 0


def test_optimizer_state_bytes_are_measured():
    model = cnn()
    x = np.ones((2, 8, 8, 3), "float32")
    adam = keras.optimizers.Adam()
    prof = profile_pipeline(model, x, optimizer=adam, **FAST)
    assert [n.optimizer_state_bytes for n in prof.nodes] == [
        2 * weight_bytes(lay) for lay in model.layers]
    assert not adam.built  # the user's optimizer was not built or stepped
    prof = profile_pipeline(model, x, optimizer=keras.optimizers.SGD(0.1), **FAST)
    assert all(n.optimizer_state_bytes == 0 for n in prof.nodes)
    prof = profile_pipeline(model, x, optimizer=keras.optimizers.SGD(0.1, momentum=0.9), **FAST)
    assert [n.optimizer_state_bytes for n in prof.nodes] == [weight_bytes(lay)
                                                              for lay in model.layers]


def test_times_are_positive_split_and_follow_the_work():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(16, name="tiny"),
                              keras.layers.Dense(2048, name="wide"),
                              keras.layers.Dense(2048, name="big"),
                              keras.layers.Dense(4, name="out")])
    prof = profile_pipeline(model, np.ones((256, 256), "float32"), warmup=1, repeats=3)
    for n in prof.nodes:
        assert n.forward_s > 0 and n.backward_s > 0 and n.backward_weight_s > 0
    assert prof.node("tiny").backward_input_s == 0.0  # reads the model input
    assert all(n.backward_input_s > 0 for n in prof.nodes[1:])
    tiny, big = prof.node("tiny"), prof.node("big")  # 256x16 vs 2048x2048: 1024x the FLOPs
    assert big.forward_s > 3 * tiny.forward_s
    assert big.backward_s > 3 * tiny.backward_s
    unsplit = profile_pipeline(model, np.ones((4, 256), "float32"), split_backward=False,
                               **FAST)
    assert all(n.backward_input_s is None and n.backward_weight_s is None
               for n in unsplit.nodes)


def test_calibration_scales_layers_to_whole_compiled_passes():
    model = branchy()
    x = np.random.default_rng(0).standard_normal((64, 12)).astype("float32")
    prof = profile_pipeline(model, x, **FAST)
    cal = prof.meta["calibration"]
    assert "tf.function" in cal["how"] and cal["forward_measured_s"] > 0
    assert sum(n.forward_s for n in prof.nodes) == pytest.approx(cal["forward_measured_s"])
    if cal["backward_measured_s"] > 0:               # a difference of two medians
        assert sum(n.backward_s for n in prof.nodes) == pytest.approx(
            cal["backward_measured_s"])
    raw = profile_pipeline(model, x, calibrate=False, **FAST)
    assert "calibration" not in raw.meta
    eager_only = lambda out: tf.constant(float(np.sum(out.numpy())))  # noqa: E731
    with pytest.raises(ConfigError, match="make loss_fn traceable .* calibrate=False"):
        profile_pipeline(model, x, loss_fn=eager_only, **FAST)
    assert profile_pipeline(model, x, loss_fn=eager_only, calibrate=False, **FAST).nodes


def test_update_time_is_measured_with_an_optimizer():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="small"),
                              keras.layers.ReLU(name="relu"),
                              keras.layers.Dense(1024, name="wide"),
                              keras.layers.Dense(1024, name="big")])
    adam = keras.optimizers.Adam()
    prof = profile_pipeline(model, np.ones((4, 8), "float32"), optimizer=adam, **FAST)
    assert prof.node("relu").update_s == 0.0               # no variables
    assert prof.node("big").update_s > 0 and prof.node("small").update_s > 0
    assert not adam.built                                   # the user's optimizer untouched
    assert all(n.update_s == 0.0 for n in profile_pipeline(
        model, np.ones((4, 8), "float32"), **FAST).nodes)


def test_model_and_optimizer_are_left_as_they_were():
    model = cnn()
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype("float32")
    adam = keras.optimizers.Adam()
    model.compile(optimizer=adam, loss="mse")
    model.fit(x, np.zeros((4, 10), "float32"), epochs=1, verbose=0)
    before = [v.numpy().copy() for v in model.variables]
    slots = [v.numpy().copy() for v in adam.variables]
    profile_pipeline(model, x, optimizer=adam, **FAST)
    after = [v.numpy() for v in model.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # BN statistics too
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(slots, adam.variables))
    assert len(slots) == len(adam.variables)


def test_profile_round_trips_and_takes_a_loss(tmp_path):
    y = tf.one_hot([0, 1, 2, 3], 10)
    prof = profile_pipeline(cnn(), np.ones((4, 8, 8, 3), "float32"),
                            loss_fn=lambda out: tf.reduce_mean(
                                keras.losses.categorical_crossentropy(y, out, from_logits=True)),
                            optimizer=keras.optimizers.Adam(), **FAST)
    assert prof.meta["loss"] == "<lambda>" and prof.meta["loss_forward_s"] > 0
    assert LayerProfile.load(prof.save(tmp_path / "cnn.json")) == prof


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def two_inputs() -> keras.Model:
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    return keras.Model([a, b], keras.layers.Add()([keras.layers.Dense(3)(a), b]))


@pytest.mark.parametrize("make, x, words", [
    (Subclassed, np.ones((2, 3), "float32"), ["subclassed", "functional API"]),
    (lambda: keras.Sequential([]), np.ones((2, 3), "float32"), ["empty keras.Sequential"]),
    (cnn, np.ones((2, 8, 8, 5), "float32"), ["example_inputs", "[2, 8, 8, 5]", "failed"]),
    (two_inputs, np.ones((2, 3), "float32"), ["takes 2 input(s)", "has 1"]),
    (two_inputs, {"a": np.ones((2, 3), "float32")}, ["lacks the model inputs ['b']"]),
    (cnn, object(), ["cannot turn into a tensor"]),
])
def test_bad_models_and_inputs_say_what_to_do(make, x, words):
    with pytest.raises(ConfigError) as info:
        profile_pipeline(make(), x, **FAST)
    for w in words:
        assert w in str(info.value)


def test_two_inputs_by_name_and_bad_arguments():
    prof = profile_pipeline(two_inputs(), {"b": np.ones((2, 3), "float32"),
                                           "a": np.ones((2, 3), "float32")}, **FAST)
    add = prof.nodes[-1]
    assert prof.predecessors()[add.id] == [prof.nodes[0].id]
    assert [i["name"] for i in prof.meta["inputs"]] == ["a", "b"]
    assert prof.meta["inputs"][1]["readers"] == [add.id]  # b skips the Dense
    x = np.ones((2, 8, 8, 3), "float32")
    with pytest.raises(ConfigError, match="warmup=-1"):
        profile_pipeline(cnn(), x, warmup=-1)
    with pytest.raises(ConfigError, match="scalar tensor"):
        profile_pipeline(cnn(), x, loss_fn=lambda out: out * 2, **FAST)
    with pytest.raises(ConfigError, match="not a keras.optimizers.Optimizer"):
        profile_pipeline(cnn(), x, optimizer="adam", **FAST)
    with pytest.raises(ConfigError, match="not a Keras 3 keras.Model"):
        profile_pipeline(lambda t: t, x)



def test_planner_partitions_a_keras_profile(tmp_path, planner_check):
    """The planner (and `legato plan` on the saved file) runs on this profiler's output."""
    prof = profile_pipeline(branchy(), np.ones((64, 12), "float32"), **FAST)
    planner_check(prof, tmp_path)
