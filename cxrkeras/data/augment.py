"""Training augmentation as graph ops: random square crop + zoom, rotation and flip in ONE bilinear warp per image.

A random square crop whose side is `crop_scale` (default 0.8-1.0) of the short side, anywhere in the image, rotated
by +-`max_rotation` degrees and flipped left/right with p=0.5, resampled to `image_size` in one warp. A centred crop
of side 1.0 without rotation is the eval view (the eval resize also antialiases; with 256 px records and 224 px
inputs the two differ only by that slight smoothing).
"""

import math

import tensorflow as tf

from cxrkeras.constants import FILL_MODES
from cxrkeras.data.eval_transform import image_size_of
from cxrkeras.data.normalize import to_model_input
from cxrkeras.errors import ConfigError


def check_crop_scale(crop_scale):
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
    return lo, hi


def augment_transforms(batch, height, width, image_size, seed, max_rotation=10.0, crop_scale=(0.8, 1.0), flip=True):
    """[batch, 8] projective transforms (output pixel -> input pixel, the ImageProjectiveTransformV3 convention)
    for a random square crop + zoom, rotation and horizontal flip; stateless random from `seed` (shape [2])."""
    size = float(image_size_of(image_size))
    lo, hi = check_crop_scale(crop_scale)
    # explicit algorithm: the same numbers on every device (XLA-compiled code draws differently: keep this
    # outside a jit_compile function, as the pipeline does)
    u = tf.random.stateless_uniform([batch, 5], seed=seed, alg="philox")
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    side = (lo + (hi - lo) * u[:, 0]) * tf.minimum(height, width)
    cx = side / 2.0 + u[:, 1] * (width - side)
    cy = side / 2.0 + u[:, 2] * (height - side)
    theta = (2.0 * u[:, 3] - 1.0) * (float(max_rotation) * math.pi / 180.0)
    f = tf.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else tf.ones([batch])
    cos, sin = tf.cos(theta), tf.sin(theta)
    # output pixel x_o -> centred unit coordinate u = (x_o + 0.5)/S - 0.5 -> flip -> rotate -> scale into the crop
    # -> input pixel index (crop centre + offset - 0.5, pixel centres at integer coordinates).
    d = 0.5 / size - 0.5
    a0 = side * cos * f / size
    a1 = -side * sin / size
    a2 = cx - 0.5 + side * d * (cos * f - sin)
    b0 = side * sin * f / size
    b1 = side * cos / size
    b2 = cy - 0.5 + side * d * (sin * f + cos)
    zeros = tf.zeros([batch])
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def warp_bilinear(images, transforms, image_size, fill_mode="reflect"):
    """Resample (B, H, W, C) images to (B, S, S, C) float32 through per-image affine `transforms`
    ([B, 8], ImageProjectiveTransformV3 convention: output pixel -> input pixel); bilinear.

    Plain gathers instead of the ImageProjectiveTransformV3 kernel: XLA can compile and fuse them (several times
    faster on CPU). fill_mode: "reflect" (mirror about the image edge, as tf/keras "reflect", within one image
    size of the edge: all the augmentation reaches), "nearest" (edge pixel), "constant" (0).
    """
    if fill_mode not in FILL_MODES:
        raise ConfigError(f"unknown fill_mode {fill_mode!r}: choose one of {', '.join(FILL_MODES)}")
    size = image_size_of(image_size)
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    channels = images.shape[-1] if images.shape[-1] is not None else shape[3]
    grid = tf.range(size, dtype=tf.float32)
    t = tf.cast(transforms, tf.float32)[:, :, None, None]
    xs = t[:, 0] * grid[None, None, :] + t[:, 1] * grid[None, :, None] + t[:, 2]  # [B, S, S]
    ys = t[:, 3] * grid[None, None, :] + t[:, 4] * grid[None, :, None] + t[:, 5]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)

    def reflect(v, n):
        # one mirror about each edge (no floormod: a sixth of the warp's time on CPU) covers every point of
        # `augment_transforms`: a rotated crop inside the image overshoots an edge by at most 0.21 of its side.
        # Points farther out take the edge pixel (the clip below).
        v = tf.where(v < -0.5, -1.0 - v, v)
        return tf.where(v > n - 0.5, 2.0 * n - 1.0 - v, v)

    if fill_mode == "reflect":
        xs, ys = reflect(xs, wf), reflect(ys, hf)
    if fill_mode != "constant":
        xs, ys = tf.clip_by_value(xs, 0.0, wf - 1.0), tf.clip_by_value(ys, 0.0, hf - 1.0)
    x0f, y0f = tf.floor(xs), tf.floor(ys)
    wx, wy = (xs - x0f)[..., None], (ys - y0f)[..., None]
    x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
    flat = tf.reshape(images, [b, h * w, channels])

    def pick(yy, xx):
        inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        index = tf.clip_by_value(yy, 0, h - 1) * w + tf.clip_by_value(xx, 0, w - 1)
        values = tf.cast(tf.gather(flat, tf.reshape(index, [b, -1]), batch_dims=1), tf.float32)
        values = tf.reshape(values, [b, size, size, channels])
        return values * tf.cast(inside, tf.float32)[..., None] if fill_mode == "constant" else values

    top = pick(y0, x0) * (1.0 - wx) + pick(y0, x0 + 1) * wx
    bottom = pick(y0 + 1, x0) * (1.0 - wx) + pick(y0 + 1, x0 + 1) * wx
    return top * (1.0 - wy) + bottom * wy


def random_augment(images, seed, image_size, max_rotation=10.0, crop_scale=(0.8, 1.0), flip=True,
                   fill_mode="reflect"):
    """Training augmentation (paper: rotation ±10°, horizontal flip, random crop + zoom) of a batch.

    `images`: (B, H, W, C) or (H, W, C), uint8 or float in [0, 255]; `seed`: int tensor of shape [2] (stateless:
    same seed, same output). Returns float32 (B, S, S, C) in [0, 255]: one bilinear warp per image, vectorised.
    """
    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    x = images[None] if single else images
    shape = tf.shape(x)
    transforms = augment_transforms(shape[0], shape[1], shape[2], image_size, seed, max_rotation, crop_scale, flip)
    out = warp_in_range(x, transforms, image_size, fill_mode)
    return out[0] if single else out


def warp_in_range(images, transforms, image_size, fill_mode="reflect"):
    """`warp_bilinear` clipped to [0, 255] (bilinear of in-range values is in range; this guards float error)."""
    return tf.clip_by_value(warp_bilinear(images, transforms, image_size, fill_mode), 0.0, 255.0)


def augment_and_normalize(images, seed, image_size, mode, **augment_options):
    """`random_augment` -> 3 channels -> `normalize`: the training transform of a batch."""
    return to_model_input(random_augment(images, seed, image_size, **augment_options), mode)
