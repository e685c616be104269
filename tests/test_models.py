"""Models: exact paper parameter counts and GFLOPs, LKA numerics against NumPy, registry and bad-input errors."""

import numpy as np
import pytest

import keras

from cxrkeras.errors import ConfigError, CxrError
from cxrkeras.models import (LargeKernelAttention, build_model, fvcore_flops, get_variant, gflops, list_variants,
                             lka_param_count, model_info, trainable_params)

PAPER = {  # variant: (trainable params at 14 classes, GFLOPs at 224 by fvcore on the paper's modules), published
    "densenet121-lka-full": (9_609_870, 3.64),
    "densenet121-lka-last2": (9_223_054, 3.14),
    "densenet121-lka-after": (8_095_630, 2.92),
    "vgg16-lka-full": (15_453_966, 16.70),
    "vgg16-lka-last3": (15_418_702, 15.93),
    "vgg16-lka-after": (15_031_886, 15.39),
}


@pytest.mark.parametrize("variant", list(PAPER))
def test_paper_parameter_and_flop_counts(variant):
    params, paper_gflops = PAPER[variant]
    model = build_model(variant, num_classes=14)  # built at 224, never run
    assert trainable_params(model) == params
    assert get_variant(variant).paper_params == params
    assert round(fvcore_flops(model), 2) == paper_gflops  # the paper's convention, to its two decimals
    assert 0 < (fvcore_flops(model) - gflops(model)) / paper_gflops < 0.02  # BN and the pool's input, less x*attn
    if variant.startswith("vgg16"):  # plain VGG16 lacks only the BN scales and offsets
        plain = build_model(variant.replace("vgg16-", "vgg16-plain-"), num_classes=14)
        assert params - trainable_params(plain) == 8_448
        assert gflops(plain) == pytest.approx(gflops(model))


def test_baselines_and_lka_formula():
    assert trainable_params(build_model("densenet121")) == 6_953_856 + 1024 * 14 + 14
    assert trainable_params(build_model("vgg16-plain")) == 14_714_688 + 512 * 14 + 14
    assert lka_param_count(1024) == 1024 * 26 + 1024 * 50 + 1024 * 1024 + 1024
    layer = LargeKernelAttention()
    layer.build((None, 5, 5, 64))
    assert sum(int(np.prod(w.shape)) for w in layer.trainable_weights) == lka_param_count(64)


def _depthwise_same(x, kernel, bias, dilation):
    """NumPy depthwise conv, stride 1, 'same' zero padding (the paper's padding 2 and 9)."""
    k = kernel.shape[0]
    pad = dilation * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    for i in range(k):
        for j in range(k):
            out += xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :] * kernel[i, j, :, 0]
    return out + bias


def test_lka_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 23, 19, 6)).astype("float32")
    layer = LargeKernelAttention(name="lka")
    layer.build(x.shape)
    weights = [rng.normal(scale=0.3, size=w.shape).astype("float32") for w in layer.get_weights()]
    layer.set_weights(weights)
    k0, b0, k1, b1, k2, b2 = (w.astype("float64") for w in weights)
    attn = _depthwise_same(x.astype("float64"), k0, b0, 1)
    attn = _depthwise_same(attn, k1, b1, 3)
    attn = attn @ k2[0, 0] + b2
    expected = x * attn
    got = np.asarray(layer(x))
    assert np.max(np.abs(expected)) > 1.0  # a non-trivial output scale
    assert np.max(np.abs(got - expected)) <= 1e-5


def test_lka_van_form_params_and_shortcut():
    layer = LargeKernelAttention(form="van")
    layer.build((None, 8, 8, 4))
    assert sum(int(np.prod(w.shape)) for w in layer.weights) == lka_param_count(4, "van")
    layer.proj_2.set_weights([np.zeros((1, 1, 4, 4), "float32"), np.zeros(4, "float32")])
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(layer(x)), x, atol=1e-6)  # zero projection leaves only the shortcut
    assert LargeKernelAttention.from_config(layer.get_config()).form == "van"


def test_registry_and_model_info():
    names = list_variants()
    assert {"densenet121", "densenet121-lka-last2", "vgg16-lka-last3", "vgg16-plain-lka-last3"} <= set(names)
    assert get_variant("densenet121-lka-after").preprocessing == "torch"
    assert get_variant("vgg16-lka-last3").preprocessing == "torch"  # torchvision's vgg16_bn: ImageNet mean/std
    assert get_variant("vgg16-plain").preprocessing == "caffe"
    model = build_model("vgg16-plain", num_classes=3, input_shape=(32, 32, 1), label_names=["a", "b", "c"],
                        width_multiplier=0.125)
    info = model_info(model)
    assert info["labels"] == ["a", "b", "c"] and info["variant"] == "vgg16-plain"
    assert info["feature_layer"] == "block5_conv3" and info["input_shape"] == (32, 32, 1)
    explicit = build_model("densenet121", lka_blocks=[2, "after"], input_shape=(32, 32, 3), width_multiplier=0.125,
                           blocks=(1, 1, 1, 1))
    assert model_info(explicit)["feature_layer"] == "lka_after"
    assert [l.name for l in explicit.layers if isinstance(l, LargeKernelAttention)] == ["conv3_lka", "lka_after"]
    assert model_info(build_model("vgg16-bn", input_shape=(32, 32, 3), width_multiplier=0.125,
                                  lka_blocks="3"))["feature_layer"] == "block3_lka"
    with pytest.raises(CxrError, match="not built by cxrkeras"):
        model_info(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="resnet18"), "unknown model variant .resnet18.; valid variants: densenet121, "),
    (dict(variant="densenet121", lka_blocks="last3"), "unknown LKA placement 'last3' for DenseNet121"),
    (dict(variant="vgg16-bn", lka_blocks="last2"), "unknown LKA placement 'last2' for VGG16"),
    (dict(variant="densenet121", lka_blocks=[5]), "unknown LKA block 5 for DenseNet121: blocks are numbered 1-4"),
    (dict(variant="vgg16-plain", lka_blocks=[0, 3]), "unknown LKA block 0 for VGG16: blocks are numbered 1-5"),
    (dict(variant="vgg16-plain", lka_blocks=["x"]), "unknown LKA block 'x'"),
    (dict(variant="densenet121", input_shape=(31, 64, 3)), "too small for densenet121: .* at least 32x32"),
    (dict(variant="vgg16-lka-last3", input_shape=(16, 16, 3)), "too small .* at least 32x32"),
    (dict(variant="vgg16-plain", input_shape=(64, 64)), "input_shape must be"),
    (dict(variant="vgg16-plain", num_classes=0), "num_classes must be an integer >= 1"),
    (dict(variant="vgg16-plain", num_classes=3, label_names=["a"]), "num_classes=3 but 1 label names"),
    (dict(variant="vgg16-plain", widht_multiplier=0.5), "unknown build_model option.*widht_multiplier"),
    (dict(variant="vgg16-plain", blocks=(1, 1, 1, 1)), "'blocks' applies to DenseNet variants only"),
    (dict(variant="vgg16-plain", lka_form="sigmoid"), "unknown lka_form 'sigmoid'"),
    (dict(variant="vgg16-plain", dropout=1.0), "dropout must be in"),
    (dict(variant="vgg16-plain", bn_epsilon=1e-3), "bn_epsilon: vgg16-plain has no batch norm"),
    (dict(variant="vgg16-bn", bn_momentum=1.0), r"bn_momentum must be in \[0, 1\)"),
    (dict(variant="densenet121", bn_epsilon=0), r"bn_epsilon must be in \(0, 1\]"),
    (dict(variant="vgg16-bn", preprocessing="imagenet"), "unknown preprocessing 'imagenet'"),
    (dict(variant="vgg16-bn", final_relu=True), "'final_relu' applies to DenseNet variants only"),
    (dict(variant="densenet121", final_relu="yes"), "final_relu must be true or false"),
    (dict(variant="densenet121", weights_labels="paper"), "weights_labels needs weights"),
    (dict(variant="vgg16-plain", weights="/nonexistent/w.keras"), "weights file /nonexistent/w.keras not found"),
])
def test_bad_inputs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model(**kwargs)


def test_cli_models_table():
    from click.testing import CliRunner

    from cxrkeras.cli import cli

    result = CliRunner().invoke(cli, ["models", "densenet121-lka-after", "vgg16-plain", "--image-size", "224"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("densenet121-lka-after"))
    assert "8,095,630" in row and "2.89" in row and "2.92  torch" in row  # GMACs, then fvcore's = the paper's
    assert "14,721,870" in result.output and "fvcore GFLOPs: the paper's convention" in result.output
    bad = CliRunner().invoke(cli, ["models", "densenet-lka"])
    assert bad.exit_code != 0 and "valid variants" in bad.output and "Traceback" not in bad.output


def test_paper_forward_and_baseline_forward():
    """The paper's DenseNet variants end norm5 -> (LKA) -> pool; the baseline keeps torchvision's ReLU."""
    small = dict(input_shape=(32, 32, 3), width_multiplier=0.125, blocks=(1, 1, 1, 1))
    names = lambda model: [layer.name for layer in model.layers]  # noqa: E731
    for variant in ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full"):
        model = build_model(variant, **small)
        assert "relu" not in names(model) and names(model)[-3] == "avg_pool"
        assert names(model)[-4] == ("lka_after" if variant.endswith("after") else "bn")
        assert model.get_layer("head_dropout").rate == 0.5  # nn.Dropout(0.5) in the paper's modules
    baseline = build_model("densenet121", **small)
    assert names(baseline)[-4:-2] == ["relu", "avg_pool"] and model_info(baseline)["feature_layer"] == "relu"
    assert baseline.get_layer("head_dropout").rate == 0.2
    assert model_info(build_model("densenet121-lka-after", lka_blocks="none", **small))["feature_layer"] == "bn"
    assert model_info(build_model("densenet121", final_relu=False, **small))["build_args"]["final_relu"] is False
    assert build_model("vgg16-lka-last3", input_shape=(32, 32, 3), width_multiplier=0.125).get_layer(
        "head_dropout").rate == 0.5


def test_batch_norm_and_preprocessing_follow_the_initial_weights(tmp_path):
    """PyTorch origin (and no weights): eps 1e-5, Keras momentum 0.9; keras.applications' DenseNet file: its own
    1.001e-5 / 0.99; VGG16: caffe only for keras.applications' plain VGG16; all stored with the model."""
    from cxrkeras.models import build_options

    def bn_of(model):
        layer = model.get_layer("conv1_bn") if "conv1_bn" in [l.name for l in model.layers] else \
            model.get_layer("block1_conv1_bn")
        return layer.epsilon, layer.momentum

    small = dict(input_shape=(32, 32, 3), width_multiplier=0.125, blocks=(1, 1, 1, 1))
    assert bn_of(build_model("densenet121-lka-last2", **small)) == (1e-5, 0.9)
    assert build_options("densenet121", "imagenet") == dict(preprocessing="torch", bn_epsilon=1.001e-5,
                                                            bn_momentum=0.99)
    assert build_options("densenet121", "torchvision")["bn_momentum"] == 0.9
    assert build_options("vgg16-lka-last3", "imagenet") == dict(preprocessing="torch", bn_epsilon=1e-5,
                                                                bn_momentum=0.9)
    assert build_options("vgg16-plain", "imagenet") == dict(preprocessing="caffe")
    assert build_options("vgg16-plain", None, preprocessing="torch") == dict(preprocessing="torch")
    assert build_options("vgg16-bn", None, bn_momentum=None) == dict(preprocessing="torch", bn_epsilon=1e-5,
                                                                     bn_momentum=0.9)
    custom = build_model("densenet121", bn_epsilon=1e-3, bn_momentum=0.95, preprocessing="caffe", **small)
    assert bn_of(custom) == (1e-3, 0.95) and model_info(custom)["preprocessing"] == "caffe"
    path = str(tmp_path / "custom.keras")
    custom.save(path)
    assert build_options("densenet121-lka-after", path) == dict(preprocessing="caffe", bn_epsilon=1e-3,
                                                                bn_momentum=0.95)  # a .keras file's own settings
    plain = build_model("vgg16-plain", input_shape=(32, 32, 3), width_multiplier=0.125)
    assert model_info(plain)["preprocessing"] == "caffe" and model_info(plain)["build_args"]["bn_epsilon"] is None


def test_config_model_preprocessing_reaches_data_and_model():
    from cxrkeras.config import load_config
    from cxrkeras.training.trainer import model_options

    config = load_config(sets=["model.variant=vgg16-plain-lka-last3", "model.preprocessing=torch"])
    assert model_options(config) == dict(preprocessing="torch")
    config = load_config(sets=["model.variant=densenet121-lka-after", "model.weights=imagenet", "model.dropout=0.3",
                               "model.overrides={bn_momentum: 0.97}"])
    assert model_options(config) == dict(preprocessing="torch", bn_epsilon=1.001e-5, bn_momentum=0.97, dropout=0.3)
    with pytest.raises(ConfigError, match="model.preprocessing must be one of torch, caffe"):
        load_config(sets=["model.preprocessing=rgb"])
    with pytest.raises(ConfigError, match="set model.preprocessing instead"):
        load_config(sets=["model.overrides={preprocessing: torch}"])
    from cxrkeras.config import PREPROCESSING
    from cxrkeras.data.preprocess import MODES

    assert PREPROCESSING == MODES  # config checks without importing TensorFlow


def test_bundled_configs_start_as_the_paper():
    import glob
    import os

    from cxrkeras.config import load_config
    from cxrkeras.training.trainer import model_options

    files = [f for f in glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "*.yaml"))
             if not f.endswith(("demo.yaml", "resnet50.yaml", "efficientnetb2_lstm_mha.yaml"))]
    assert len(files) == 10  # ResNet-50 and EfficientNet-B2: keras.applications' weights only
    for path in files:
        config = load_config(path)
        assert config.model.weights == "torchvision", path
        assert model_options(config) == dict(preprocessing="torch", bn_epsilon=1e-5, bn_momentum=0.9), path
    # keras.applications' EfficientNet-B2 file: ImageNet mean/std input (its in-model normalisation), BN 1e-3 / 0.99
    config = load_config(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "efficientnetb2_lstm_mha.yaml"))
    assert config.model.weights == "imagenet"
    assert model_options(config) == dict(preprocessing="torch", bn_epsilon=1e-3, bn_momentum=0.99, lstm_units=256,
                                         attention_heads=4, attention_key_dim=64)
