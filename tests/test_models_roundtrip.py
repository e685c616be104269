"""Models: .keras round trip of every variant, mixed precision, and weight loading from local files."""

import os

import numpy as np
import pytest

import keras
from weights_helpers import write_legacy_h5

from cxrkeras.errors import ConfigError
from cxrkeras.models import build_model, list_variants, model_info

TINY = dict(input_shape=(32, 32, 3), width_multiplier=0.125)


def tiny(variant, **kwargs):
    extra = dict(blocks=(1, 2, 2, 1)) if variant.startswith("densenet") else {}
    return build_model(variant, **{**TINY, **extra, **kwargs})


def _images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, size=(n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("variant", list_variants())
def test_keras_round_trip_identical_outputs(variant, tmp_path):
    model = tiny(variant, num_classes=3, label_names=["x", "y", "z"])
    x = _images()
    before = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, atol=1e-6)  # same weights, separate calls
    assert model_info(loaded) == model_info(model)
    assert model_info(loaded)["labels"] == ["x", "y", "z"]
    loaded.get_layer(model_info(loaded)["feature_layer"])  # the Grad-CAM layer exists after reload


def test_lka_van_form_round_trip(tmp_path):
    model = tiny("vgg16-lka-last3", lka_form="van")
    path = os.path.join(tmp_path, "van.keras")
    model.save(path)
    x = _images()
    np.testing.assert_allclose(keras.saving.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


def test_mixed_float16_forward_and_train_step():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        # Eager steps run the same train_step and ops; tracing a float16 graph step costs ~20 s on 2 loaded cores.
        for variant in ("vgg16-lka-last3", "densenet121-lka-full"):
            model = tiny(variant)
            lka = model.get_layer(model_info(model)["feature_layer"])
            assert lka.compute_dtype == "float16" and lka.conv1.compute_dtype == "float16"
            assert lka.conv1.kernel.dtype == "float32"  # variables stay float32
            out = model(_images())
            assert out.dtype == "float32" and out.shape == (2, 14)
            # A small initial loss scale: the default 2**15 overflows on the first step, which is then skipped.
            optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), initial_scale=2.0**4)
            model.compile(optimizer=optimizer, loss="binary_crossentropy", run_eagerly=True)
            y = np.random.default_rng(0).integers(0, 2, size=(2, 14)).astype("float32")
            before = [np.array(w) for w in model.trainable_weights]
            loss = model.train_on_batch(_images(), y)
            assert np.isfinite(loss)
            assert any(not np.array_equal(b, np.array(w)) for b, w in zip(before, model.trainable_weights))
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.config.dtype_policy().name == previous.name


def test_weights_from_keras_file_by_layer_name(tmp_path):
    source = tiny("densenet121", num_classes=14)
    path = os.path.join(tmp_path, "backbone.keras")
    source.save(path)
    # Same backbone, new LKA block: backbone layers come from the file, the LKA keeps its initial values.
    model = tiny("densenet121-lka-last2", num_classes=14, weights=path)
    for name in ("conv1_conv", "conv4_block2_2_conv", "bn", "predictions"):
        for a, b in zip(model.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    head_mismatch = r"1 layer\(s\) failed: predictions: model \[\(\d+, 3\), \(3,\)\] vs file \[\(\d+, 14\)"
    with pytest.raises(ConfigError, match=head_mismatch):
        tiny("densenet121", num_classes=3, weights=path)
    with pytest.raises(ConfigError, match="no layer of weights file .* fits the model vgg16_plain: it was made for"):
        tiny("vgg16-plain", weights=path)


def test_weights_from_legacy_h5_as_keras_applications_writes_it(tmp_path):
    """A Keras-2 style .h5 (layer_names / weight_names attributes: the format of the ImageNet files)."""
    source = tiny("vgg16-plain")
    path = write_legacy_h5(source, os.path.join(tmp_path, "vgg_notop.h5"), prefix="block")
    model = tiny("vgg16-plain-lka-last3", weights=path)
    np.testing.assert_array_equal(model.get_layer("block4_conv2").get_weights()[0],
                                  source.get_layer("block4_conv2").get_weights()[0])
    with pytest.raises(ConfigError, match="13 layer\\(s\\) share a name but not the shapes: block1_conv1: model"):
        tiny("vgg16-plain", weights=path, width_multiplier=0.25)


def test_weights_h5_same_architecture_and_mismatch(tmp_path):
    source = tiny("vgg16-lka-after")
    path = os.path.join(tmp_path, "w.weights.h5")
    source.save_weights(path)
    model = tiny("vgg16-lka-after", weights=path)
    np.testing.assert_allclose(model.predict(_images(), verbose=0), source.predict(_images(), verbose=0), atol=1e-6)
    with pytest.raises(ConfigError, match=r"does not match .*predictions: model"):
        tiny("vgg16-lka-after", weights=path, num_classes=5)


def test_imagenet_offline_error_names_url_and_local_path(offline_downloads):
    with pytest.raises(ConfigError, match="could not download ImageNet weights for densenet121 from https://.*"
                                          "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5.*weights='/path"):
        build_model("densenet121", input_shape=(32, 32, 3), weights="imagenet")
    with pytest.raises(ConfigError, match="full-width"):
        tiny("vgg16-plain", weights="imagenet")


def test_densenet_layer_names_and_shapes_match_keras_applications():
    """Loading by name needs keras.applications' names and shapes for every weighted layer (ImageNet files)."""
    reference = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(64, 64, 3))
    model = build_model("densenet121-lka-full", input_shape=(64, 64, 3))
    ours = {l.name: [tuple(w.shape) for w in l.weights] for l in model.layers if l.weights}
    theirs = {l.name: [tuple(w.shape) for w in l.weights] for l in reference.layers if l.weights}
    assert {name: ours.get(name) for name in theirs} == theirs
    assert sorted(set(ours) - set(theirs)) == ["conv2_lka", "conv3_lka", "conv4_lka", "conv5_lka", "predictions"]


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_keras_applications_vgg16_file_loads_by_name(tmp_path):
    """A keras.applications VGG16 saved as legacy HDF5 (the ImageNet files' layout) loads completely."""
    from cxrkeras.models import get_variant
    from cxrkeras.models.weights import load_weights

    variant = "vgg16-plain-lka-full"
    reference = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = os.path.join(tmp_path, "notop.h5")
    reference.save(path)
    model = build_model(variant, input_shape=(32, 32, 3))
    report = load_weights(model, path, get_variant(variant))
    with_weights = [l.name for l in reference.layers if l.weights]
    assert sorted(report["loaded"]) == sorted(with_weights) and report["unused"] == []
    assert report["missing"] == [f"block{b}_lka" for b in range(1, 6)] + ["predictions"]
    for name in with_weights:
        for a, b in zip(model.get_layer(name).get_weights(), reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
