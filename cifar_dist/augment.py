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
each image's draws come from (run seed, epoch, its example id), so an example is augmented
the same whatever the number of replicas and workers.

Policy also offers the fast recipes' augmentation: whole-pixel translation with reflect
padding and flips that alternate by epoch (airbench; --translate_pixels, --flip).
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from cifar_dist.config import TTA_VIEWS

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


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the step does to each training image (the --rotation_degrees, --shift_fraction,
    --translate_pixels and --flip flags). The default is the seed's augmentation.

    rotation/shift: the seed's continuous affine map (bilinear, nearest fill).
    translate_pixels: the fast recipes' integer translation by up to N pixels with reflect
      padding (exact: a gather of the image's own pixels); only without rotation and shift.
    flip: "random" (p = 0.5 each epoch), "alternating" (each example mirrored in every
      other epoch, from a random phase of its own: airbench's scheme) or "none".
    """
    rotation_degrees: float = ROTATION_DEGREES
    shift_fraction: float = SHIFT_FRACTION
    translate_pixels: int = 0
    flip: str = "random"

    @classmethod
    def from_config(cls, cfg) -> "Policy":
        return cls(cfg.rotation_degrees, cfg.shift_fraction, cfg.translate_pixels, cfg.flip)

    @property
    def affine(self) -> bool:
        return self.rotation_degrees != 0 or self.shift_fraction != 0


def _key(*parts) -> tf.Tensor:
    """One uint32 key hashed from int64 parts (both 32-bit halves of each)."""
    key = tf.constant(0x3C6EF372, tf.uint32)
    for part in parts:
        part = tf.cast(part, tf.int64)
        low = tf.cast(tf.bitwise.bitwise_and(part, 0xFFFFFFFF), tf.uint32)
        high = tf.cast(tf.bitwise.right_shift(part, 32) & 0xFFFFFFFF, tf.uint32)
        key = _hash32(_hash32(key ^ low) ^ high)
    return key


def example_uniforms(key: tf.Tensor, ids: tf.Tensor, streams: int) -> tf.Tensor:
    """float32 [streams, batch] uniform in [0, 1): stream s of example ids[b], a pure
    function of (key, example id, s).

    Counter-based hashing instead of tf.random.stateless_*: those give different numbers
    under XLA than in the TF kernels (even with alg='philox'), and the step may run either
    way (see train.py). Integer arithmetic gives identical draws on every device and path,
    and keyed by the example (not the step or replica) an example gets the same draws
    whatever the number of replicas and workers.
    """
    ids = tf.cast(ids, tf.uint32)
    stream = tf.cast(tf.range(streams), tf.uint32)[:, None]
    counter = ids[None, :] * tf.constant(streams, tf.uint32) + stream
    counter = counter * tf.constant(0x9E3779B9, tf.uint32)
    bits = _hash32(_hash32(counter ^ key) + key)
    return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))


def sample_params(seed: tf.Tensor, batch, height: int, width: int, policy: Policy = Policy(),
                  ids=None):
    """Per-image (angle [rad], shift_x [px], shift_y [px], random flip {0,1}) from a stateless
    seed pair (run seed, epoch) and the images' example ids (default 0..batch-1). With
    --translate_pixels=N the shifts are whole pixels, uniform over -N..N."""
    seed = tf.cast(seed, tf.int64)
    ids = tf.range(batch) if ids is None else ids
    u = example_uniforms(_key(seed[0], seed[1]), ids, 4)
    angle = (2.0 * u[0] - 1.0) * (policy.rotation_degrees * math.pi / 180.0)
    if policy.translate_pixels:
        n = policy.translate_pixels
        shift_x, shift_y = [tf.minimum(tf.floor(u[k] * (2 * n + 1)), 2.0 * n) - n for k in (1, 2)]
    else:
        shift_x = (2.0 * u[1] - 1.0) * (policy.shift_fraction * width)
        shift_y = (2.0 * u[2] - 1.0) * (policy.shift_fraction * height)
    flip = tf.cast(u[3] < FLIP_PROBABILITY, tf.float32)
    return angle, shift_x, shift_y, flip


def flip_of(policy: Policy, seed: tf.Tensor, ids, random_flip) -> tf.Tensor:
    """float32 {0, 1} per image. alternating: a phase per example (from the run seed and its
    id alone), added to the epoch: mirrored in every other epoch."""
    if policy.flip == "random":
        return random_flip
    if policy.flip == "none":
        return tf.zeros_like(random_flip)
    seed = tf.cast(seed, tf.int64)
    phase = example_uniforms(_key(seed[0], -1), ids, 1)[0] < 0.5
    odd_epoch = tf.equal(tf.math.floormod(seed[1], 2), 1)
    return tf.cast(tf.math.logical_xor(phase, odd_epoch), tf.float32)


def reflect_index(index, size: int):
    """Reflect padding's source index (no edge repeat: -1 -> 1, size -> size - 2)."""
    index = tf.abs(index)
    return (size - 1) - tf.abs((size - 1) - index)


def translate_sample(images_u8: tf.Tensor, shift_x, shift_y, flip) -> tf.Tensor:
    """uint8 images moved by integer shifts (content right/down for positive), reflect fill,
    then mirrored where flip is 1: one gather of each image's own pixels, exact."""
    batch = tf.shape(images_u8)[0]
    height, width, channels = images_u8.shape[1], images_u8.shape[2], images_u8.shape[3]
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    flip = tf.cast(flip, tf.int32)[:, None, None]
    cols = flip * (width - 1 - cols) + (1 - flip) * cols
    src_y = reflect_index(rows - tf.cast(shift_y, tf.int32)[:, None, None], height)
    src_x = reflect_index(cols - tf.cast(shift_x, tf.int32)[:, None, None], width)
    index = tf.reshape(src_y * width + src_x, [batch, height * width])
    flat = tf.reshape(images_u8, [batch, height * width, channels])
    return tf.reshape(tf.gather(flat, index, batch_dims=1), [batch, height, width, channels])


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


def augment_batch(images_u8: tf.Tensor, seed: tf.Tensor, policy: Policy = Policy(),
                  ids=None) -> tf.Tensor:
    """uint8 [B, H, W, C] -> augmented float32 [B, H, W, C] in [0, 1].

    seed: the int64 pair (run seed, epoch); ids: each image's example id in the training set
    (default 0..B-1). Each image's draws are a function of (run seed, epoch, its id) only.
    """
    batch = tf.shape(images_u8)[0]
    ids = tf.range(batch) if ids is None else ids
    angle, shift_x, shift_y, random_flip = sample_params(
        seed, batch, images_u8.shape[1], images_u8.shape[2], policy, ids)
    flip = flip_of(policy, seed, ids, random_flip)
    if policy.affine:
        return affine_sample(to_unit_float(images_u8), angle, shift_x, shift_y, flip)
    return to_unit_float(translate_sample(images_u8, shift_x, shift_y, flip))


# --------------------------------------------------------------------------- test time

def tta_probabilities(probabilities_fn, images_u8, views: str = "flip") -> tf.Tensor:
    """Class probabilities of uint8 images under test-time augmentation (--tta_views):
      none            the image alone;
      flip            the image and its mirror image, equal weights;
      flip_translate  airbench's 6 views: the image and its mirror (1/4 each), and both
                      moved one pixel down-right and one pixel up-left with reflect padding
                      (1/8 each).
    The views' log-probabilities are averaged and renormalised: the same as averaging the
    network's logits, as airbench does. Evaluation, predict and the exported model all call
    this; probabilities_fn maps a uint8 batch to probabilities.
    """
    images = tf.convert_to_tensor(images_u8)
    if views == "none":
        return probabilities_fn(images)
    if views not in TTA_VIEWS:
        raise ValueError(f"unknown test-time views {views!r}: one of {', '.join(TTA_VIEWS)}")

    def mirror(x):
        return tf.reverse(x, axis=[2])

    weighted = [(0.5, images), (0.5, mirror(images))]
    if views == "flip_translate":
        height, width = images.shape[1], images.shape[2]
        padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
        moved = [padded[:, :height, :width], padded[:, 2:, 2:]]
        weighted = ([(0.25, images), (0.25, mirror(images))]
                    + [(0.125, view) for x in moved for view in (x, mirror(x))])
    log_mean = tf.add_n([weight * tf.math.log(tf.maximum(probabilities_fn(view), 1e-30))
                         for weight, view in weighted])
    return tf.nn.softmax(log_mean)
