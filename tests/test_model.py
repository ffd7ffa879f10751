"""The reconstructed seed network: parameter count, mixed-precision policy, FLOP count."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cifar_dist import model as model_lib


def test_seed_parameter_count_is_pinned_and_within_one_percent_of_published():
    m = model_lib.build_seed_model()
    count = model_lib.trainable_param_count(m)
    assert count == model_lib.SEED_TRAINABLE_PARAMS == 2_229_898
    assert abs(count - model_lib.PUBLISHED_TRAINABLE_PARAMS) / model_lib.PUBLISHED_TRAINABLE_PARAMS < 0.01


def test_seed_topology_follows_the_description():
    m = model_lib.build_seed_model()
    kinds = [type(layer).__name__ for layer in m.layers]
    assert kinds.count("Conv2D") == 6 and kinds.count("Add") == 3
    assert kinds.count("BatchNormalization") == 4 and kinds.count("MaxPooling2D") == 3
    assert kinds.count("AveragePooling2D") == 1 and kinds.count("Dense") == 2
    assert m.output.shape[-1] == 10
    filters = [layer.filters for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]
    assert filters == [64, 128, 128, 256, 256, 256]


@pytest.mark.parametrize("policy, compute", [("mixed_float16", "float16"),
                                             ("mixed_bfloat16", "bfloat16"),
                                             ("float32", "float32")])
def test_mixed_precision_computes_in_policy_dtype_and_outputs_float32(policy, compute):
    m = model_lib.build_model("tiny", 10, policy)
    for layer in m.layers[1:-1]:
        assert layer.compute_dtype == compute, layer.name
        if layer.weights:
            assert layer.variable_dtype == "float32"
    assert m.layers[-1].compute_dtype == "float32"
    out = m(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert str(out.dtype) in ("float32", "<dtype: 'float32'>")
    np.testing.assert_allclose(np.asarray(out).sum(axis=1), 1.0, rtol=1e-3)


def test_flop_count_matches_hand_count():
    m = model_lib.build_seed_model()
    hand = 2 * (32 * 32 * 27 * 64 + 16 * 16 * (576 * 128 + 1152 * 128)
                + 8 * 8 * (1152 * 256 + 2 * 2304 * 256) + 1024 * 512 + 512 * 10)
    assert model_lib.forward_flops_per_image(m) == hand
    assert model_lib.train_flops_per_image(m) == 3 * hand


def test_tiny_model_is_small_and_saves_with_standard_tools(tmp_path):
    m = model_lib.build_model("tiny")
    assert model_lib.trainable_param_count(m) < 50_000
    path = tmp_path / "m.keras"
    m.save(path)
    again = keras.models.load_model(path)
    x = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(again(x, training=False), m(x, training=False), atol=1e-6)
