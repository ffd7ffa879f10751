"""The on-device augmentation: exact cases, a float64 reference, bounds, XLA compilation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from cifar_dist import augment

scipy_ndimage = pytest.importorskip("scipy.ndimage")


def images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def sample(x_u8, angle=0.0, sx=0.0, sy=0.0, flip=0.0):
    n = x_u8.shape[0]
    full = [tf.fill([n], float(v)) for v in (angle, sx, sy, flip)]
    return augment.affine_sample(augment.to_unit_float(x_u8), *full).numpy()


def test_zero_magnitudes_are_the_identity():
    x = images()
    out = augment.augment_batch(x, tf.constant([1, 2], tf.int64),
                                augment.Policy(0.0, 0.0, 0, "none")).numpy()
    np.testing.assert_array_equal(out, x.astype(np.float32) / 255.0)


def test_flip_is_exact():
    x = images()
    np.testing.assert_array_equal(sample(x, flip=1), x[:, :, ::-1].astype(np.float32) / 255.0)


@pytest.mark.parametrize("sx, sy", [(3, 0), (0, -2), (-5, 4)])
def test_integer_shift_is_exact_with_nearest_fill(sx, sy):
    x = images()
    rows = np.clip(np.arange(32) - sy, 0, 31)
    cols = np.clip(np.arange(32) - sx, 0, 31)
    expected = x[:, rows][:, :, cols].astype(np.float32) / 255.0
    np.testing.assert_array_equal(sample(x, sx=sx, sy=sy), expected)


def reference(img, angle, sx, sy, flip):
    """Float64 reference with scipy: the same inverse map, order-1 spline, 'nearest' fill."""
    c = 15.5
    out = np.empty(img.shape, np.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    # output (row i, col j) -> source (row, col); written as matrix + offset for scipy
    # col' = flip ? 31 - j : j ; u = col' - c - sx ; v = i - c - sy
    # src_col = cos*u - sin*v + c ; src_row = sin*u + cos*v + c
    fj = -1.0 if flip else 1.0
    j0 = 31.0 if flip else 0.0
    matrix = np.array([[cos, sin * fj], [-sin, cos * fj]])
    offset = np.array([sin * (j0 - c - sx) + cos * (-c - sy) + c,
                       cos * (j0 - c - sx) - sin * (-c - sy) + c])
    for ch in range(3):
        out[..., ch] = scipy_ndimage.affine_transform(
            img[..., ch].astype(np.float64) / 255.0, matrix, offset=offset, order=1,
            mode="nearest")
    return out


@pytest.mark.parametrize("degrees, sx, sy, flip", [(15, 0, 0, 0), (-11.3, 2.7, -1.2, 0),
                                                    (7.5, -3.1, 3.2, 1)])
def test_rotation_matches_float64_reference(degrees, sx, sy, flip):
    x = images(2)
    got = sample(x, angle=math.radians(degrees), sx=sx, sy=sy, flip=flip)
    for k in range(2):
        want = reference(x[k], math.radians(degrees), sx, sy, flip)
        # float32 bilinear vs float64: a few ulps of the [0, 1] range.
        np.testing.assert_allclose(got[k], want, atol=2e-6)


def test_rotation_direction_matches_scipy_rotate():
    """Positive angles turn content counter-clockwise as displayed (scipy's convention)."""
    x = images(1)
    got = sample(x, angle=math.radians(90.0))[0]
    want = scipy_ndimage.rotate(x[0].astype(np.float64) / 255.0, 90.0, reshape=False, order=1,
                                mode="nearest")
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_sampled_parameters_stay_in_bounds():
    n = 20000
    angle, sx, sy, flip = [t.numpy() for t in augment.sample_params(
        tf.constant([7, 9], tf.int64), n, 32, 32)]
    assert np.abs(angle).max() <= math.radians(15) + 1e-6
    assert np.abs(angle).max() > math.radians(14.9)  # the range is used, not just a corner
    assert np.abs(sx).max() <= 3.2 + 1e-5 and np.abs(sy).max() <= 3.2 + 1e-5
    assert abs(flip.mean() - 0.5) < 0.02 and set(np.unique(flip)) == {0.0, 1.0}


def test_stateless_seed_reproduces_and_differs():
    x = images()
    a = augment.augment_batch(x, tf.constant([1, 5], tf.int64)).numpy()
    b = augment.augment_batch(x, tf.constant([1, 5], tf.int64)).numpy()
    c = augment.augment_batch(x, tf.constant([1, 6], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_compiles_under_xla():
    x = tf.constant(images(8))
    fn = tf.function(lambda x, seed: augment.augment_batch(x, seed), jit_compile=True)
    seed = tf.constant([3, 4], tf.int64)
    out = fn(x, seed).numpy()
    np.testing.assert_allclose(out, augment.augment_batch(x, seed).numpy(), atol=1e-5)
    hlo = fn.experimental_get_compiler_ir(x, seed)(stage="hlo")
    assert "gather" in hlo


FAST = augment.Policy(rotation_degrees=0.0, shift_fraction=0.0, translate_pixels=2,
                      flip="alternating")


def test_translation_is_numpys_reflect_pad_and_crop():
    x = images(3)
    for sx, sy, flip in [(2, -1, 0), (-2, 2, 1), (0, 0, 1), (1, 0, 0)]:
        n = len(x)
        got = augment.translate_sample(x, tf.fill([n], float(sx)), tf.fill([n], float(sy)),
                                       tf.fill([n], float(flip))).numpy()
        padded = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
        want = padded[:, 2 - sy:34 - sy, 2 - sx:34 - sx]  # content moves right/down
        want = want[:, :, ::-1] if flip else want
        np.testing.assert_array_equal(got, want)


def test_translation_offsets_cover_minus_n_to_n_evenly():
    _, sx, sy, _ = [t.numpy() for t in augment.sample_params(
        tf.constant([3, 1], tf.int64), 25000, 32, 32, FAST)]
    for shifts in (sx, sy):
        values, counts = np.unique(shifts, return_counts=True)
        assert list(values) == [-2, -1, 0, 1, 2]
        assert counts.min() > 0.18 * len(shifts) and counts.max() < 0.22 * len(shifts)


def test_alternating_flip_mirrors_each_example_in_every_other_epoch():
    ids = tf.range(2000)
    flips = [augment.flip_of(FAST, tf.constant([0, epoch], tf.int64), ids,
                             tf.zeros([2000])).numpy() for epoch in range(4)]
    np.testing.assert_array_equal(flips[0] + flips[1], np.ones(2000))
    np.testing.assert_array_equal(flips[0], flips[2])
    np.testing.assert_array_equal(flips[1], flips[3])
    assert 0.45 < flips[0].mean() < 0.55  # a random phase per example
    other_seed = augment.flip_of(FAST, tf.constant([1, 0], tf.int64), ids, tf.zeros([2000]))
    assert np.mean(other_seed.numpy() != flips[0]) > 0.4


@pytest.mark.parametrize("policy", [augment.Policy(), FAST])
def test_an_example_is_augmented_by_its_id_not_its_place_in_the_batch(policy):
    """Keyed by (run seed, epoch, example id): the same example gets the same augmentation
    in any batch, so 1 replica and N replicas (or workers) augment alike."""
    x = images(8)
    ids = tf.constant([5, 17, 2, 40, 41, 3, 9, 100])
    seed = tf.constant([0, 3], tf.int64)
    whole = augment.augment_batch(x, seed, policy, ids).numpy()
    perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
    halves = [augment.augment_batch(x[perm[k:k + 4]], seed, policy,
                                    tf.gather(ids, perm[k:k + 4])).numpy() for k in (0, 4)]
    np.testing.assert_array_equal(np.concatenate(halves), whole[perm])
    next_epoch = augment.augment_batch(x, tf.constant([0, 4], tf.int64), policy, ids).numpy()
    assert np.abs(next_epoch - whole).max() > 0.1


def test_fast_policy_compiles_under_xla_and_matches_eager():
    x = tf.constant(images(8))
    ids, seed = tf.range(8) * 7, tf.constant([3, 4], tf.int64)
    fn = tf.function(lambda x, seed, ids: augment.augment_batch(x, seed, FAST, ids),
                     jit_compile=True)
    # the same pixels (x / 255 may differ by an ulp under XLA)
    np.testing.assert_allclose(fn(x, seed, ids).numpy(),
                               augment.augment_batch(x, seed, FAST, ids).numpy(), atol=1e-7)


def test_tta_views_are_airbench_six_with_their_weights():
    """flip_translate = softmax of the weighted mean of the views' log-probabilities (1/4 the
    image and its mirror, 1/8 each of the four moved views): what averaging logits gives."""
    x = images(2)
    logits_of = {}

    def fn(batch):
        batch = np.asarray(batch)
        logits = np.stack([batch[:, :, :, 0].mean((1, 2)), batch[:, :, :16, 1].mean((1, 2)),
                           batch[:, 5, :, 2].mean(1)], axis=1).astype(np.float32) / 50.0
        logits_of[batch.tobytes()] = logits
        return tf.nn.softmax(logits)

    got = augment.tta_probabilities(fn, x, "flip_translate").numpy()
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    views = [(0.25, x), (0.25, x[:, :, ::-1])]
    for moved in (padded[:, :32, :32], padded[:, 2:, 2:]):
        views += [(0.125, moved), (0.125, moved[:, :, ::-1])]
    logits = sum(w * logits_of[np.ascontiguousarray(v).tobytes()] for w, v in views)
    np.testing.assert_allclose(got, tf.nn.softmax(logits).numpy(), rtol=1e-5)
    flip = augment.tta_probabilities(fn, x, "flip").numpy()
    assert np.abs(flip - got).max() > 1e-4
    np.testing.assert_allclose(augment.tta_probabilities(fn, x, "none").numpy(),
                               tf.nn.softmax(logits_of[x.tobytes()]).numpy(), rtol=1e-6)
