"""The seed's augmentation, batched and XLA-compilable, run on the device inside the step.

Semantics (Keras' old ImageDataGenerator(rotation_range=15, width_shift_range=0.1,
height_shift_range=0.1, horizontal_flip=True) with rescale 1/255):
  rotation uniform in [-15, 15] degrees about the image centre,
  shifts uniform in [-0.1, 0.1] x image size (continuous, in pixels),
  horizontal flip with p = 0.5,
  bilinear sampling, pixels scaled to [0, 1].

Fill: 'nearest' (a coordinate outside the image takes the nearest edge pixel). It is
ImageDataGenerator's default, so it is what the seed trained with, and it avoids
black wedges the network could learn as a cue.

Why not keras.layers.RandomRotation: its kernel (ImageProjectiveTransformV3) has no
XLA implementation in TF 2.21. Here one inverse-affine sampling grid per image (flip,
shift and rotation composed) is sampled with tf.gather(batch_dims=1), which compiles.
Randomness is stateless (XLA ignores op-level seeds) and identical with and without XLA:
the caller passes a seed made of (run seed, step, replica).
"""

from __future__ import annotations

import math

import tensorflow as tf

ROTATION_DEGREES = 15.0
SHIFT_FRACTION = 0.1
FLIP_PROBABILITY = 0.5


def to_unit_float(images_u8: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return tf.cast(images_u8, tf.float32) / 255.0


def _hash32(x: tf.Tensor) -> tf.Tensor:
    """A well-mixed uint32 -> uint32 hash (Wellons' lowbias32): plain integer arithmetic."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def stateless_uniforms(seed: tf.Tensor, streams: int, batch) -> tf.Tensor:
    """float32 [streams, batch] uniform in [0, 1), a pure function of the int64 seed pair.

    Counter-based hashing instead of tf.random.stateless_*: those give different numbers
    under XLA than in the TF kernels (even with alg='philox'), and the step may run either
    way (see train.py). Integer arithmetic gives identical draws on every device and path.
    """
    seed = tf.cast(seed, tf.int64)
    low = tf.cast(tf.bitwise.bitwise_and(seed, 0xFFFFFFFF), tf.uint32)
    high = tf.cast(tf.bitwise.right_shift(seed, 32) & 0xFFFFFFFF, tf.uint32)
    key = _hash32(low[0] ^ tf.constant(0x3C6EF372, tf.uint32))
    for part in (high[0], low[1], high[1]):
        key = _hash32(key ^ part)
    counter = tf.range(streams * batch)
    counter = tf.cast(counter, tf.uint32) * tf.constant(0x9E3779B9, tf.uint32)
    bits = _hash32(_hash32(counter ^ key) + key)
    uniform = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))
    return tf.reshape(uniform, [streams, batch])


def sample_params(seed: tf.Tensor, batch, height: int, width: int,
                  rotation_degrees: float = ROTATION_DEGREES,
                  shift_fraction: float = SHIFT_FRACTION,
                  flip_probability: float = FLIP_PROBABILITY):
    """Per-image (angle [rad], shift_x [px], shift_y [px], flip {0,1}) from a stateless seed."""
    u = stateless_uniforms(seed, 4, batch)
    max_angle = rotation_degrees * math.pi / 180.0
    angle = (2.0 * u[0] - 1.0) * max_angle
    shift_x = (2.0 * u[1] - 1.0) * (shift_fraction * width)
    shift_y = (2.0 * u[2] - 1.0) * (shift_fraction * height)
    flip = tf.cast(u[3] < flip_probability, tf.float32)
    return angle, shift_x, shift_y, flip


def affine_sample(images: tf.Tensor, angle, shift_x, shift_y, flip) -> tf.Tensor:
    """Samples each float image at its inverse-affine grid, bilinear, nearest fill.

    For output pixel (row i, col j): flip the column (j -> W-1-j) when flip is 1, then
    undo the shift and the rotation about the centre to find the source coordinate.
    A positive shift moves content right/down; a positive angle rotates it
    counter-clockwise as displayed (row axis pointing down).
    """
    batch = tf.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    rows = tf.range(height, dtype=tf.float32)[:, None] * tf.ones([1, width])
    cols = tf.ones([height, 1]) * tf.range(width, dtype=tf.float32)[None, :]
    rows, cols = rows[None], cols[None]  # [1, H, W]

    def per_image(v):
        return v[:, None, None]

    cols = per_image(flip) * (width - 1 - cols) + (1.0 - per_image(flip)) * cols
    u = cols - cx - per_image(shift_x)
    v = rows - cy - per_image(shift_y)
    cos, sin = per_image(tf.cos(angle)), per_image(tf.sin(angle))
    # Inverse of a counter-clockwise rotation (as displayed, rows down) by `angle`.
    src_x = cos * u - sin * v + cx
    src_y = sin * u + cos * v + cy
    # Nearest fill == clamp the coordinate into the image before interpolating.
    src_x = tf.clip_by_value(src_x, 0.0, width - 1.0)
    src_y = tf.clip_by_value(src_y, 0.0, height - 1.0)
    x0 = tf.floor(src_x)
    y0 = tf.floor(src_y)
    wx = src_x - x0
    wy = src_y - y0
    x0 = tf.cast(x0, tf.int32)
    y0 = tf.cast(y0, tf.int32)
    x1 = tf.minimum(x0 + 1, width - 1)
    y1 = tf.minimum(y0 + 1, height - 1)

    flat = tf.reshape(images, [batch, height * width, channels])

    def gather(y, x):
        index = tf.reshape(y * width + x, [batch, height * width])
        return tf.reshape(tf.gather(flat, index, batch_dims=1), [batch, height, width, channels])

    wx, wy = wx[..., None], wy[..., None]
    top = gather(y0, x0) * (1.0 - wx) + gather(y0, x1) * wx
    bottom = gather(y1, x0) * (1.0 - wx) + gather(y1, x1) * wx
    return top * (1.0 - wy) + bottom * wy


def augment_batch(images_u8: tf.Tensor, seed: tf.Tensor,
                  rotation_degrees: float = ROTATION_DEGREES,
                  shift_fraction: float = SHIFT_FRACTION,
                  flip_probability: float = FLIP_PROBABILITY) -> tf.Tensor:
    """uint8 [B, H, W, C] -> augmented float32 [B, H, W, C] in [0, 1]."""
    images = to_unit_float(images_u8)
    batch = tf.shape(images)[0]
    params = sample_params(seed, batch, images.shape[1], images.shape[2],
                           rotation_degrees, shift_fraction, flip_probability)
    return affine_sample(images, *params)
