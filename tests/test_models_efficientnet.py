"""efficientnetb2-lstm-mha: the backbone against keras.applications' EfficientNetB2, its ImageNet-file loading path,
the sequence head, a training step and the SavedModel export checked in a fresh process."""

import json
import os

import numpy as np
import pytest
import yaml
from weights_helpers import write_legacy_h5

import keras

from cxrkeras.errors import ConfigError
from cxrkeras.models import build_model, model_info, trainable_params

TINY = dict(input_shape=(32, 32, 3), width_multiplier=0.125)


def _randomise(model, rng):
    """Non-trivial weights everywhere (batch-norm statistics too) so that a wrong wiring shows."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
        elif layer.weights and not isinstance(layer, keras.layers.Normalization):
            layer.set_weights([rng.normal(0, 0.5 / np.sqrt(max(1, np.prod(w.shape[:-1]))), w.shape)
                               for w in layer.get_weights()])


def test_backbone_equals_keras_applications_through_its_imagenet_file_layout(tmp_path):
    """keras.applications' EfficientNetB2 (its own Rescaling + Normalization set to ImageNet mean/std) on raw pixels
    equals our backbone, loaded by name from a file in the ImageNet file's layout, on the Preprocessor's input."""
    from cxrkeras.data.normalize import to_model_input

    reference = keras.applications.EfficientNetB2(include_top=False, weights=None, input_shape=(64, 64, 3))
    rng = np.random.default_rng(0)
    _randomise(reference, rng)
    norm = reference.get_layer("normalization")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    norm.set_weights([w for w in (mean, std ** 2, np.array(0))][:len(norm.get_weights())])
    path = str(tmp_path / "efficientnetb2_notop.h5")
    write_legacy_h5(reference, path)

    model = build_model("efficientnetb2-lstm-mha", num_classes=2, input_shape=(64, 64, 3), weights=path)
    assert "normalization" in model.weights_report  # the file's input layer is left unused: no double normalisation
    features = keras.Model(model.inputs, model.get_layer(model_info(model)["feature_layer"]).output)
    pixels = rng.uniform(0, 255, size=(2, 64, 64, 3)).astype("float32")
    want = np.asarray(reference(pixels, training=False))
    got = np.asarray(features(to_model_input(pixels, "torch"), training=False))
    assert got.shape == want.shape == (2, 2, 2, 1408) and np.std(want) > 0.05
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    backbone = sum(int(np.prod(w.shape)) for w in reference.trainable_weights)
    head = 4 * (1408 + 256 + 1) * 256 + 4 * (256 * 256 + 256) + 256 * 2 + 2  # LSTM, MHA (q, k, v, out), Dense
    assert trainable_params(model) == backbone + head
    info = model_info(model)
    assert info["preprocessing"] == "torch" and info["build_args"]["bn_epsilon"] == pytest.approx(1e-3)


def test_sequence_head_options_and_errors():
    model = build_model("efficientnetb2-lstm-mha", lstm_units=16, attention_heads=2, attention_key_dim=8, **TINY)
    mha = model.get_layer("seq_mha")
    assert (mha.num_heads, mha.key_dim, model.get_layer("seq_lstm").units) == (2, 8, 16)
    assert model.get_layer("seq_tokens").output.shape[1:] == (1, round_to_top(0.125))
    assert model_info(model)["feature_layer"] == "top_activation"
    assert {"lstm_units": 16, "attention_heads": 2, "attention_key_dim": 8}.items() <= model_info(
        model)["build_args"].items()
    with pytest.raises(ConfigError, match="lstm_units: resnet50 has no LSTM"):
        build_model("resnet50", lstm_units=8, **TINY)
    with pytest.raises(ConfigError, match=r"attention_heads must be an integer in \[1, 64\], got 0"):
        build_model("efficientnetb2-lstm-mha", attention_heads=0, **TINY)
    with pytest.raises(ConfigError, match="LKA blocks are not placed"):
        build_model("efficientnetb2-lstm-mha", lka_blocks="after", **TINY)


def round_to_top(width_multiplier):
    from cxrkeras.models.efficientnet import B2, round_filters

    return round_filters(1280, B2["width"] * width_multiplier)


@pytest.mark.timeout(400)  # the export's fresh-process check traces the 23-block graph again
def test_trains_a_step_and_serves_through_the_savedmodel(tiny_records, tmp_path):
    """One optimiser step changes the backbone and the head; the exported SavedModel equals Keras in a fresh
    process (export's own verification)."""
    from cxrkeras.export.savedmodel import export

    model = build_model("efficientnetb2-lstm-mha", num_classes=14, lstm_units=8, attention_heads=2,
                        attention_key_dim=4, input_shape=(64, 64, 3), width_multiplier=0.125)  # 2x2 = 4 tokens
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", run_eagerly=True)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 64, 64, 3)).astype("float32"), rng.integers(0, 2, (4, 14)).astype("float32")
    before = {n: np.array(model.get_layer(n).weights[0]) for n in ("stem_conv", "seq_lstm", "seq_mha")}
    assert np.isfinite(model.train_on_batch(x, y))
    for name, value in before.items():
        assert not np.allclose(value, np.array(model.get_layer(name).weights[0])), name
    stage = tmp_path / "runs" / "eff" / "stage2"
    stage.mkdir(parents=True)
    model.save(str(stage / "best.keras"))
    (stage / "config.yaml").write_text(yaml.safe_dump({"data": {"records": tiny_records, "image_size": 64,
                                                                "equalize": None},
                                                       "model": {"variant": "efficientnetb2-lstm-mha"}}))
    (stage / "run_info.json").write_text(json.dumps({"records": tiny_records, "image_size": 64}))
    result = export(str(tmp_path / "runs" / "eff"), str(tmp_path / "exports"), records_dir=tiny_records,
                    log=lambda *_: None)
    check = result["verification"]
    assert os.path.isdir(result["path"]) and check["max_abs_diff_images"] <= 1e-5


def test_imagenet_file_name_offline_and_the_added_layers(offline_downloads):
    """weights='imagenet' asks for keras.applications' efficientnetb2_notop.h5 (named with its URL when offline);
    the sequence head is an added layer (kept trainable while the backbone is frozen)."""
    from cxrkeras.models.parts import added_layers

    with pytest.raises(ConfigError, match="https://storage.googleapis.com/keras-applications/efficientnetb2_notop.h5"
                                          ".*weights='/path/to/efficientnetb2_notop.h5'"):
        build_model("efficientnetb2-lstm-mha", input_shape=(64, 64, 3), weights="imagenet")
    with pytest.raises(ConfigError, match="full-width"):
        build_model("efficientnetb2-lstm-mha", weights="imagenet", **TINY)
    model = build_model("efficientnetb2-lstm-mha", **TINY)
    assert added_layers(model) == ["seq_lstm", "seq_mha", "predictions"]
    from cxrkeras.training.optim import layer_groups

    early, late, added = ([layer.name for layer in g] for g in layer_groups(model))
    assert early[0] == "stem_conv" and late[0] == "block4a_expand_conv" and added == added_layers(model)


def test_models_table_prints_the_measured_ratio_to_resnet50():
    from cxrkeras.models.summary import format_table, variant_rows

    rows = variant_rows(["efficientnetb2-lstm-mha"], image_size=64)  # brings ResNet-50 in beside it
    assert [r["variant"] for r in rows] == ["efficientnetb2-lstm-mha", "resnet50"]
    ratio = rows[0]["params"] / rows[1]["params"]
    assert rows[1]["params"] == 23_534_592 + 2048 * 14 + 14  # keras.applications' ResNet50 notop + the head
    assert f"= {ratio:.3f} ({100 * (1 - ratio):.1f}% fewer)" in format_table(rows, 64)
