"""Graph image transforms: normalisation vs keras.applications, decoding, eval transform, equalisation, augmentation."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxrkeras.data import preprocess as P
from cxrkeras.data.images import read_image
from cxrkeras.errors import ConfigError


def _png(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_normalize_matches_keras_applications(rng):
    import keras

    x = rng.uniform(0, 255, (2, 7, 5, 3)).astype(np.float32)
    torch = keras.applications.densenet.preprocess_input(x.copy())
    caffe = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(P.normalize(x, "torch").numpy(), torch, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(P.normalize(x, "caffe").numpy(), caffe, rtol=1e-6, atol=1e-4)
    for mode in P.MODES:
        np.testing.assert_allclose(P.denormalize(P.normalize(x, mode), mode).numpy(), x, atol=1e-3)
    with pytest.raises(ConfigError, match="torch, caffe"):
        P.normalize(x, "tf")


def test_decode_gray_rgb_rgba_la_16bit_jpeg(rng, tmp_path):
    gray = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    out = P.decode_image(_png(gray)).numpy()
    assert out.shape == (9, 11, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1).astype(np.float32))

    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(P.decode_image(_png(rgb)).numpy(), rgb.astype(np.float32))

    alpha = rng.integers(0, 256, (9, 11, 1), dtype=np.uint8)  # alpha must be dropped, not blended
    rgba = np.concatenate([rgb, alpha], axis=-1)
    np.testing.assert_array_equal(P.decode_image(_png(rgba)).numpy(), rgb.astype(np.float32))
    la = np.stack([gray, alpha[..., 0]], axis=-1)
    np.testing.assert_array_equal(P.decode_image(_png(la, "LA")).numpy()[..., 1], gray.astype(np.float32))

    # 16-bit: a 12-bit X-ray in a 16-bit PNG is stretched to its own range, exactly as build-records stores it
    levels = rng.integers(100, 4096, (12, 10)).astype(np.uint16)
    img16 = Image.fromarray(levels)
    buf = io.BytesIO()
    img16.save(buf, format="PNG")
    out16 = P.decode_image(buf.getvalue()).numpy()[..., 0]
    assert out16.min() == 0.0 and out16.max() == 255.0
    path = tmp_path / "x16.png"
    path.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(out16, read_image(str(path), channels=1).astype(np.float32))
    flat = io.BytesIO()
    Image.fromarray(np.full((4, 4), 3000, np.uint16)).save(flat, format="PNG")
    assert not np.isnan(P.decode_image(flat.getvalue()).numpy()).any()

    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    out_jpg = P.decode_image(buf.getvalue()).numpy()
    assert out_jpg.shape == (32, 32, 3) and out_jpg.max() <= 255.0
    assert np.abs(out_jpg[..., 0] - smooth).mean() < 3.0

    with pytest.raises(tf.errors.InvalidArgumentError):
        P.decode_image(b"certainly not an image")


def test_eval_transform_central_square_and_batch(rng):
    wide = np.zeros((20, 40, 1), np.float32)
    wide[:, :10] = 255.0  # only outside the central 20x20 square
    out = P.preprocess_for_eval(wide, 10, "torch").numpy()
    assert out.shape == (10, 10, 3)
    np.testing.assert_allclose(P.denormalize(out, "torch").numpy(), 0.0, atol=1e-3)

    square = rng.uniform(0, 255, (3, 32, 32, 1)).astype(np.float32)
    batch = P.preprocess_for_eval(square, 16, "caffe").numpy()
    single = np.stack([P.preprocess_for_eval(im, 16, "caffe").numpy() for im in square])
    np.testing.assert_allclose(batch, single, atol=1e-4)
    np.testing.assert_allclose(batch, P.preprocess_for_eval(square, 16, "caffe").numpy(), atol=1e-4)  # deterministic
    same = P.preprocess_for_eval(square[0], 32, "torch").numpy()  # same size: resize is the identity
    np.testing.assert_allclose(P.denormalize(same, "torch").numpy()[..., 0], square[0, ..., 0], atol=1e-3)


def test_hist_equalize_spreads_levels_monotonically(rng):
    img = rng.normal(120, 6, (40, 50, 1)).clip(0, 255).astype(np.uint8)
    out = P.hist_equalize(tf.constant(img)).numpy()
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # a monotone lookup table
    flat = np.full((8, 8, 1), 77, np.uint8)
    np.testing.assert_array_equal(P.hist_equalize(tf.constant(flat)).numpy(), flat)


def test_clahe_raises_local_contrast_and_keeps_range(rng):
    img = rng.normal(100, 5, (64, 64, 1)).clip(0, 255).astype(np.uint8)
    img[:, 32:] += 60  # two regions of different brightness, each of low contrast
    out = P.clahe(tf.constant(img)).numpy()
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out[:, :32].std() > 2 * img[:, :32].std() and out[:, 32:].std() > 2 * img[:, 32:].std()
    as_float = P.equalize_image(tf.constant(img.astype(np.float32)), "clahe").numpy()
    assert as_float.dtype == np.float32 and 0 <= as_float.min() and as_float.max() <= 255
    np.testing.assert_allclose(as_float, out, atol=0.51)
    with pytest.raises(ConfigError):
        P.equalize_image(tf.constant(img), "gamma")


def test_augment_identity_flip_and_determinism(rng):
    x = rng.uniform(0, 255, (4, 32, 32, 1)).astype(np.float32)
    seed = tf.constant([3, 4], tf.int64)
    same = P.random_augment(x, seed, 32, max_rotation=0, crop_scale=(1, 1), flip=False).numpy()
    np.testing.assert_allclose(same, x, atol=1e-4)
    flipped = P.random_augment(x, seed, 32, max_rotation=0, crop_scale=(1, 1), flip=True).numpy()
    for a, b in zip(flipped, x):
        assert min(np.abs(a - b).max(), np.abs(a - b[:, ::-1]).max()) < 1e-4

    out = P.random_augment(x, seed, 24).numpy()
    assert out.shape == (4, 24, 24, 1) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 255.0
    np.testing.assert_allclose(out, P.random_augment(x, seed, 24).numpy(), atol=1e-4)  # same seed, same output
    assert not np.allclose(out, P.random_augment(x, tf.constant([5, 6], tf.int64), 24).numpy())
    with pytest.raises(ConfigError):
        P.random_augment(x, seed, 24, fill_mode="wrap")


def test_augment_transform_parameters_stay_in_bounds():
    h, w, s = 100, 80, 50
    t = P.augment_transforms(2000, h, w, s, tf.constant([1, 2]), max_rotation=10.0, crop_scale=(0.8, 1.0)).numpy()
    a0, a1, b0, b1 = t[:, 0], t[:, 1], t[:, 3], t[:, 4]
    scale = np.sqrt(np.abs(a0 * b1 - a1 * b0))  # crop side / output size
    side = scale * s
    assert side.min() >= 0.8 * min(h, w) - 1e-3 and side.max() <= min(h, w) + 1e-3
    theta = np.degrees(np.arctan2(-a1, b1))
    assert np.abs(theta).max() <= 10.0 + 1e-3 and np.abs(theta).max() > 9.0
    flips = np.sign(a0 * b1 - a1 * b0)  # a reflection has a negative determinant
    assert 0.4 < np.mean(flips < 0) < 0.6
    centre = np.stack([t[:, 0] + t[:, 1], t[:, 3] + t[:, 4]], 1) * (s - 1) / 2 + t[:, [2, 5]] + 0.5
    half = side / 2
    assert np.all(centre[:, 0] - half >= -1e-3) and np.all(centre[:, 0] + half <= w + 1e-3)
    assert np.all(centre[:, 1] - half >= -1e-3) and np.all(centre[:, 1] + half <= h + 1e-3)
    with pytest.raises(ConfigError):
        P.augment_transforms(1, h, w, s, tf.constant([1, 2]), crop_scale=(0.5, 1.2))


def test_model_input_from_gray_equals_rgb_path(rng):
    gray = rng.uniform(0, 255, (2, 6, 5, 1)).astype(np.float32)
    rgb = np.repeat(gray, 3, axis=-1)
    for mode in P.MODES:
        np.testing.assert_allclose(P.to_model_input(gray, mode).numpy(), P.normalize(rgb, mode).numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="RGB"):
        P.normalize(gray, "torch")


def _warp_numpy(images, transforms, size, mode):
    """Brute-force bilinear resampling: the image padded by NumPy (reflect about the edge = np.pad "symmetric",
    nearest = "edge", constant = zeros), then each output pixel interpolated from its 4 padded neighbours."""
    pad = {"reflect": "symmetric", "nearest": "edge", "constant": "constant"}[mode]
    b, h, w, c = images.shape
    p = max(h, w)
    out = np.zeros((b, size, size, c))
    for k in range(b):
        padded = np.pad(images[k].astype(np.float64), ((p, p), (p, p), (0, 0)), mode=pad)
        a0, a1, a2, b0, b1, b2 = transforms[k, :6].astype(np.float64)
        for yo in range(size):
            for xo in range(size):
                x, y = a0 * xo + a1 * yo + a2 + p, b0 * xo + b1 * yo + b2 + p
                if mode != "constant":  # beyond the padding: the edge of the padded image
                    x, y = min(max(x, 0), padded.shape[1] - 1), min(max(y, 0), padded.shape[0] - 1)
                x0, y0 = int(np.floor(x)), int(np.floor(y))
                fx, fy = x - x0, y - y0

                def at(yy, xx):
                    inside = 0 <= yy < padded.shape[0] and 0 <= xx < padded.shape[1]
                    return padded[yy, xx] if inside else 0.0

                out[k, yo, xo] = ((at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx) * (1 - fy)
                                  + (at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx) * fy)
    return out


@pytest.mark.parametrize("mode", ["reflect", "nearest", "constant"])
def test_warp_matches_brute_force_bilinear(rng, mode):
    """The pipeline's warp (XLA and plain TF) against NumPy on transforms that overshoot the edges: the paper's
    augmentation and wide rotations of small crops (reflect: every point augment_transforms can make lies within one
    mirror image of the edge)."""
    images = rng.integers(0, 256, (6, 20, 17, 1)).astype(np.uint8)
    t = np.concatenate([
        P.augment_transforms(3, 20, 17, 12, tf.constant([1, 2], tf.int64)).numpy(),
        P.augment_transforms(3, 20, 17, 12, tf.constant([3, 4], tf.int64), max_rotation=180.0,
                             crop_scale=(0.3, 1.0)).numpy()])
    want = _warp_numpy(images, t, 12, mode)
    for jit in (True, False):
        got = tf.function(lambda x, tt: P.warp_bilinear(x, tt, 12, mode), jit_compile=jit)(images, t).numpy()
        np.testing.assert_allclose(got, want, atol=0.02)
