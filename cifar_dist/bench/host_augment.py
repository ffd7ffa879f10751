"""The seed's augmentation on the host, as keras' ImageDataGenerator computes it (method
(3)): scipy's affine transform per image and channel, drawn from a numpy Generator."""

from __future__ import annotations

import numpy as np


def host_affine(x, theta_degrees, tx, ty, flip):
    """keras' ImageDataGenerator.apply_transform for rotation + shift (+ flip) on one float
    HxWxC image: the same matrices (rotation @ shift about the centre (h/2 - 0.5, w/2 - 0.5),
    x/y swapped into numpy's row/column order) and the same scipy.ndimage.affine_transform
    call per channel (order 1, fill 'nearest'). tx moves along rows, ty along columns."""
    from scipy import ndimage  # noqa: PLC0415

    h, w = x.shape[0], x.shape[1]
    theta = np.deg2rad(theta_degrees)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0],
                    [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    move = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    ox, oy = h / 2.0 - 0.5, w / 2.0 - 0.5
    m = (np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]]) @ (rot @ move)
         @ np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]]))
    m[:, [0, 1]] = m[:, [1, 0]]  # M' = P M P: the matrix is written for (x, y) coordinates
    m[[0, 1]] = m[[1, 0]]
    out = np.stack([ndimage.affine_transform(x[..., c], m[:2, :2], m[:2, 2], order=1,
                                             mode="nearest", cval=0.0)
                    for c in range(x.shape[2])], axis=-1)
    return out[:, ::-1] if flip else out


def host_augment_image(x, rng, rotation=15.0, shift=0.1):
    """ImageDataGenerator(rotation_range=15, width_shift_range=0.1, height_shift_range=0.1,
    horizontal_flip=True).random_transform on one float image, drawn from a numpy Generator."""
    h, w = x.shape[0], x.shape[1]
    theta = rng.uniform(-rotation, rotation)
    tx = rng.uniform(-shift, shift) * h
    ty = rng.uniform(-shift, shift) * w
    return host_affine(x, theta, tx, ty, rng.uniform() < 0.5)
