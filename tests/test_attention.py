"""Attention-gated DenseNet-121 (att-A / att-B) and the ResNet-50 baseline: the study's exact parameter counts
(computed here by hand), a plain-PyTorch reference, attention weights, .keras round trips, LKA placements,
Grad-CAM, and ResNet-50 against keras.applications (layer names, weights by name)."""

import os
import warnings

import keras
import numpy as np
import pytest
import torch
from torch_reference import AttentionDenseNet, randomize

from cxrkeras.errors import ConfigError
from cxrkeras.models import build_model, get_variant, lka_param_count, model_info, trainable_params
from cxrkeras.models.attention import GATES, attention_maps

STUDY = {"densenet121": 6_969_231, "densenet121-att-a": 7_920_527, "densenet121-att-b": 6_971_279}  # Table 2
THIN = dict(width_multiplier=0.125, blocks=(1, 1, 1, 1))


def densenet121_backbone(growth=32, stem=64, blocks=(6, 12, 24, 16)):
    """(trainable parameters of DenseNet-121's features, channels of L1..L3, channels of g), by hand: conv0 7x7,
    per dense layer BN(c) + 1x1 conv c->4k + BN(4k) + 3x3 conv 4k->k, per transition BN(c) + 1x1 conv c->c/2,
    norm5; a BN has 2 trainable values per channel, no conv has a bias."""
    params, c, local = 3 * 7 * 7 * stem + 2 * stem, stem, []
    for b, layers in enumerate(blocks, start=1):
        for _ in range(layers):
            params += 2 * c + c * 4 * growth + 2 * 4 * growth + 4 * growth * 9 * growth
            c += growth
        if b < len(blocks):
            params += 2 * c + c * (c // 2)
            c //= 2
            local.append(c)
    return params + 2 * c, local, c


def study_formula(variant, classes=15):
    backbone, local, g = densenet121_backbone()
    if variant == "densenet121":
        return backbone + g * classes + classes
    if variant == "densenet121-att-a":  # projections C x G, u of G per scale; classifier over 3 G
        return backbone + sum(c * g + g for c in local) + 3 * g * classes + classes
    return backbone + sum(c + g for c in local) + sum(local) * classes + classes  # att-B: u of C + G


def test_the_hand_count_is_densenet121():
    backbone, local, g = densenet121_backbone()
    assert (backbone, local, g) == (6_953_856, [128, 256, 512], 1024)  # keras.applications' trainable count


@pytest.mark.parametrize("variant", list(STUDY))
def test_study_parameter_counts(variant):
    model = build_model(variant, num_classes=15)  # built at 224, never run
    assert study_formula(variant) == STUDY[variant] == trainable_params(model) == get_variant(variant).study_params


def test_lka_placements_combine_with_the_gates():
    """LKA blocks add exactly their parameters; the gates' inputs follow the placement; other backbones refuse."""
    base = trainable_params(build_model("densenet121-att-b", num_classes=15))
    dims = {3: 1024, 4: 1024, "after": 1024, 1: 256}  # channels after dense blocks 1, 3, 4 and after norm5
    for placement, added in (("last2", [3, 4]), ([1, "after"], [1, "after"])):
        model = build_model("densenet121-att-b", num_classes=15, lka_blocks=placement)
        assert trainable_params(model) == base + sum(lka_param_count(dims[b]) for b in added)
        assert model_info(model)["feature_layer"] == "pool4_pool"
    lka = build_model("densenet121-lka-last2", attention="a", input_shape=(64, 64, 3), **THIN)
    assert model_info(lka)["build_args"]["attention"] == "a" and "relu" not in [l.name for l in lka.layers]
    with pytest.raises(ConfigError, match="attention gates are defined on DenseNet121"):
        build_model("vgg16-bn", attention="b", input_shape=(32, 32, 3), width_multiplier=0.125)
    with pytest.raises(ConfigError, match="unknown attention 'c'"):
        build_model("densenet121", attention="c", input_shape=(32, 32, 3), **THIN)


def _copy_gates(model, reference, form):
    """The reference's gate and classifier weights into the Keras model (its backbone came from the file)."""
    with torch.no_grad():
        for s, gate in enumerate(GATES, start=1):
            u = getattr(reference, f"u{s}").weight.numpy()  # (1, in)
            if form == "a":
                proj = getattr(reference, f"projector{s}").weight.numpy().transpose(2, 3, 1, 0)
                model.get_layer(f"{gate}_proj").set_weights([proj])
                model.get_layer(f"{gate}_u").set_weights([u.T])
            else:
                c = int(model.get_layer(f"pool{s + 1}_pool").output.shape[-1])
                model.get_layer(f"{gate}_u_local").set_weights([u[:, :c].T])
                model.get_layer(f"{gate}_u_global").set_weights([u[:, c:].T])
        model.get_layer("predictions").set_weights([reference.classifier.weight.numpy().T,
                                                    reference.classifier.bias.numpy()])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("form", ["a", "b"])
def test_gates_equal_a_pytorch_reference(form, tmp_path):
    """The full-width network against AttentionDenseNet (plain PyTorch): probabilities and attention weights.
    Batch 4 at 64x64 gives L3 2x2 = 4 pixels, the case Keras 3.15's broadcasting add gets wrong."""
    for size in ((64, 64), (96, 72)):
        torch.manual_seed(0)
        reference = AttentionDenseNet(form)
        with torch.no_grad():  # the gates' u start small (Linear's init): larger, the weights are far from uniform
            for s in (1, 2, 3):
                getattr(reference, f"u{s}").weight.mul_(5.0)
        reference = randomize(reference, seed=1, calibration_size=size)
        path = str(tmp_path / f"backbone-{form}.pth")
        torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("features.")}, path)
        model = build_model(f"densenet121-att-{form}", num_classes=15, input_shape=(*size, 3), weights=path)
        assert "backbone-only file" in model.weights_report and "att1_" in model.weights_report
        _copy_gates(model, reference, form)
        x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = torch.sigmoid(reference(x)).numpy()
            ref_weights = [w.numpy() for w in reference.gates(x)[0]]
        assert expected.std() > 0.05
        x_keras = x.permute(0, 2, 3, 1).numpy()
        got = np.asarray(model(x_keras, training=False))
        assert np.max(np.abs(got - expected)) <= 1e-4, (form, size)
        maps = attention_maps(model, x_keras, batch_size=4)
        for gate, ref in zip(GATES, ref_weights):
            assert maps[gate].reshape(4, -1).shape == ref.shape
            np.testing.assert_allclose(maps[gate].reshape(4, -1), ref, atol=1e-5)
            assert ref.max() > 2.0 / ref.shape[1]  # not uniform: the comparison can fail


@pytest.mark.parametrize("variant", ["densenet121-att-a", "densenet121-att-b"])
def test_attention_weights_per_scale_sum_to_one(variant, tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 72, 56, 3)).astype("float32")
    model = build_model(variant, input_shape=(72, 56, 3), **THIN)
    maps = attention_maps(model, x)
    assert list(maps) == list(GATES)
    for gate, local in zip(GATES, ("pool2_pool", "pool3_pool", "pool4_pool")):
        m = maps[gate]
        assert m.shape == (3,) + tuple(model.get_layer(local).output.shape[1:3])
        assert (m >= 0).all()
        np.testing.assert_allclose(m.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert maps["att1"].std() > 0  # the gates weight the pixels differently
    # a .keras round trip keeps outputs and maps; the maps are read by layer name from the reloaded model
    path = str(tmp_path / "att.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    for gate, m in attention_maps(loaded, x).items():
        np.testing.assert_allclose(m, maps[gate], atol=1e-6)
    assert model_info(loaded) == model_info(model)


def test_one_image_or_many_give_the_same_attention():
    """Each image's result does not depend on the others in the batch (Keras' broadcasting add does, when the
    batch equals the pixels of a scale: 4 images, 2x2 L3)."""
    model = build_model("densenet121-att-b", input_shape=(64, 64, 3), **THIN)
    x = np.random.default_rng(3).normal(size=(4, 64, 64, 3)).astype("float32")
    together = np.asarray(model(x, training=False))
    alone = np.concatenate([np.asarray(model(x[i:i + 1], training=False)) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_gradcam_of_a_gated_model_with_patient_features(tmp_path):
    """Two inputs (image, patient features): the engine explains the default feature layer (L3), its
    probabilities are the model's, and a .keras round trip keeps both."""
    from cxrkeras.explain.engine import HeatmapEngine

    model = build_model("densenet121-att-a", input_shape=(64, 64, 3), patient_features=True, lka_blocks="last2",
                        **THIN)
    assert [t.name for t in model.inputs] == ["image", "patient"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    f = np.array([[0.3, 1, 0, 1, 0], [-1.2, 0, 1, 0, 1]], "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = HeatmapEngine(model)
        maps, probs = engine((x, f), [0, 3])
    assert engine.layer_name == "pool4_pool" and maps.shape[:2] == (2, 2) and np.isfinite(maps).all()
    np.testing.assert_allclose(probs, np.asarray(model((x, f))), atol=1e-5)
    with pytest.raises(ConfigError, match="takes 2 inputs"):
        engine(x, [0])
    path = str(tmp_path / "pf.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded((x, f))), np.asarray(model((x, f))), atol=1e-6)
    assert model_info(loaded)["patient_features"] == model_info(model)["patient_features"]
    # the branch: Dense(3) + ReLU on the 5 features, concatenated before the classifier
    assert model.get_layer("patient_dense").kernel.shape == (5, 3)
    assert model.get_layer("predictions").kernel.shape[0] == 3 * 8 + 3  # 3 attended vectors of g (8) + branch


def test_gradcam_of_att_b_on_one_image_and_several_classes(monkeypatch):
    """One image, several classes: TF's batch_jacobian cannot vectorise att-B's gate gradients at batch size 1
    (pfor fails on a BiasAddGrad); the engine then takes the loop-based jacobian, and each class's heatmap equals the
    one-class path (a plain tape.gradient)."""
    import tensorflow as tf

    from cxrkeras.explain.engine import HeatmapEngine

    used_pfor = []
    original = tf.GradientTape.batch_jacobian

    def spy(self, *args, **kwargs):
        used_pfor.append(kwargs.get("experimental_use_pfor", True))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tf.GradientTape, "batch_jacobian", spy)
    keras.utils.set_random_seed(0)
    model = build_model("densenet121-att-b", num_classes=15, input_shape=(32, 32, 3), patient_features=True,
                        blocks=[1, 1, 1, 1], width_multiplier=0.125)
    rng = np.random.default_rng(0)
    x, f = rng.random((1, 32, 32, 3)).astype("float32"), rng.random((1, 5)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = HeatmapEngine(model, "pool4_pool")
        maps, _ = engine((x, f), [0, 1, 2], batch_size=1)
        single = np.concatenate([engine((x, f), [k], batch_size=1)[0] for k in (0, 1, 2)], axis=1)
    assert used_pfor[:2] == [True, False]  # the vectorised jacobian failed and the fallback ran
    assert maps.max() > 0
    np.testing.assert_allclose(maps, single, atol=1e-5)


# --- ResNet-50 ---

def resnet50_backbone():
    """Trainable parameters of keras.applications' ResNet50 (include_top=False), by hand: 7x7 stem with bias, per
    bottleneck 1x1 (stride) -> 3x3 -> 1x1 (4f) with biases and BNs, a projection shortcut on each stage's first."""
    params, c = 3 * 49 * 64 + 64 + 2 * 64, 64
    for filters, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for i in range(blocks):
            if i == 0:
                params += c * 4 * filters + 4 * filters + 2 * 4 * filters
            params += (c * filters + filters + 2 * filters + filters * 9 * filters + filters + 2 * filters
                       + filters * 4 * filters + 4 * filters + 2 * 4 * filters)
            c = 4 * filters
    return params, c


@pytest.mark.timeout(180)
def test_resnet50_is_keras_applications_and_loads_its_weights_by_name(tmp_path):
    from cxrkeras.models.weights import write_legacy_h5

    backbone, channels = resnet50_backbone()
    reference = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    assert backbone == trainable_params(reference) == 23_534_592
    model = build_model("resnet50", num_classes=15, input_shape=(64, 64, 3))
    assert trainable_params(model) == backbone + channels * 15 + 15
    ours = {layer.name for layer in model.layers if layer.weights}
    theirs = {layer.name for layer in reference.layers if layer.weights}
    assert theirs <= ours and ours - theirs == {"predictions"}
    info = model_info(model)
    assert info["preprocessing"] == "caffe" and info["feature_layer"] == "conv5_block3_out"
    assert model.get_layer("conv1_bn").epsilon == 1.001e-5 and model.get_layer("conv1_bn").momentum == 0.99
    # keras.applications' model with random weights and BN statistics, written as its ImageNet file is laid out
    rng = np.random.default_rng(0)
    for layer in reference.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    path = write_legacy_h5(str(tmp_path / "resnet50_notop.h5"), [l for l in reference.layers if l.weights])
    loaded = build_model("resnet50", num_classes=15, input_shape=(64, 64, 3), weights=path)
    assert "predictions" in loaded.weights_report  # the head kept its initial values
    x = rng.normal(0, 50, size=(2, 64, 64, 3)).astype("float32")
    features = keras.Model(loaded.inputs, loaded.get_layer("conv5_block3_out").output)
    np.testing.assert_allclose(np.asarray(features(x)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="PyTorch checkpoints map onto DenseNet121 and VGG16"):
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "r.pth"))
        build_model("resnet50", input_shape=(64, 64, 3), weights=str(tmp_path / "r.pth"))
    assert os.path.getsize(path) > 0
