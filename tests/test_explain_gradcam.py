"""Grad-CAM: a toy model trained to find a bright square points at it; batching, ranges, every variant, bad input."""

import os
import warnings

import numpy as np
import pytest

import keras

from cxrkeras.errors import ConfigError
from cxrkeras.explain.gradcam import GradCAM, HeatmapEngine, compute_heatmaps
from cxrkeras.models import build_model, list_variants, model_info


def _toy_data(rng, n, both=False):
    """Noise images; class 0 = an 8x8 bright square in the top-left corner, class 1 = a bright bar bottom-right."""
    x = rng.uniform(0.0, 0.3, size=(n, 32, 32, 1)).astype("float32")
    y = np.zeros((n, 2), "float32")
    for i in range(n):
        if both or rng.random() < 0.5:
            r, c = rng.integers(0, 4, 2)
            x[i, r:r + 8, c:c + 8] = 1.0
            y[i, 0] = 1
        if both or rng.random() < 0.5:
            r, c = rng.integers(24, 30), rng.integers(18, 22)
            x[i, r:r + 2, c:c + 10] = 1.0
            y[i, 1] = 1
    return x, y


@pytest.fixture(scope="module")
def toy():
    """(trained model, held-out images with both patterns, their labels)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = _toy_data(rng, 512)
    inp = keras.Input((32, 32, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.MaxPooling2D(name="p1")(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(2, activation="sigmoid", name="out")(h)
    model = keras.Model(inp, out, name="toy")
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy", metrics=["binary_accuracy"])
    model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    xt, yt = _toy_data(rng, 64)
    _, acc = model.evaluate(xt, yt, verbose=0)
    assert acc > 0.95, f"toy model did not learn the task (accuracy {acc:.3f}); the Grad-CAM checks would mean nothing"
    xb, yb = _toy_data(rng, 12, both=True)
    return model, xb, yb


def test_gradcam_points_at_the_square(toy):
    model, x, _ = toy
    for method in ("gradcam", "gradcam++"):
        maps = compute_heatmaps(model, x, 0, method=method)  # default layer: last 4-D layer, "features" (16x16)
        assert maps.shape == (len(x), 16, 16)
        for heat in maps:
            r, c = np.unravel_index(np.argmax(heat), heat.shape)
            assert r < 8 and c < 8, f"{method}: maximum at {(r, c)}, not in the top-left quadrant"
            # most of the map's mass sits in the corner that holds the square
            assert heat[:8, :8].sum() > heat[8:, 8:].sum()


def test_heatmaps_range_and_batch_equals_single(toy):
    model, x, _ = toy
    for method in ("gradcam", "gradcam++"):
        engine = HeatmapEngine(model, "features", method)
        batch, probs = engine(x, [0, 1], batch_size=5)  # uneven batches on purpose
        assert batch.shape == (len(x), 2, 16, 16) and probs.shape == (len(x), 2)
        assert np.isfinite(batch).all() and batch.min() >= 0.0 and batch.max() <= 1.0
        np.testing.assert_allclose(batch.max(axis=(2, 3)), 1.0, atol=1e-6)
        single = np.concatenate([engine(x[i:i + 1], [0, 1])[0] for i in range(len(x))])
        np.testing.assert_allclose(batch, single, atol=1e-5)
        # several classes in one pass equal one class at a time
        np.testing.assert_allclose(batch[:, 1], engine(x, [1])[0][:, 0], atol=1e-5)
        np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-5)


def test_matches_reference_gradcam(toy):
    """Against the textbook formula: ReLU(sum_c mean_ij(dlogit/dA) A), normalised to max 1."""
    import tensorflow as tf

    model, x, _ = toy
    grad_model = keras.Model(model.inputs[0], [model.get_layer("features").output, model.get_layer("gap").output])
    dense = model.get_layer("out")
    with tf.GradientTape() as tape:
        feats, pooled = grad_model(x)
        logit = tf.reduce_sum(tf.matmul(pooled, dense.kernel)[:, 1] + dense.bias[1])
    grads = tape.gradient(logit, feats)
    ref = tf.nn.relu(tf.reduce_sum(feats * tf.reduce_mean(grads, axis=(1, 2), keepdims=True), -1)).numpy()
    ref = ref / np.maximum(ref.max(axis=(1, 2), keepdims=True), 1e-12)
    np.testing.assert_allclose(compute_heatmaps(model, x, 1, layer_name="features"), ref, atol=1e-5)


def test_explain_grid_and_save(toy, tmp_path):
    model, x, _ = toy
    explainer = GradCAM()
    grid = explainer.explain((x[:5], None), model, class_index=0)
    assert grid.dtype == np.uint8 and grid.shape == (64, 96, 3)  # 5 tiles -> 2 rows x 3 columns of 32 px
    assert grid[32:, 64:].max() == 0  # the empty sixth cell stays black
    path = GradCAM.save(grid, str(tmp_path / "out"), "grid")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(ConfigError, match="one class per grid"):
        explainer.explain((x[:2], None), model, class_index=[0, 1])


def test_bad_layer_and_class(toy):
    model, x, _ = toy
    with pytest.raises(ConfigError, match=r"'nope' is not in model.*features, c2, p1, c1"):
        compute_heatmaps(model, x, 0, layer_name="nope")
    with pytest.raises(ConfigError, match="no spatial dimensions.*features"):
        compute_heatmaps(model, x, 0, layer_name="gap")
    with pytest.raises(ConfigError, match="out of range"):
        compute_heatmaps(model, x, 2)
    with pytest.raises(ConfigError, match="records no label names"):
        compute_heatmaps(model, x, "Atelectasis")
    with pytest.raises(ConfigError, match="neither an output index nor a label name"):
        compute_heatmaps(model, x, 1.5)
    with pytest.raises(ConfigError, match="no class to explain"):
        compute_heatmaps(model, x, [])
    with pytest.raises(ConfigError, match="method"):
        compute_heatmaps(model, x, 0, method="cam")
    with pytest.raises(ConfigError, match="batch"):
        compute_heatmaps(model, x[0], 0)
    # NumPy class indices work like Python ones (two separate computations: equal up to float rounding)
    np.testing.assert_allclose(compute_heatmaps(model, x[:2], np.array([1, 0]))[:, 0],
                               compute_heatmaps(model, x[:2], np.int64(1)), atol=1e-5)


def test_zero_gradient_gives_zero_map_and_warning():
    inp = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(3, activation="sigmoid", kernel_initializer="zeros", name="out")(h)
    model = keras.Model(inp, out)
    x = np.random.default_rng(1).random((3, 16, 16, 1)).astype("float32")
    for method in ("gradcam", "gradcam++"):
        with pytest.warns(UserWarning, match="gradient .* is all zero"):
            maps = compute_heatmaps(model, x, [0, 2], method=method)
        assert maps.shape == (3, 2, 16, 16) and np.isfinite(maps).all() and not maps.any()


def test_model_without_spatial_layers():
    inp = keras.Input((8,))
    model = keras.Model(inp, keras.layers.Dense(2, activation="sigmoid")(inp))
    with pytest.raises(ConfigError, match="no layer with a 4-D output"):
        compute_heatmaps(model, np.zeros((1, 8), "float32"), 0)


def _thin(variant):
    kw = dict(width_multiplier=0.125)
    if variant.startswith("densenet"):
        kw["blocks"] = (1, 1, 1, 1)
    return kw


VARIANTS = list_variants()
_X64 = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcam_of_every_variant(variant):
    """Each registered variant: the engine finds the recorded feature layer, maps are finite in [0, 1] (one class:
    the plain gradient path; two for the first variant of each backbone: the batch_jacobian path)."""
    model = build_model(variant, input_shape=(64, 64, 3), **_thin(variant))
    info = model_info(model)
    classes = [0, 13] if variant in ("densenet121", "vgg16-bn") else [13]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model may have no positive evidence for a class
        engine = HeatmapEngine(model)
        maps, probs = engine(_X64, classes)
    assert engine.layer_name == info["feature_layer"]
    assert maps.shape[:2] == (2, len(classes)) and maps.ndim == 4 and np.isfinite(maps).all()
    assert 0.0 <= maps.min() and maps.max() <= 1.0 and probs.shape == (2, 14)
    np.testing.assert_allclose(probs, model.predict(_X64, verbose=0), atol=1e-5)


def test_class_names_and_heatmaps_after_a_keras_round_trip(tmp_path):
    from cxrkeras.explain.target import resolve_classes

    model = build_model("densenet121-lka-after", input_shape=(64, 64, 3), **_thin("densenet121"))
    assert resolve_classes(model, ["Atelectasis", "Infiltrate", 13], 14) == ([0, 3, 13], False)
    with pytest.raises(ConfigError, match="'Lung' is not one of the model's labels"):
        compute_heatmaps(model, _X64, "Lung")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = compute_heatmaps(model, _X64, ["Atelectasis", "Hernia"])
        path = str(tmp_path / "m.keras")
        model.save(path)
        again = compute_heatmaps(keras.saving.load_model(path, compile=False), _X64, ["Atelectasis", "Hernia"])
    assert maps.shape[:2] == (2, 2)
    np.testing.assert_allclose(again, maps, atol=1e-5)


def test_callback_writes_images_to_tensorboard(toy, tmp_path):
    import tensorflow as tf

    from cxrkeras.explain.callback import GradCAMCallback

    model, x, y = toy
    logdir = str(tmp_path / "tb")
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.compile(keras.optimizers.SGD(1e-4), "binary_crossentropy")
    callback = GradCAMCallback((x[:4], None), [0, 1], logdir, every=1)
    top1 = GradCAMCallback(tf.data.Dataset.from_tensor_slices((x, y)).batch(3), None, str(tmp_path / "tb1"),
                           max_images=4)
    clone.fit(x, y, epochs=2, batch_size=6, verbose=0, callbacks=[callback, top1])

    def read(folder):
        out = []
        for name in os.listdir(folder):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
                out += [(event.step, v.tag, tf.make_ndarray(v.tensor)) for v in event.summary.value]
        return out

    events = read(logdir)
    assert {tag for _, tag, _ in events} == {"gradcam/class_0", "gradcam/class_1"}
    assert {step for step, _, _ in events} == {0, 1}
    for _, _, tensor in events:
        assert tensor[:2].tolist() == [b"64", b"64"]  # width, height of a 2x2 grid of 32 px tiles
    top1 = read(str(tmp_path / "tb1"))
    assert top1 and all(tag.startswith("gradcam/top1/class_") for _, tag, _ in top1)
    with pytest.raises(ConfigError, match="out of range"):
        bad = GradCAMCallback((x[:2], None), 5, str(tmp_path / "bad"))
        clone.fit(x[:4], y[:4], epochs=1, verbose=0, callbacks=[bad])
