"""Feature Pyramid Sum head: every backbone, the prediction against NumPy (sigmoid of the summed per-level logits),
the training loss against a hand-computed sum of per-level BCE / focal losses, Grad-CAM of the summed score."""

import os

import keras
import numpy as np
import pytest

from cxrkeras.errors import ConfigError
from cxrkeras.models import build_model, list_variants, model_info, trainable_params

THIN = {"densenet121": dict(blocks=[1, 1, 1, 1], width_multiplier=0.25), "vgg16": dict(width_multiplier=0.125),
        "resnet50": dict(width_multiplier=0.125), "efficientnetb2": dict(width_multiplier=0.25)}


def _thin(variant, **kw):
    from cxrkeras.models import get_variant

    return build_model(variant, num_classes=3, input_shape=(48, 48, 3), dropout=0.0,
                       **THIN[get_variant(variant).backbone], **kw)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _level_source(model, level):
    """The layer whose output pyramid level `level` pools, found independently of cxrkeras.models.fpsm."""
    names = [layer.name for layer in model.layers]
    backbone = model_info(model)["variant"].split("-")[0]
    if level == 4:  # the backbone's final features: what the avg-pool of the linear head would see
        return model.get_layer("fpsm4_pool").input
    if backbone == "vgg16":
        return model.get_layer(f"block{level + 1}_pool").output
    lka = f"conv{level + 1}_lka"
    if lka in names:
        return model.get_layer(lka).output
    ends = [n for n in names if n.startswith(f"conv{level + 1}_block") and n.endswith(("_concat", "_out"))]
    return model.get_layer(ends[-1]).output


# the gated DenseNets and the EfficientNet sequence model have heads of their own (refused below)
@pytest.mark.parametrize("variant", [v for v in list_variants() if "-att-" not in v and "lstm" not in v])
def test_fpsm_prediction_is_sigmoid_of_summed_level_logits(variant):
    model = _thin(variant, head="fpsm", head_stages="4+3+2+1")
    head = model.get_layer("predictions")
    assert head.levels == [4, 3, 2, 1]
    x = np.random.default_rng(0).normal(size=(3, 48, 48, 3)).astype("float32")
    probe = keras.Model(model.inputs, [_level_source(model, level) for level in (4, 3, 2, 1)])
    feats = [np.asarray(f, dtype=np.float64) for f in probe(x, training=False)]
    weights = head.get_weights()  # kernel_4..kernel_1 then bias_4..bias_1
    kernels, biases = weights[:4], weights[4:]
    z = sum(f.mean(axis=(1, 2)) @ k + b for f, k, b in zip(feats, kernels, biases))
    np.testing.assert_allclose(np.asarray(model(x, training=False)), _sigmoid(z), atol=1e-5)
    stacked = np.asarray(model(x, training=True))  # inside fit: the per-level logits
    assert stacked.shape == (3, 4, 3)
    # trainable parameters: the backbone's plus sum_s (C_s * n + n)
    linear = _thin(variant)
    widths = [int(f.shape[-1]) for f in feats]
    assert trainable_params(model) == trainable_params(linear) - (widths[0] * 3 + 3) + sum(w * 3 + 3 for w in widths)


def test_fpsm_levels_options_and_refusals():
    model = _thin("densenet121-lka-last2", head="fpsm")
    assert model.get_layer("predictions").levels == [4, 3, 2]  # the default 4+3+2
    assert model_info(model)["build_args"]["head_stages"] == "4+3+2"
    concat = _thin("densenet121-lka-last2", head="fpsm", head_merge="concat")
    assert type(concat.get_layer("predictions")).__name__ == "MultiLabelDense"
    assert concat.get_layer("predictions").kernel.shape[0] == sum(int(concat.get_layer(f"fpsm{k}_pool").output.shape[-1])
                                                                  for k in (4, 3, 2))
    for bad in ("5+4", "4+4", "four", ""):
        with pytest.raises(ConfigError, match="head_stages"):
            _thin("vgg16-bn", head="fpsm", head_stages=bad)
    refused = [("densenet121-att-a", {"head": "fpsm"}, "attention gates"),
               ("efficientnetb2-lstm-mha", {"head": "fpsm"}, "reads the last feature map as a sequence"),
               ("densenet121", {"head": "fpsm", "patient_features": True}, "patient features"),
               ("densenet121", {"head": "pyramid"}, "unknown head"),
               ("densenet121", {"head_stages": "4+3"}, "head: fpsm only")]
    for variant, options, match in refused:
        with pytest.raises(ConfigError, match=match):
            _thin(variant, **options)


def _bce(y, z):
    p = _sigmoid(z)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()


def _focal(y, z, gamma=2.0):  # Lin et al. 2017 without class balancing (Keras' default): -(1 - p_t)^g log p_t
    p = _sigmoid(z)
    pt = np.where(y == 1, p, 1 - p)
    return (-((1 - pt) ** gamma) * np.log(pt)).mean()


@pytest.mark.parametrize("stage, hand", [(1, _bce), (2, _focal)], ids=["stage1-bce", "stage2-focal"])
def test_fpsm_loss_is_sum_of_level_losses(stage, hand):
    from cxrkeras.config import Config
    from cxrkeras.losses import PyramidLoss, make_loss

    config = Config()
    config.model.overrides = {"head": "fpsm", "head_stages": "4+3+2"}
    loss = make_loss(config, stage)
    assert isinstance(loss, PyramidLoss) and loss.levels == 3
    rng = np.random.default_rng(stage)
    y = (rng.random((5, 4)) < 0.4).astype("float32")
    z = rng.normal(scale=2.0, size=(5, 3, 4)).astype("float32")
    expected = sum(hand(y, z[:, s].astype(np.float64)) for s in range(3))
    assert float(loss(y, z)) == pytest.approx(expected, rel=1e-5)
    # the probabilities of the summed prediction (what validation scores): levels x the loss of that prediction
    p = _sigmoid(z.sum(axis=1).astype(np.float64))
    assert float(loss(y, p.astype("float32"))) == pytest.approx(3 * hand(y, np.log(p / (1 - p))), rel=1e-4)
    assert make_loss(Config(), stage).__class__.__name__ != "PyramidLoss"  # the linear head: one loss
    revived = PyramidLoss.from_config(loss.get_config())
    assert float(revived(y, z)) == pytest.approx(expected, rel=1e-5)


def test_fpsm_training_step_loss_equals_hand_computation():
    """Through compile/fit: the loss Keras reports for a batch is the hand-computed sum of per-level BCEs of the
    model's per-level logits (dropout 0; batch norm in training mode on both sides)."""
    from cxrkeras.config import Config
    from cxrkeras.losses import make_loss

    config = Config()
    config.model.overrides = {"head": "fpsm", "head_stages": "4+3+2"}
    model = _thin("densenet121-lka-last2", head="fpsm")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=make_loss(config, 1))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 48, 48, 3)).astype("float32")
    y = (rng.random((4, 3)) < 0.5).astype("float32")
    z = np.asarray(model(x, training=True), dtype=np.float64)
    expected = sum(_bce(y, z[:, s]) for s in range(3))
    assert float(model.train_on_batch(x, y)) == pytest.approx(expected, rel=1e-4)


def test_fpsm_save_load_and_gradcam_explains_the_summed_score(tmp_path):
    from cxrkeras.explain.engine import HeatmapEngine
    from cxrkeras.runs import load_keras_model

    model = _thin("vgg16-lka-last3", head="fpsm", head_stages="4+3+2+1")
    path = os.path.join(tmp_path, "fpsm.keras")
    model.save(path)
    loaded = load_keras_model(path)
    assert model_info(loaded)["build_args"]["head"] == "fpsm"
    x = np.random.default_rng(1).normal(size=(2, 48, 48, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)
    engine = HeatmapEngine(loaded, "block3_lka")  # level 2's LKA: only levels 4, 3 and 2 depend on it
    maps, probs = engine.explain(x, [0, 2])
    np.testing.assert_allclose(probs, np.asarray(loaded(x)), atol=1e-5)  # the score is the summed logit
    assert maps.shape == (2, 2, 12, 12) and np.isfinite(maps).all()
    # the gradient of the summed logit equals the sum of each level's logit gradient (a brute-force check)
    import tensorflow as tf

    head = loaded.get_layer("predictions")
    feature = loaded.get_layer("block3_lka").output
    sub = keras.Model(loaded.inputs, [feature, head.input])
    with tf.GradientTape(persistent=True) as tape:
        f, h = sub(x, training=False)
        per_level = [tf.reduce_sum(head.stage_logits(h)[:, s, 0]) for s in range(4)]
        total = tf.reduce_sum(head.logits(h)[:, 0])
    g_total = tape.gradient(total, f).numpy()
    g_levels = [tape.gradient(t, f, unconnected_gradients="zero").numpy() for t in per_level]
    np.testing.assert_allclose(g_total, sum(g_levels), atol=1e-6)
    assert all(np.abs(g).max() > 0 for g in g_levels[:3]) and np.abs(g_levels[3]).max() == 0  # level 1 is below


@pytest.mark.timeout(300)
def test_fpsm_run_trains_both_stages_with_the_summed_loss(tiny_records, tmp_path):
    """train() with head fpsm: stage 1 (BCE) and stage 2 (focal) run; the validation loss in history.csv is the
    number of levels x the stage's loss of the summed prediction over the validation split, by hand."""
    import csv

    from cxrkeras.config import load_config
    from cxrkeras.evaluation.evaluate import predict_split
    from cxrkeras.runs import load_source
    from cxrkeras.training.trainer import train

    config = load_config(overrides={
        "data": {"records": tiny_records, "image_size": 32, "batch_size": 4, "shuffle_buffer": 64},
        "model": {"variant": "densenet121-lka-last2", "weights": None,
                  "overrides": {"blocks": [1, 1, 1, 1], "width_multiplier": 0.125, "head": "fpsm"}},
        "train": {"epochs": 1, "steps_per_epoch": 2, "verbose": 0}, "run": {"root": str(tmp_path), "name": "f"}})
    for stage, hand in ((1, _bce), (2, _focal)):
        result = train(config, stage, log=lambda *_: None)
        source = load_source(os.path.join(result.stage_dir, "last.keras"))
        assert model_info(source.model)["build_args"]["head_stages"] == "4+3+2"
        probs, y, _, _ = predict_split(source, tiny_records, "val")
        if stage == 1:  # stage 1 reads the images with a finding
            probs, y = probs[y.sum(axis=1) > 0], y[y.sum(axis=1) > 0]
        with open(os.path.join(result.stage_dir, "history.csv"), newline="") as f:
            row = list(csv.DictReader(f))[-1]
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        assert float(row["val_loss"]) == pytest.approx(3 * hand(y, np.log(p / (1 - p))), rel=2e-3)
        assert float(row["loss"]) > 0
