"""Graph decoding of PNG/JPEG bytes into grey levels as build-records stores them (8/16 bit, gray/RGB/alpha)."""

import tensorflow as tf

_HEADER_PAD = b"\0" * 25


def to_rgb(image):
    """(..., H, W, C) with C in 1 (gray), 2 (gray+alpha), 3 (RGB), 4 (RGBA) -> (..., H, W, 3); alpha is dropped."""
    image = tf.convert_to_tensor(image)
    static = image.shape[-1]
    if static is not None:  # known channels: no cond (keeps the op XLA-friendly)
        return image[..., :3] if static >= 3 else tf.concat([image[..., :1]] * 3, axis=-1)
    channels = tf.shape(image)[-1]
    rgb = tf.cond(
        channels >= 3,
        lambda: image[..., :3],
        lambda: tf.repeat(image[..., :1], 3, axis=-1),
    )
    return tf.ensure_shape(rgb, image.shape[:-1].concatenate([3]))


def to_gray(image):
    """(H, W, C) whole levels, C in 1..4 -> (H, W, 1) as PIL's convert("L"): alpha dropped, RGB to ITU-R 601-2 luma
    in PIL's fixed point (R*19595 + G*38470 + B*7471 + 2^15) >> 16, so a colour file becomes the grey build-records
    stores."""
    image = tf.convert_to_tensor(image)
    # gray (and gray+alpha) become three equal channels, whose luma is the gray level itself (the weights sum to 2^16)
    rgb = tf.cast(tf.clip_by_value(tf.round(tf.cast(to_rgb(image), tf.float32)), 0.0, 255.0), tf.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768
    return tf.cast(tf.bitwise.right_shift(weighted, 16)[..., None], tf.float32)


def to_channels(image, channels):
    """Levels in the records' channels: 1 -> `to_gray`, 3 -> `to_rgb`, None -> RGB (models that record no
    channels, as served before the records' channels were stored)."""
    return to_gray(image) if channels == 1 else to_rgb(image)


def decode_levels(contents):
    """PNG/JPEG bytes -> float32 (H, W, C) in [0, 255] with the channels as stored (1-4).

    Decoded as uint16 so 16-bit PNGs keep their precision. 8-bit values v arrive as v*257 and /257 maps them back
    exactly; a 16-bit PNG (X-rays often use 10-14 of its bits) is stretched to its own range, rounded to whole
    levels, exactly as `build-records` stores it, so a served 16-bit file looks like its training record.
    JPEG is decoded with libjpeg's accurate integer DCT, as PIL (and so build-records) decodes it, level for level.
    Bad bytes raise InvalidArgumentError (a graph op error).
    """
    header = tf.strings.substr(tf.strings.join([contents, _HEADER_PAD]), 0, 25)
    is_jpeg = tf.equal(tf.strings.substr(header, 0, 3), b"\xff\xd8\xff")

    def jpeg():
        image = tf.io.decode_jpeg(contents, channels=0, dct_method="INTEGER_ACCURATE")
        return tf.ensure_shape(tf.cast(image, tf.float32), [None, None, None])

    def other():
        image = tf.io.decode_image(contents, channels=0, dtype=tf.uint16, expand_animations=False)
        image = tf.ensure_shape(tf.cast(image, tf.float32), [None, None, None])
        # PNG: 8-byte signature, IHDR length + type + width + height, then the bit depth byte at offset 24.
        is_png16 = tf.logical_and(tf.equal(tf.strings.substr(header, 1, 3), b"PNG"),
                                  tf.equal(tf.strings.substr(header, 24, 1), b"\x10"))
        return tf.cond(is_png16, lambda: _stretch_to_levels(image), lambda: image / 257.0)

    return tf.cond(is_jpeg, jpeg, other)


def _stretch_to_levels(image):
    """Min-max of the colour channels (alpha excluded) onto 0..255 whole levels; a flat image becomes 0."""
    channels = tf.shape(image)[-1]
    colour = image[..., : tf.where(channels <= 2, 1, 3)]
    lo, hi = tf.reduce_min(colour), tf.reduce_max(colour)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-12), 0.0)
    return tf.round((image - lo) * scale)


def decode_image(contents):
    """PNG/JPEG bytes (gray, gray+alpha, RGB, RGBA; 8 or 16 bit) -> float32 (H, W, 3) in [0, 255]; see decode_levels."""
    return to_rgb(decode_levels(contents))
