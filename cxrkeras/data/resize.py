"""build-records' resize as TensorFlow ops: PIL's `Image.resize(size, LANCZOS, reducing_gap=3.0)` on 8-bit images,
reproduced step for step so a served or explained file reaches the model as its stored record would.

PIL (libImaging Reduce.c, Resample.c) resizes 8-bit images in fixed point:
  1. when the source is at least `reducing_gap` times larger, `reduce()` first averages integer blocks
     (factor = int(in / out / reducing_gap) per axis; partial blocks at the right/bottom edges average what they
     hold), rounding as PIL does;
  2. a separable Lanczos-3 resampling, horizontal pass then vertical pass, each rounded and clipped to 0..255.
     A pass's weights are the normalised Lanczos window of support 3 x max(scale, 1) around each output centre,
     quantised to 22 fractional bits; an axis whose size does not change is not resampled.
Here the same steps run as gathers over a band of input pixels per output pixel, in the same int32 fixed point
(the weights are computed in float64, as PIL computes them).
"""

import math

import tensorflow as tf

REDUCING_GAP = 3.0  # cxrkeras.data.images.resize passes this to PIL
_PRECISION_BITS = 22  # PIL: 32 - 8 - 2
_SUPPORT = 3.0  # Lanczos-3


def _lanczos(x):
    """PIL's truncated sinc: sinc(x) * sinc(x / 3) for -3 <= x < 3, else 0 (float64)."""
    pi = tf.constant(math.pi, tf.float64)

    def sinc(v):
        safe = tf.where(tf.equal(v, 0.0), tf.ones_like(v), v)
        return tf.where(tf.equal(v, 0.0), tf.ones_like(v), tf.sin(pi * safe) / (pi * safe))

    inside = tf.logical_and(x >= -_SUPPORT, x < _SUPPORT)
    return tf.where(inside, sinc(x) * sinc(x / 3.0), tf.zeros_like(x))


def _coefficients(in_size, in_extent, out_size):
    """(first input index [out], fixed-point weights [out, taps]) of PIL's precompute_coeffs and
    normalize_coeffs_8bpc for an axis of `in_size` pixels whose region [0, in_extent) becomes `out_size` pixels."""
    in_extent = tf.cast(in_extent, tf.float64)
    scale = in_extent / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = _SUPPORT * filterscale
    taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    # C's (int) truncates toward zero; below zero both clamp to 0
    xmin = tf.maximum(tf.cast(tf.math.floor(center - support + 0.5), tf.int32), 0)
    xmax = tf.minimum(tf.cast(tf.math.floor(center + support + 0.5), tf.int32), in_size)
    offsets = tf.range(taps)
    index = xmin[:, None] + offsets[None, :]
    valid = index < xmax[:, None]
    x = (tf.cast(index, tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = tf.where(valid, _lanczos(x), tf.zeros_like(x))
    total = tf.reduce_sum(w, axis=1, keepdims=True)
    w = tf.where(tf.not_equal(total, 0.0), w / tf.where(tf.equal(total, 0.0), tf.ones_like(total), total), w)
    scaled = w * float(1 << _PRECISION_BITS)
    fixed = tf.where(scaled < 0, tf.math.ceil(scaled - 0.5), tf.math.floor(scaled + 0.5))  # (int)(x -+ 0.5)
    return xmin, fixed


def _resample_axis(image, axis, out_size, in_extent):
    """One fixed-point Lanczos pass along `axis` (0: rows, 1: columns) of an int32 (H, W, C) image of levels, in
    PIL's own int32 arithmetic: (2^21 + sum of level x weight) >> 22, clipped to 0..255."""
    in_size = tf.shape(image)[axis]
    xmin, weights = _coefficients(in_size, in_extent, out_size)
    weights = tf.cast(weights, tf.int32)
    taps = tf.shape(weights)[1]
    index = tf.minimum(xmin[:, None] + tf.range(taps)[None, :], in_size - 1)  # [out, taps]; padded taps weigh 0
    picked = tf.gather(image, index, axis=axis)  # axis 1: (H, out, taps, C); axis 0: (out, taps, W, C)
    if axis == 1:
        total = tf.reduce_sum(picked * weights[None, :, :, None], axis=2)
    else:
        total = tf.reduce_sum(picked * weights[:, :, None, None], axis=1)
    shifted = tf.bitwise.right_shift(total + (1 << (_PRECISION_BITS - 1)), _PRECISION_BITS)  # arithmetic shift
    return tf.clip_by_value(shifted, 0, 255)


def _reduce(image, fy, fx):
    """PIL's Image.reduce((fx, fy)) of an int32 (H, W, C) image of levels: block sums rounded as its fixed point
    ((sum + n // 2) * floor(2^32 / (256 n) in float32)) >> 24, n the pixels of the (possibly partial) block."""
    shape = tf.shape(image)
    h, w, c = shape[0], shape[1], shape[2]
    oh, ow = (h + fy - 1) // fy, (w + fx - 1) // fx
    padded = tf.pad(image, [[0, oh * fy - h], [0, ow * fx - w], [0, 0]])
    sums = tf.reduce_sum(tf.reshape(padded, [oh, fy, ow, fx, c]), axis=[1, 3])
    rows = tf.minimum(fy, h - tf.range(oh) * fy)
    cols = tf.minimum(fx, w - tf.range(ow) * fx)
    count = tf.cast(rows[:, None] * cols[None, :], tf.int64)[..., None]  # [oh, ow, 1]
    multiplier = tf.cast(tf.cast(4294967296.0, tf.float32) / tf.cast(256 * count, tf.float32), tf.int64)
    value = tf.bitwise.right_shift((tf.cast(sums, tf.int64) + count // 2) * multiplier, 24)
    return tf.cast(value, tf.int32)


def pil_resize(image, size, reducing_gap=REDUCING_GAP):
    """(H, W, C) whole levels 0..255 -> float32 (height, width, C) whole levels: what
    `cxrkeras.data.images.resize` (PIL LANCZOS, reducing_gap 3) makes of the same 8-bit image (an image already of
    that size comes back unchanged: no reduce, and neither pass runs)."""
    height, width = int(size[0]), int(size[1])
    image = tf.convert_to_tensor(image)
    x = tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.int32)
    shape = tf.shape(x)
    h, w = shape[0], shape[1]
    fx = tf.maximum(tf.cast(tf.cast(w, tf.float64) / width / reducing_gap, tf.int32), 1)
    fy = tf.maximum(tf.cast(tf.cast(h, tf.float64) / height / reducing_gap, tf.int32), 1)
    # PIL passes the reduced box to C as float32: the region [0, in / factor) of the reduced image
    extent_x = tf.cast(tf.cast(tf.cast(w, tf.float64) / tf.cast(fx, tf.float64), tf.float32), tf.float64)
    extent_y = tf.cast(tf.cast(tf.cast(h, tf.float64) / tf.cast(fy, tf.float64), tf.float32), tf.float64)
    x = tf.cond(tf.logical_or(fx > 1, fy > 1), lambda: _reduce(x, fy, fx), lambda: x)
    rw, rh = tf.shape(x)[1], tf.shape(x)[0]
    # PIL: a pass runs when its axis changes size or its region is not the whole axis
    need_x = tf.logical_or(tf.not_equal(rw, width), tf.not_equal(extent_x, tf.cast(width, tf.float64)))
    need_y = tf.logical_or(tf.not_equal(rh, height), tf.not_equal(extent_y, tf.cast(height, tf.float64)))
    x = tf.cond(need_x, lambda: _resample_axis(x, 1, width, extent_x), lambda: x)
    x = tf.cond(need_y, lambda: _resample_axis(x, 0, height, extent_y), lambda: x)
    x.set_shape([height, width, image.shape[-1]])
    return tf.cast(x, tf.float32)
