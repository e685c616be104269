"""THE deterministic eval transform (evaluation, export, predict, Grad-CAM): central square -> antialiased
bilinear resize to the model size -> 3 channels -> normalisation.

NIH images are square, so for them this is a plain resize of the whole image; nothing of the lung periphery
(costophrenic angles, apices) is cut away, which a fixed 87.5 % centre crop would do. Records are square by
construction (build-records resizes every image to SIZE x SIZE), so the central square is the whole record.
"""

import tensorflow as tf

from cxrkeras.data.equalize import equalize_batch
from cxrkeras.data.normalize import check_mode, to_model_input
from cxrkeras.errors import ConfigError


def image_size_of(image_size):
    size = int(image_size)
    if size < 1:
        raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
    return size


def _resize_matrix(n_in, n_out):
    """[n_out, n_in] weights of tf.image.resize(bilinear, antialias) along one axis (the resize is separable)."""
    eye = tf.eye(n_in, dtype=tf.float32)[:, :, None]
    return tf.image.resize(eye, [n_out, n_in], method="bilinear", antialias=True)[..., 0]


def center_square_resize(image, image_size):
    """(..., H, W, C) in [0, 255] -> float32 (..., S, S, C): largest central square, bilinear antialiased resize.

    A batch (rank 4) is resized by two matmuls with the resize's own weights: the same values as tf.image.resize
    (up to float rounding), about twice as fast on CPU; a single image uses tf.image.resize itself.
    """
    size = image_size_of(image_size)
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    h, w = shape[-3], shape[-2]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = tf.cast(image[..., top:top + side, left:left + side, :], tf.float32)
    if image.shape.rank == 4:
        r = _resize_matrix(side, size)
        out = tf.einsum("sh,bhwc->bswc", r, square)
        out = tf.einsum("bswc,tw->bstc", out, r)
    else:
        out = tf.image.resize(square, [size, size], method="bilinear", antialias=True)
    return tf.clip_by_value(out, 0.0, 255.0)


def central_square(height, width):
    """The region (top, left, side, side) of an image that `center_square_resize` shows the model."""
    side = min(int(height), int(width))
    return (int(height) - side) // 2, (int(width) - side) // 2, side, side


def preprocess_for_eval(image_0_255, image_size, mode, equalize=None):
    """Equalise (optional, at the image's own resolution) -> central square -> resize -> 3 channels -> normalisation.

    `image_0_255`: (H, W, C) or (B, H, W, C), C in 1..4, values in [0, 255]. Returns float32 (..., S, S, 3).
    The pipeline equalises the stored records before this; `Preprocessor` brings any file to the records' size
    first, so that evaluation, serving and explanation see the same pixels.
    """
    check_mode(mode)
    image = equalize_batch(tf.convert_to_tensor(image_0_255), equalize)
    return to_model_input(center_square_resize(image, image_size), mode)
