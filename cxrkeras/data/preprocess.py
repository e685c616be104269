"""Graph-only image transforms: decoding, ImageNet normalisation, the one eval transform, equalisation, augmentation.

Everything here is TensorFlow ops only (no Python per image), so it runs inside tf.data and inside a SavedModel.

Geometry (one rule for train and eval, so the model sees the same scale in both):
  * eval: take the largest CENTRAL SQUARE of the image and resize it to `image_size` (bilinear, antialiased).
    NIH images are square, so for them this is a plain resize of the whole image; nothing of the lung
    periphery (costophrenic angles, apices) is cut away, which a fixed 87.5 % centre crop would do.
  * train: a random square crop whose side is `crop_scale` (default 0.8–1.0) of the short side, anywhere in
    the image, rotated by ±`max_rotation` degrees and flipped left/right with p=0.5, resampled to `image_size`
    in ONE bilinear warp. A centred crop of side 1.0 without rotation is the eval view (the eval resize also
    antialiases; with 256 px records and 224 px inputs the two differ only by that slight smoothing).
"""

import math

import tensorflow as tf

from cxrkeras.errors import ConfigError

MODES = ("torch", "caffe")
EQUALIZE = (None, "hist", "clahe")
FILL_MODES = ("reflect", "nearest", "constant")

# keras.applications.imagenet_utils: "torch" (ImageNet mean/std: DenseNet121, torchvision's VGG16-BN) and "caffe"
# (keras.applications' plain VGG16) constants.
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def check_mode(mode):
    if mode not in MODES:
        raise ConfigError(f"unknown preprocessing {mode!r}: choose one of {', '.join(MODES)} "
                          f"(the model's preprocessing: 'torch' = ImageNet mean/std RGB, 'caffe' = keras.applications' "
                          "plain VGG16)")
    return mode


def check_equalize(equalize):
    if equalize not in EQUALIZE:
        raise ConfigError(f"unknown equalize {equalize!r}: choose None, 'hist' or 'clahe'")
    return equalize


def _channel_map(mode, channels):
    """(channels x 3 matrix, 3 bias) with normalize(x) = x @ M + b per pixel; channels=1 also copies gray to RGB."""
    import numpy as np

    if mode == "torch":
        m = np.diag(1.0 / (255.0 * np.array(_TORCH_STD)))
        b = -np.array(_TORCH_MEAN) / np.array(_TORCH_STD)
    else:
        m = np.eye(3)[:, ::-1]  # RGB -> BGR
        b = -np.array(_CAFFE_BGR_MEAN)
    if channels == 1:
        m = m.sum(axis=0, keepdims=True)
    return tf.constant(m, tf.float32), tf.constant(b, tf.float32)


def to_model_input(images, mode):
    """Images in [0, 255] with 1 (gray) or 3 (RGB) channels -> normalised RGB float32 (..., 3), in one per-pixel
    matmul + bias (much faster on CPU than broadcasting elementwise ops; equal up to float rounding)."""
    check_mode(mode)
    x = tf.cast(tf.convert_to_tensor(images), tf.float32)
    channels = x.shape[-1]
    if channels not in (1, 3):
        x, channels = to_rgb(x), 3
    m, b = _channel_map(mode, channels)
    shape = tf.shape(x)
    y = tf.nn.bias_add(tf.matmul(tf.reshape(x, [-1, channels]), m), b)
    return tf.reshape(y, tf.concat([shape[:-1], [3]], axis=0))


def normalize(images, mode):
    """RGB float images in [0, 255] (..., 3) -> the backbone's ImageNet input, as keras.applications' preprocess_input
    ("torch": /255, minus mean, over std; "caffe": RGB->BGR minus the BGR means)."""
    images = tf.convert_to_tensor(images)
    if images.shape[-1] is not None and images.shape[-1] != 3:
        raise ConfigError(f"normalize expects RGB images (..., 3), got shape {images.shape}; use to_model_input")
    return to_model_input(images, mode)


def denormalize(images, mode):
    """Inverse of `normalize`: RGB float in [0, 255] (for display)."""
    check_mode(mode)
    x = tf.cast(images, tf.float32)
    if mode == "torch":
        x = (x * tf.constant(_TORCH_STD) + tf.constant(_TORCH_MEAN)) * 255.0
    else:
        x = (x + tf.constant(_CAFFE_BGR_MEAN))[..., ::-1]
    return tf.clip_by_value(x, 0.0, 255.0)


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


def decode_levels(contents):
    """PNG/JPEG bytes -> float32 (H, W, C) in [0, 255] with the channels as stored (1-4).

    Decoded as uint16 so 16-bit PNGs keep their precision. 8-bit values v arrive as v*257 and /257 maps them back
    exactly; a 16-bit PNG (X-rays often use 10-14 of its bits) is stretched to its own range, rounded to whole
    levels, exactly as `build-records` stores it, so a served 16-bit file looks like its training record.
    Bad bytes raise InvalidArgumentError (a graph op error).
    """
    image = tf.io.decode_image(contents, channels=0, dtype=tf.uint16, expand_animations=False)
    image = tf.ensure_shape(tf.cast(image, tf.float32), [None, None, None])
    # PNG: 8-byte signature, IHDR length + type + width + height, then the bit depth byte at offset 24.
    header = tf.strings.substr(tf.strings.join([contents, _HEADER_PAD]), 0, 25)
    is_png16 = tf.logical_and(tf.equal(tf.strings.substr(header, 1, 3), b"PNG"),
                              tf.equal(tf.strings.substr(header, 24, 1), b"\x10"))
    return tf.cond(is_png16, lambda: _stretch_to_levels(image), lambda: image / 257.0)


_HEADER_PAD = b"\0" * 25


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


# --- contrast equalisation (a seed's preprocessing, optional) ---


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


# --- the one eval transform ---


def _size(image_size):
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
    size = _size(image_size)
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


def preprocess_for_eval(image_0_255, image_size, mode, equalize=None):
    """THE deterministic eval transform (evaluation, export, predict, Grad-CAM): equalise (optional, at the native
    resolution, as the training pipeline does) -> central square -> resize -> 3 channels -> ImageNet normalisation.

    `image_0_255`: (H, W, C) or (B, H, W, C), C in 1..4, values in [0, 255]. Returns float32 (..., S, S, 3).
    """
    check_mode(mode)
    image = tf.convert_to_tensor(image_0_255)
    if equalize is not None:
        if image.shape.rank == 4:
            image = tf.map_fn(lambda im: equalize_image(im, equalize), image,
                              fn_output_signature=tf.TensorSpec(image.shape[1:], image.dtype))
        else:
            image = equalize_image(image, equalize)
    return to_model_input(center_square_resize(image, image_size), mode)


# --- training augmentation ---


def check_crop_scale(crop_scale):
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
    return lo, hi


def augment_transforms(batch, height, width, image_size, seed, max_rotation=10.0, crop_scale=(0.8, 1.0), flip=True):
    """[batch, 8] projective transforms (output pixel -> input pixel, the ImageProjectiveTransformV3 convention)
    for a random square crop + zoom, rotation and horizontal flip; stateless random from `seed` (shape [2])."""
    size = float(_size(image_size))
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
    faster on CPU). fill_mode: "reflect" (mirror about the image edge, as tf/keras "reflect"), "nearest" (edge
    pixel), "constant" (0).
    """
    if fill_mode not in FILL_MODES:
        raise ConfigError(f"unknown fill_mode {fill_mode!r}: choose one of {', '.join(FILL_MODES)}")
    size = _size(image_size)
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    channels = images.shape[-1] if images.shape[-1] is not None else shape[3]
    grid = tf.range(size, dtype=tf.float32)
    t = tf.cast(transforms, tf.float32)[:, :, None, None]
    xs = t[:, 0] * grid[None, None, :] + t[:, 1] * grid[None, :, None] + t[:, 2]  # [B, S, S]
    ys = t[:, 3] * grid[None, None, :] + t[:, 4] * grid[None, :, None] + t[:, 5]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)

    def reflect(v, n):
        period = 2.0 * n
        v = tf.math.floormod(v + 0.5, period)
        return tf.where(v >= n, period - v, v) - 0.5

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
