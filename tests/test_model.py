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


AIRBENCH_TABLE_ROWS = [  # (layer, output shape, trainable parameters): the paper's network
    ("whiten", "31x31x24", 24), ("g1_conv1", "31x31x64", 13_824), ("g1_pool", "15x15x64", 0),
    ("g1_bn1", "15x15x64", 64), ("g1_conv2", "15x15x64", 36_864),
    ("g2_conv1", "15x15x256", 147_456), ("g2_pool", "7x7x256", 0),
    ("g2_conv2", "7x7x256", 589_824), ("g3_conv1", "7x7x256", 589_824),
    ("g3_pool", "3x3x256", 0), ("g3_conv2", "3x3x256", 589_824), ("maxpool", "256", 0),
    ("logits", "10", 2_560)]


def test_airbench94_parameters_layers_and_flops_are_pinned():
    m = model_lib.build_model("airbench94")
    frozen = sum(int(np.prod(v.shape)) for v in m.non_trainable_variables
                 if "moving" not in v.name)
    assert model_lib.trainable_param_count(m) == 1_971_352
    assert model_lib.trainable_param_count(m) + frozen == model_lib.AIRBENCH94_PARAMS
    table = model_lib.layer_table(m)
    for name, shape, count in AIRBENCH_TABLE_ROWS:
        assert any(row.startswith(f"| {name} |") and f"| {shape} | {count:,} |" in row
                   for row in table.splitlines()), name
    bns = [layer for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 6 and all(not b.scale and b.momentum == 0.6 and b.epsilon == 1e-12
                                 for b in bns)
    assert not m.get_layer("whiten").kernel.trainable
    assert model_lib.train_flops_per_image(m) == pytest.approx(0.709e9, rel=1e-3)


def test_dirac_filters_pass_their_own_channel_through():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
    dirac = model_lib.dirac_kernel(kernel)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    y = keras.ops.conv(x, dirac, padding="same").numpy()
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
    np.testing.assert_array_equal(dirac[..., 4:], kernel[..., 4:])  # the rest untouched


def test_architecture_flags_resolve_against_the_network_and_shape_the_export(tmp_path):
    assert model_lib.Architecture.of("seed", {}) == model_lib.Architecture()
    assert model_lib.Architecture.of("airbench94", {"bn_momentum": "auto"}).bn_momentum == 0.6
    arch = model_lib.Architecture.of("tiny", {"bn_scale": "false", "whiten_init": "frozen",
                                              "bn_momentum": "0.5"})
    assert arch == model_lib.Architecture(0.5, False, False, "frozen")
    m = model_lib.build_model("tiny", arch=arch)
    default = model_lib.build_model("tiny")
    # no gamma, first kernel frozen: 4 scales and one 3x3x3x8 kernel fewer to train
    assert (model_lib.trainable_param_count(default) - model_lib.trainable_param_count(m)
            == (8 + 16 + 32 + 32) + 3 * 3 * 3 * 8)
    from cifar_dist.export import plain_float32_copy
    copy = plain_float32_copy(m, 10, arch)
    assert [w.shape for w in copy.weights] == [w.shape for w in m.weights]
