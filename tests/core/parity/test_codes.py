"""Erasure codes over queries (legato/core/parity/codes.py): exact reconstruction with a linear
model, the concatenation grid, the decoder's batch form, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from legato.core.errors import ConfigError
from legato.core.parity import (AdditionEncoder, ConcatenationEncoder, SubtractionDecoder,
                                evaluate, make_encoder, overall_accuracy, parity_target,
                                sample_groups)


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_addition_code_rebuilds_a_linear_models_output_exactly(k):
    """With F(x) = A x (no bias), a parity model equal to F and the subtraction decoder give
    back every missing prediction (up to float64 rounding)."""
    rng = np.random.default_rng(k)
    a = rng.normal(size=(10, 12))
    f = lambda x: x.reshape(len(x), -1) @ a.T  # noqa: E731
    group = rng.normal(size=(k, 3, 4))
    outputs = f(group)
    parity_output = f(AdditionEncoder(k).encode(group)[None])[0]
    np.testing.assert_allclose(parity_output, parity_target(outputs[None])[0], atol=1e-12)
    dec = SubtractionDecoder(k)
    for missing in range(k):
        avail = {i: outputs[i] for i in range(k) if i != missing}
        np.testing.assert_allclose(dec.decode(avail, parity_output, missing), outputs[missing],
                                   atol=1e-10)
        batch = dec.decode_batch(outputs[None], parity_output[None], missing)[0]
        np.testing.assert_allclose(batch, outputs[missing], atol=1e-10)


def test_a_model_with_bias_is_not_rebuilt_exactly():
    """The code is exact for linear maps only: an affine F is off by the bias (k - 1) times,
    which a trained parity model learns away."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=4)
    f = lambda x: x @ a.T + b  # noqa: E731
    group = rng.normal(size=(3, 6))
    outs = f(group)
    rebuilt = SubtractionDecoder(3).decode({1: outs[1], 2: outs[2]},
                                           f(AdditionEncoder(3).encode(group)[None])[0], 0)
    np.testing.assert_allclose(rebuilt - outs[0], -2 * b, atol=1e-10)


def test_concatenation_puts_shrunk_images_side_by_side_and_in_quadrants():
    imgs = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 1, 8, 8)
    two = ConcatenationEncoder(2, (1, 8, 8))
    assert (two.rows, two.cols) == (1, 2)
    out = two.encode(imgs[:2])
    assert out.shape == (1, 8, 8)
    np.testing.assert_allclose(out[0, :, :4], imgs[0, 0].reshape(8, 4, 2).mean(-1))
    np.testing.assert_allclose(out[0, :, 4:], imgs[1, 0].reshape(8, 4, 2).mean(-1))
    four = ConcatenationEncoder(4, (1, 8, 8))
    assert (four.rows, four.cols) == (2, 2)
    q = four.encode(imgs)
    np.testing.assert_allclose(q[0, 4:, :4], imgs[2, 0].reshape(4, 2, 4, 2).mean((1, 3)))
    np.testing.assert_allclose(q[0, :4, 4:], imgs[1, 0].reshape(4, 2, 4, 2).mean((1, 3)))
    three = ConcatenationEncoder(3, (1, 28, 28))      # 28 is not a multiple of 3: sampled
    assert (three.rows, three.cols) == (1, 3)
    assert three.encode(np.ones((3, 1, 28, 28)))[0, :, :27].min() == 1
    batch = four.encode_batch(np.stack([imgs, imgs[::-1]]))
    np.testing.assert_allclose(batch[0], q)


def test_bad_groups_and_settings_name_the_problem():
    with pytest.raises(ConfigError, match="k >= 2"):
        AdditionEncoder(1)
    with pytest.raises(ConfigError, match="groups of 2 queries"):
        AdditionEncoder(2).encode(np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="do not fit"):
        ConcatenationEncoder(5, (1, 2, 2))
    with pytest.raises(ConfigError, match="do not match"):
        ConcatenationEncoder(2, (1, 8, 8)).encode(np.zeros((2, 1, 4, 4)))
    with pytest.raises(ConfigError, match="unknown; known: addition, concat"):
        make_encoder("xor", 2, (4,))
    with pytest.raises(ConfigError, match="needs the predictions of positions"):
        SubtractionDecoder(3).decode({0: np.zeros(2)}, np.zeros(2), 1)
    with pytest.raises(ConfigError, match="not a fraction"):
        overall_accuracy(0.9, 0.8, 1.5)


def test_groups_hold_distinct_items_and_evaluate_counts_every_position():
    rng = np.random.default_rng(0)
    groups = sample_groups(50, 4, 300, rng)
    assert groups.shape == (300, 4)
    assert all(len(set(g)) == 4 for g in groups.tolist())
    assert set(np.unique(groups)) == set(range(50))
    outputs = rng.normal(size=(50, 5))
    labels = outputs.argmax(1)
    perfect = outputs[groups].sum(axis=1)                  # an exact parity model
    scores = evaluate(outputs, labels, groups, perfect)
    assert scores["reconstruction_accuracy"] == 1.0 and scores["degraded_accuracy"] == 1.0
    assert scores["reconstructions"] == 1200
    noisy = perfect + rng.normal(scale=3.0, size=perfect.shape)
    assert evaluate(outputs, labels, groups, noisy)["reconstruction_accuracy"] < 0.9
