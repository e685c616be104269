"""Contrast equalisation of stored images (a seed's preprocessing, optional): global histogram and CLAHE."""

import tensorflow as tf

from cxrkeras.constants import EQUALIZE as _EQUALIZE
from cxrkeras.errors import ConfigError

EQUALIZE = (None,) + _EQUALIZE


def check_equalize(equalize):
    if equalize not in EQUALIZE:
        raise ConfigError(f"unknown equalize {equalize!r}: choose None, 'hist' or 'clahe'")
    return equalize


def _as_levels(image):
    """uint8 or float [0, 255] -> int32 grey levels 0..255."""
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.int32)
    return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.int32)


def _like(result_0_255, image):
    if image.dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(result_0_255), 0.0, 255.0), tf.uint8)
    return tf.cast(result_0_255, image.dtype)


def hist_equalize(image):
    """Global histogram equalisation of an (H, W, C) image in [0, 255], per channel; same dtype back."""
    image = tf.convert_to_tensor(image)
    levels = _as_levels(image)
    channels = tf.shape(levels)[-1]
    flat = tf.reshape(levels + 256 * tf.range(channels), [-1])
    hist = tf.reshape(tf.math.bincount(flat, minlength=256 * channels, maxlength=256 * channels), [channels, 256])
    cdf = tf.cast(tf.cumsum(hist, axis=-1), tf.float32)
    total = cdf[:, -1:]
    # cdf of the darkest level present maps to 0 (the classical definition); a flat image stays flat.
    cdf_min = tf.reduce_min(tf.where(hist > 0, cdf, total), axis=-1, keepdims=True)
    lut = tf.where(total > cdf_min, (cdf - cdf_min) / tf.maximum(total - cdf_min, 1.0) * 255.0,
                   tf.cast(tf.range(256), tf.float32)[None, :])
    out = tf.gather(tf.reshape(lut, [-1]), levels + 256 * tf.range(channels))
    return _like(out, image)


def clahe(image, clip_limit=2.0, grid=(8, 8)):
    """Contrast-limited adaptive histogram equalisation (as OpenCV's createCLAHE) of an (H, W, C) image in [0, 255].

    Per tile of a `grid` (rows, cols): histogram clipped at clip_limit * tile_pixels / 256 with the excess spread
    evenly, its cdf as lookup table; each pixel bilinearly blends the tables of its four nearest tile centres.
    """
    image = tf.convert_to_tensor(image)
    levels = _as_levels(image)
    gy, gx = int(grid[0]), int(grid[1])
    shape = tf.shape(levels)
    h, w, c = shape[0], shape[1], shape[2]
    th, tw = (h + gy - 1) // gy, (w + gx - 1) // gx
    padded = tf.pad(levels, [[0, gy * th - h], [0, gx * tw - w], [0, 0]], mode="SYMMETRIC")
    ys = tf.range(gy * th)[:, None, None] // th
    xs = tf.range(gx * tw)[None, :, None] // tw
    bins = ((ys * gx + xs) * c + tf.range(c)[None, None, :]) * 256 + padded
    n_bins = gy * gx * c * 256
    hist = tf.cast(tf.reshape(tf.math.bincount(tf.reshape(bins, [-1]), minlength=n_bins, maxlength=n_bins),
                              [gy * gx, c, 256]), tf.float32)
    area = tf.cast(th * tw, tf.float32)
    limit = tf.maximum(clip_limit * area / 256.0, 1.0)
    excess = tf.reduce_sum(tf.nn.relu(hist - limit), axis=-1, keepdims=True)
    hist = tf.minimum(hist, limit) + excess / 256.0
    lut = tf.reshape(tf.clip_by_value(tf.cumsum(hist, axis=-1) * (255.0 / area), 0.0, 255.0), [-1])

    def axis_weights(n, tile, g):
        f = (tf.cast(tf.range(n), tf.float32) + 0.5) / tf.cast(tile, tf.float32) - 0.5
        i0 = tf.floor(f)
        wgt = f - i0
        i0 = tf.cast(i0, tf.int32)
        return tf.clip_by_value(i0, 0, g - 1), tf.clip_by_value(i0 + 1, 0, g - 1), wgt

    y0, y1, wy = axis_weights(h, th, gy)
    x0, x1, wx = axis_weights(w, tw, gx)
    y0, y1, wy = y0[:, None, None], y1[:, None, None], wy[:, None, None]
    x0, x1, wx = x0[None, :, None], x1[None, :, None], wx[None, :, None]
    ch = tf.range(c)[None, None, :]

    def table(ty, tx):
        return tf.gather(lut, ((ty * gx + tx) * c + ch) * 256 + levels)

    top = table(y0, x0) * (1.0 - wx) + table(y0, x1) * wx
    bottom = table(y1, x0) * (1.0 - wx) + table(y1, x1) * wx
    return _like(top * (1.0 - wy) + bottom * wy, image)


def equalize_image(image, equalize):
    """Apply the `equalize` flag (None | "hist" | "clahe") to an (H, W, C) image in [0, 255]."""
    check_equalize(equalize)
    if equalize is None:
        return image
    return hist_equalize(image) if equalize == "hist" else clahe(image)


def equalize_batch(images, equalize):
    """`equalize_image` of one (H, W, C) image or of each image of a (B, H, W, C) batch."""
    check_equalize(equalize)
    images = tf.convert_to_tensor(images)
    if equalize is None or images.shape.rank != 4:
        return equalize_image(images, equalize)
    return tf.map_fn(lambda im: equalize_image(im, equalize), images,
                     fn_output_signature=tf.TensorSpec(images.shape[1:], images.dtype))
