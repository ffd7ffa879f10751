"""The whitening initialisation of the first convolution (cifar_dist/whitening.py)."""

from __future__ import annotations

import numpy as np

from cifar_dist import whitening
from cifar_dist.model import CIFAR10_MEAN, CIFAR10_STD


def real_images():
    from cifar_dist import data
    from cifar_dist.config import Config
    return data.load(Config(dataset="sample")).train.images


def normalised(images):
    return (images.astype(np.float64) / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)


def test_filters_whiten_the_patches_and_come_in_signed_pairs():
    images = real_images()
    filters = whitening.whitening_filters(images, 2, seed=0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    assert filters.shape == (2, 2, 3, 24) and filters.dtype == np.float32
    flat = filters.reshape(12, 24)
    np.testing.assert_array_equal(flat[:, 12:], -flat[:, :12])
    patches = whitening.patches(normalised(images), 2)
    out = patches @ flat[:, :12].astype(np.float64)
    covariance = out.T @ out / len(out)
    # identity up to the regularising epsilon (it shrinks only the smallest directions)
    np.testing.assert_allclose(np.diag(covariance)[:6], 1.0, atol=0.01)
    assert np.all(np.diag(covariance) <= 1.0 + 1e-9)
    assert np.abs(covariance - np.diag(np.diag(covariance))).max() < 1e-6


def test_filters_are_a_function_of_the_data_and_the_seed():
    images = real_images()
    a = whitening.whitening_filters(images, 3, seed=0, subset=500)
    b = whitening.whitening_filters(images, 3, seed=0, subset=500)
    c = whitening.whitening_filters(images, 3, seed=1, subset=500)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 3, 3, 54)
    assert np.abs(a - c).max() > 1e-3  # another subset of images
