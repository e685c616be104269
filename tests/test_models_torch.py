"""cxrkeras networks against plain-PyTorch references (the paper's six modules, torchvision-style baselines), loaded
through build_model(weights=<state_dict>); PyTorch layouts (torchvision, legacy keys, timm safetensors, fastai,
DataParallel), convert-weights, ImageNet downloads and the errors. torch is required: without it these fail."""

import subprocess
import sys

import numpy as np
import pytest
import torch  # a missing torch fails this module: the equivalence tests never skip
from torch_reference import REFERENCES, DenseNet121, PaperDenseNetLKA, PaperVGGLKA, VGG16BN, randomize

from cxrkeras.errors import ConfigError
from cxrkeras.labels import NIH_LABELS, PAPER_LABEL_ORDER
from cxrkeras.models import build_model, model_info

SIZES = ((224, 224), (227, 199))  # the paper's input and an odd size (floor pooling, asymmetric maps)
TOLERANCE = 1e-4  # max |delta probability|, float32
PAPER_TO_NIH = [PAPER_LABEL_ORDER.index(label) for label in NIH_LABELS]
THIN_DENSENET = dict(width=0.25, blocks=(1, 2, 2, 1))


def _images(size, n=2, seed=1):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _torch_probs(module, x, paper_layout):
    with torch.no_grad():
        p = torch.sigmoid(module(x)).numpy()
    return p[:, PAPER_TO_NIH] if paper_layout else p  # the paper's head order -> the model's NIH order


def _keras_probs(model, x):
    return np.asarray(model(x.permute(0, 2, 3, 1).numpy(), training=False))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(REFERENCES))
def test_equivalence_with_pytorch_reference(variant, tmp_path):
    factory, paper_layout = REFERENCES[variant]
    reference = randomize(factory(), seed=0)
    path = str(tmp_path / f"{variant}.pth")
    torch.save(reference.state_dict(), path)
    bn = next(m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert float(bn.running_var.std()) > 0.01 and float(bn.running_mean.abs().max()) > 0.01  # non-trivial stats
    for size in SIZES:
        x = _images(size)
        expected = _torch_probs(reference, x, paper_layout)
        assert expected.std() > 0.05 and 0.01 < expected.mean() < 0.99  # not saturated: differences would show
        model = build_model(variant, input_shape=(*size, 3), weights=path)
        got = _keras_probs(model, x)
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= TOLERANCE, (variant, size)
    assert "full checkpoint" in model.weights_report
    info = model_info(model)
    assert info["build_args"]["bn_epsilon"] == 1e-5 and info["build_args"]["bn_momentum"] == 0.9
    assert info["preprocessing"] == "torch"


def test_a_final_relu_would_be_caught(tmp_path):
    """The comparison can fail: the same paper checkpoint with torchvision's ReLU after norm5 is far off."""
    reference = randomize(PaperDenseNetLKA((3, 4), **THIN_DENSENET), seed=3, calibration_size=(64, 64))
    path = str(tmp_path / "thin.pth")
    torch.save(reference.state_dict(), path)
    x = _images((64, 64))
    expected = _torch_probs(reference, x, True)
    kw = dict(input_shape=(64, 64, 3), width_multiplier=0.25, blocks=(1, 2, 2, 1), weights=path)
    assert np.max(np.abs(_keras_probs(build_model("densenet121-lka-last2", **kw), x) - expected)) <= TOLERANCE
    with_relu = build_model("densenet121-lka-last2", final_relu=True, **kw)
    assert np.max(np.abs(_keras_probs(with_relu, x) - expected)) > 1e-3


def _legacy(state):
    """torchvision's pre-0.3 DenseNet key names: denselayerN.norm.1 instead of norm1."""
    out = {}
    for key, value in state.items():
        for old in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                key = key.replace(f".{old}{i}.", f".{old}.{i}.") if ".denselayer" in key else key
        out[key] = value
    return out


@pytest.mark.timeout(300)
def test_torchvision_and_legacy_densenet_keys_load_byte_equal(tmp_path):
    reference = DenseNet121(num_classes=1000)  # torchvision's ImageNet layout, random values
    with torch.no_grad():
        for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    state = reference.state_dict()
    current, legacy = str(tmp_path / "densenet121-current.pth"), str(tmp_path / "densenet121-legacy.pth")
    torch.save(state, current)
    legacy_state = _legacy(state)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy_state
    torch.save(legacy_state, legacy)
    a = build_model("densenet121-lka-last2", input_shape=(32, 32, 3), weights=current)
    b = build_model("densenet121-lka-last2", input_shape=(32, 32, 3), weights=legacy)
    assert "backbone-only file" in a.weights_report and "conv4_lka, conv5_lka, predictions" in a.weights_report
    assert "legacy DenseNet keys" in b.weights_report and "legacy" not in a.weights_report
    for la, lb in zip(a.layers, b.layers):
        if la.name in ("conv4_lka", "conv5_lka", "predictions"):
            continue
        for wa, wb in zip(la.get_weights(), lb.get_weights()):
            assert wa.tobytes() == wb.tobytes(), la.name
    t = {k: v.numpy() for k, v in state.items()}
    np.testing.assert_array_equal(a.get_layer("conv1_conv").get_weights()[0],
                                  t["features.conv0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(a.get_layer("conv3_block12_1_bn").get_weights()[3],
                                  t["features.denseblock2.denselayer12.norm2.running_var"])
    np.testing.assert_array_equal(a.get_layer("bn").get_weights()[0], t["features.norm5.weight"])


_NO_TORCH_CHILD = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
from safetensors.numpy import load_file
from cxrkeras.models import build_model
path = sys.argv[1]
model = build_model("densenet121-lka-after", input_shape=(32, 32, 3), weights=path)
assert "torch" not in sys.modules, sorted(k for k in sys.modules if k.split(".")[0] == "torch")
state = load_file(path)
np.testing.assert_array_equal(model.get_layer("conv1_conv").get_weights()[0],
                              state["features.conv0.weight"].transpose(2, 3, 1, 0))
np.testing.assert_array_equal(model.get_layer("conv5_block16_2_conv").get_weights()[0],
                              state["features.denseblock4.denselayer16.conv2.weight"].transpose(2, 3, 1, 0))
np.testing.assert_array_equal(model.get_layer("bn").get_weights()[2], state["features.norm5.running_mean"])
print(model.weights_report)
"""


@pytest.mark.timeout(300)
def test_timm_safetensors_loads_without_torch(tmp_path):
    """timm's densenet121.tv_in1k layout (torchvision's keys, 1000-class classifier) in safetensors, in a fresh
    process that must never import torch."""
    from safetensors.numpy import save_file

    state = {k: v.numpy() for k, v in randomize(DenseNet121(num_classes=1000), 5, (64, 64)).state_dict().items()}
    path = str(tmp_path / "model.safetensors")
    save_file(state, path)
    out = subprocess.run([sys.executable, "-c", _NO_TORCH_CHILD, path], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backbone-only file" in out.stdout and "lka_after, predictions" in out.stdout
    assert "2 tensors of the ImageNet classifier (classifier)" in out.stdout


def _timm_vgg16_bn(width=0.25):
    """timm's vgg16_bn.tv_in1k keys: torchvision's `features` plus pre_logits.fc1/fc2 and head.fc (shrunk here:
    the loader skips them by name whatever their size)."""
    state = {k: v.numpy() for k, v in randomize(VGG16BN(width=width), 2, (64, 64)).features.state_dict().items()}
    state = {f"features.{k}": v for k, v in state.items()}
    rng = np.random.default_rng(0)
    for key, shape in (("pre_logits.fc1.weight", (8, 128, 7, 7)), ("pre_logits.fc1.bias", (8,)),
                       ("pre_logits.fc2.weight", (8, 8, 1, 1)), ("pre_logits.fc2.bias", (8,)),
                       ("head.fc.weight", (1000, 8)), ("head.fc.bias", (1000,))):
        state[key] = rng.normal(size=shape).astype("float32")
    return state


def test_imagenet_vgg16_bn_downloads_timm_safetensors_with_its_hash(tmp_path, monkeypatch):
    import keras
    from safetensors.numpy import save_file

    state = _timm_vgg16_bn(width=1.0)
    local = str(tmp_path / "model.safetensors")
    save_file(state, local)
    calls = []

    def fake_get_file(fname, origin, cache_subdir=None, file_hash=None, **kwargs):
        calls.append((fname, origin, file_hash))
        return local

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    model = build_model("vgg16-lka-last3", input_shape=(32, 32, 3), weights="imagenet")
    (fname, origin, file_hash), = calls
    assert origin.startswith("https://huggingface.co/timm/vgg16_bn.tv_in1k/resolve/") and len(file_hash) == 64
    assert "timm vgg16_bn" in model.weights_report and "block3_lka, block4_lka, block5_lka, predictions" in \
        model.weights_report
    np.testing.assert_array_equal(model.get_layer("block5_conv3").get_weights()[1], state["features.40.bias"])
    np.testing.assert_array_equal(model.get_layer("block5_conv3_bn").get_weights()[0], state["features.41.weight"])
    assert model_info(model)["preprocessing"] == "torch"


def test_imagenet_offline_error_names_url_and_local_file(offline_downloads):
    with pytest.raises(ConfigError, match=r"could not download ImageNet weights for vgg16-lka-full from "
                                          r"https://huggingface.co/timm/vgg16_bn.tv_in1k/.*model.safetensors .*"
                                          r"weights='/path/to/timm_vgg16_bn.tv_in1k.safetensors' \(or torchvision's "
                                          r"https://download.pytorch.org/models/vgg16_bn-6c64b313.pth"):
        build_model("vgg16-lka-full", input_shape=(32, 32, 3), weights="imagenet")
    with pytest.raises(ConfigError, match="densenet121.tv_in1k"):
        build_model("densenet121-lka-after", input_shape=(32, 32, 3), weights="torchvision")
    with pytest.raises(ConfigError, match="'torchvision' is for DenseNet121 and VGG16-BN variants"):
        build_model("vgg16-plain", input_shape=(32, 32, 3), weights="torchvision")


def test_torchvision_file_name_hash_is_checked(tmp_path):
    path = str(tmp_path / "vgg16_bn-6c64b313.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="its name says sha256 6c64b313.*incomplete or corrupt"):
        build_model("vgg16-bn", input_shape=(32, 32, 3), weights=path)


def _thin_paper_vgg(tmp_path, name="paper.pth", lka=(3, 4, 5), wrap=None):
    reference = randomize(PaperVGGLKA(lka, width=0.25), seed=4, calibration_size=(64, 64))
    state = reference.state_dict()
    if wrap == "fastai":
        state = {"model": {f"module.{k}": v for k, v in state.items()},
                 "opt": {"state": [], "hypers": [{"lr": 1e-3, "mom": 0.9}]}}
    path = str(tmp_path / name)
    torch.save(state, path)
    return reference, path


THIN_VGG = dict(input_shape=(64, 64, 3), width_multiplier=0.25)


def test_fastai_file_with_module_prefix(tmp_path):
    reference, path = _thin_paper_vgg(tmp_path, "best_model.pth", wrap="fastai")
    model = build_model("vgg16-lka-last3", weights=path, **THIN_VGG)
    x = _images((64, 64))
    assert np.max(np.abs(_keras_probs(model, x) - _torch_probs(reference, x, True))) <= TOLERANCE
    assert "fastai file: read its 'model' state_dict; ignored opt" in model.weights_report
    assert "stripped the 'module.' prefix" in model.weights_report


def test_sequential_head_and_a_1000_class_model(tmp_path):
    reference = randomize(VGG16BN(width=0.25), seed=8, calibration_size=(64, 64))
    state = {(f"classifier.1.{k.split('.')[-1]}" if k.startswith("classifier.") else k): v
             for k, v in reference.state_dict().items()}  # nn.Sequential(nn.Dropout(), nn.Linear(...))
    path = str(tmp_path / "seq_head.pth")
    torch.save(state, path)
    x = _images((64, 64))
    model = build_model("vgg16-bn", weights=path, **THIN_VGG)
    assert np.max(np.abs(_keras_probs(model, x) - _torch_probs(reference, x, False))) <= TOLERANCE
    imagenet = DenseNet121(num_classes=1000, **THIN_DENSENET)
    path = str(tmp_path / "in1k.pth")
    torch.save(imagenet.state_dict(), path)
    small = dict(input_shape=(32, 32, 3), width_multiplier=0.25, blocks=(1, 2, 2, 1))
    model = build_model("densenet121-lka-last2", num_classes=1000, weights=path, **small)  # ImageNet head kept
    assert "kept initial values for conv4_lka, conv5_lka" in model.weights_report
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[1],
                                  imagenet.classifier.bias.detach().numpy())


def test_head_order_can_be_given(tmp_path):
    reference, path = _thin_paper_vgg(tmp_path)
    x = _images((64, 64))
    as_file = build_model("vgg16-lka-last3", weights=path, weights_labels="nih", **THIN_VGG)
    with torch.no_grad():
        raw = torch.sigmoid(reference(x)).numpy()
    assert np.max(np.abs(_keras_probs(as_file, x) - raw)) <= TOLERANCE  # rows taken as they are
    with pytest.raises(ConfigError, match="not an order of the model's labels"):
        build_model("vgg16-lka-last3", weights=path, weights_labels=["a"] * 14, **THIN_VGG)


@pytest.mark.timeout(300)
def test_convert_weights_cli_full_and_backbone(tmp_path):
    """The CLI converts real-size checkpoints: the paper's VGG16-BN + LKA 3 block (full) and torchvision's vgg16_bn
    layout (backbone); the .h5 then loads without torch, by layer name."""
    from click.testing import CliRunner

    from cxrkeras.cli import cli

    reference = randomize(PaperVGGLKA((3, 4, 5)), seed=4, calibration_size=(64, 64))
    path = str(tmp_path / "best_model_vgg_lka_3_block.pth")
    torch.save({"model": reference.state_dict(), "opt": {"state": [], "hypers": []}}, path)
    out = str(tmp_path / "paper_last3.h5")
    result = CliRunner().invoke(cli, ["convert-weights", path, "--variant", "vgg16-lka-last3", "--out", out])
    assert result.exit_code == 0, result.output
    assert "full checkpoint: every layer filled, every tensor used" in result.output
    assert "mapped: 98 of 111 tensors onto 30 layers" in result.output and f"wrote {out}" in result.output
    x = _images((64, 64))
    converted = build_model("vgg16-lka-last3", input_shape=(64, 64, 3), weights=out)
    assert np.max(np.abs(_keras_probs(converted, x) - _torch_probs(reference, x, True))) <= TOLERANCE
    assert model_info(converted)["build_args"]["bn_momentum"] == 0.9  # the file records its PyTorch origin
    with pytest.raises(ConfigError, match="lacks layers block1_lka, block2_lka"):
        build_model("vgg16-lka-full", input_shape=(64, 64, 3), weights=out)  # a full file must fill every layer

    features = randomize(VGG16BN(), seed=7, calibration_size=(64, 64)).features
    tv = str(tmp_path / "vgg16_bn_imagenet_layout.pth")
    torch.save({**{f"features.{k}": v for k, v in features.state_dict().items()},
                "classifier.0.weight": torch.zeros(16, 8), "classifier.0.bias": torch.zeros(16),
                "classifier.3.weight": torch.zeros(16, 16), "classifier.3.bias": torch.zeros(16),
                "classifier.6.weight": torch.zeros(1000, 16), "classifier.6.bias": torch.zeros(1000)}, tv)
    out2 = str(tmp_path / "vgg16_bn_backbone.h5")
    result = CliRunner().invoke(cli, ["convert-weights", tv, "--variant", "vgg16-bn", "--out", out2])
    assert result.exit_code == 0, result.output
    assert "torchvision vgg16_bn" in result.output and "backbone-only file" in result.output
    assert "6 tensors of the ImageNet classifier (classifier.0, classifier.3, classifier.6)" in result.output
    model = build_model("vgg16-lka-full", input_shape=(32, 32, 3), weights=out2)  # serves every VGG16-BN variant
    np.testing.assert_array_equal(model.get_layer("block4_conv1").get_weights()[0],
                                  features[24].weight.detach().numpy().transpose(2, 3, 1, 0))
    assert "kept initial values for block1_lka, block2_lka" in model.weights_report
    bad = CliRunner().invoke(cli, ["convert-weights", tv, "--variant", "vgg16-bn", "--out",
                                   str(tmp_path / "x.weights.h5")])
    assert bad.exit_code != 0 and "give a NAME.h5 file" in bad.output and "Traceback" not in bad.output


def test_mapping_errors_name_the_tensor_and_the_layer(tmp_path):
    reference, path = _thin_paper_vgg(tmp_path, lka=(1, 2, 3, 4, 5))
    with pytest.raises(ConfigError, match=r"tensors lka1\.\* belong to layer block1_lka, which model vgg16_lka_last3 "
                                          r"does not have \(its LKA blocks: block3_lka, block4_lka, block5_lka\)"):
        build_model("vgg16-lka-last3", weights=path, **THIN_VGG)
    with pytest.raises(ConfigError, match=r"tensor block1\.0\.weight \(16, 3, 3, 3\), block1\.0\.bias \(16,\) do not "
                                          r"fit layer block1_conv1 \(it needs \(3, 3, 3, 32\), \(32,\) in Keras"):
        build_model("vgg16-lka-full", input_shape=(64, 64, 3), width_multiplier=0.5, weights=path)
    with pytest.raises(ConfigError, match=r"tensor classifier\.weight \(14, 128\), classifier\.bias \(14,\) do not "
                                          r"fit layer predictions"):
        build_model("vgg16-lka-full", weights=path, num_classes=3, **THIN_VGG)
    state = torch.load(path)
    state["extra.proj.weight"] = torch.zeros(2, 2)
    del state["lka4.pw_conv.bias"]
    broken = str(tmp_path / "broken.pth")
    torch.save(state, broken)
    with pytest.raises(ConfigError) as info:
        build_model("vgg16-lka-full", weights=broken, **THIN_VGG)
    message = str(info.value)
    assert "tensors extra.proj.{weight} map to no layer of vgg16" in message
    assert "layer block4_lka/conv1 takes lka4.pw_conv.weight, lka4.pw_conv.bias; the file lacks lka4.pw_conv.bias" \
        in message
    plain = str(tmp_path / "plain.pth")
    torch.save(VGG16BN(width=0.25).state_dict(), plain)
    with pytest.raises(ConfigError, match="batch-norm tensors: use a VGG16-BN variant"):
        build_model("vgg16-plain", weights=plain, **THIN_VGG)
    head_only = str(tmp_path / "head_only.pth")
    torch.save({"classifier.weight": torch.zeros(1000, 1024), "classifier.bias": torch.zeros(1000)}, head_only)
    with pytest.raises(ConfigError, match="lacks backbone layers of model densenet121: conv1_conv"):
        build_model("densenet121", input_shape=(32, 32, 3), weights=head_only)


def test_pytorch_file_without_torch_says_what_to_do(tmp_path, monkeypatch):
    _, path = _thin_paper_vgg(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ConfigError, match=r"needs torch, which is not installed: `pip install torch`.*"
                                          r"cxrkeras convert-weights FILE --variant V --out FILE.h5"):
        build_model("vgg16-lka-last3", weights=path, **THIN_VGG)


def test_not_a_state_dict(tmp_path):
    path = str(tmp_path / "whole.pt")
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConfigError, match="holds a list, not a state_dict"):
        build_model("vgg16-bn", input_shape=(32, 32, 3), weights=path)
    junk = str(tmp_path / "junk.safetensors")
    with open(junk, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read safetensors file"):
        build_model("vgg16-bn", input_shape=(32, 32, 3), weights=junk)


def test_thin_densenet_paper_layout_matches(tmp_path):
    """Thin models map by the same names (blocks override), so small checkpoints test quickly."""
    reference = randomize(PaperDenseNetLKA((1, 2, 3, 4), **THIN_DENSENET), seed=6, calibration_size=(64, 64))
    path = str(tmp_path / "thin_full.pth")
    torch.save(reference.state_dict(), path)
    model = build_model("densenet121-lka-full", input_shape=(64, 64, 3), width_multiplier=0.25, blocks=(1, 2, 2, 1),
                        weights=path)
    x = _images((64, 64))
    assert np.max(np.abs(_keras_probs(model, x) - _torch_probs(reference, x, True))) <= TOLERANCE


@pytest.mark.parametrize("shape", [(2, 9, 7, 6), (3, 4, 4, 5), (1, 14, 11, 8)], ids=["9x7", "4x4", "14x11"])
def test_lka_values_and_gradients_match_pytorch_and_the_keras_layers(shape):
    """The LKA's depthwise convolutions run through `depthwise_same` (own kernel gradient): its output and its
    gradients (input and every weight) equal the paper's PyTorch LKA module's, and the Keras sub-layers' own call."""
    import tensorflow as tf
    from torch_reference import LKA

    from cxrkeras.models.lka import LargeKernelAttention

    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype("float32")
    layer = LargeKernelAttention()
    layer.build(shape)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.3)
    reference = LKA(shape[-1])
    with torch.no_grad():  # Keras (k, k, C, 1) depthwise / (1, 1, Cin, Cout) kernels -> PyTorch (Cout, Cin/groups, k, k)
        for keras_layer, module in ((layer.conv0, reference.dw_conv1), (layer.conv_spatial, reference.dw_conv2)):
            module.weight.copy_(torch.from_numpy(np.transpose(keras_layer.kernel.numpy(), (2, 3, 0, 1))))
            module.bias.copy_(torch.from_numpy(keras_layer.bias.numpy()))
        reference.pw_conv.weight.copy_(torch.from_numpy(np.transpose(layer.conv1.kernel.numpy(), (3, 2, 0, 1))))
        reference.pw_conv.bias.copy_(torch.from_numpy(layer.conv1.bias.numpy()))

    def keras_grads(fn):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = fn(xt)
            loss = tf.reduce_sum(y * tf.sin(y))
        return [y.numpy()] + [g.numpy() for g in tape.gradient(loss, [xt] + layer.trainable_weights)]

    ours = keras_grads(layer)
    layers = keras_grads(lambda t: t * layer.conv1(layer.conv_spatial(layer.conv0(t))))
    xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2))).requires_grad_(True)
    yt = reference(xt)
    (yt * torch.sin(yt)).sum().backward()
    nhwc = lambda t: np.transpose(t.detach().numpy(), (0, 2, 3, 1))  # noqa: E731
    hwc1 = lambda t: np.transpose(t.detach().numpy(), (2, 3, 0, 1))  # noqa: E731
    torch_side = [nhwc(yt), nhwc(xt.grad), hwc1(reference.dw_conv1.weight.grad), reference.dw_conv1.bias.grad.numpy(),
                  hwc1(reference.dw_conv2.weight.grad), reference.dw_conv2.bias.grad.numpy(),
                  np.transpose(reference.pw_conv.weight.grad.numpy(), (2, 3, 1, 0)), reference.pw_conv.bias.grad.numpy()]
    names = ["output", "d input", "d conv0.kernel", "d conv0.bias", "d conv_spatial.kernel", "d conv_spatial.bias",
             "d conv1.kernel", "d conv1.bias"]
    for name, a, b, t in zip(names, ours, layers, torch_side):
        scale = max(1.0, float(np.abs(t).max()))
        np.testing.assert_allclose(a, t, atol=1e-5 * scale, err_msg=f"{name} vs PyTorch")
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=f"{name} vs the Keras layers")


DEPTHWISE_CASES = {  # (x shape, kernel size, dilation, band): maps below and above the dilated kernel's reach
    "7x7-dil3-crop": ((2, 7, 7, 6), 7, 3, True),
    "9x4-dil3-crop-hw": ((2, 9, 4, 5), 7, 3, True),
    "3x3-5x5-crop": ((3, 3, 3, 4), 5, 1, True),
    "1x1-dil3": ((2, 1, 1, 4), 7, 3, True),
    "20x13-dil3": ((2, 20, 13, 3), 7, 3, True),
    "20x13-dil3-bands3": ((2, 20, 13, 3), 7, 3, 3),
    "11x6-5x5-bands2": ((3, 11, 6, 4), 5, 1, 2),
    "10x10-5x5-bands1": ((1, 10, 10, 2), 5, 1, 1),
}


@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_depthwise_same_matches_pytorch(case):
    """`depthwise_same` (cropped taps on small maps, the kernel gradient by bands) equals PyTorch's grouped conv
    (float64): output, input gradient and kernel gradient, for a non-trivial upstream gradient."""
    import tensorflow as tf

    from cxrkeras.models.lka import depthwise_same

    shape, k, d, band = DEPTHWISE_CASES[case]
    rng = np.random.default_rng(3)
    x, g = (rng.normal(size=shape).astype("float32") for _ in range(2))
    w = rng.normal(size=(k, k, shape[-1], 1)).astype("float32")
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = depthwise_same(xt, wt, d, band=band)
    ours = [y.numpy()] + [t.numpy() for t in tape.gradient(y, [xt, wt], output_gradients=tf.constant(g))]
    xr = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).astype("float64")).requires_grad_(True)
    wr = torch.from_numpy(np.transpose(w, (2, 3, 0, 1)).astype("float64")).requires_grad_(True)
    yr = torch.nn.functional.conv2d(xr, wr, padding=d * (k - 1) // 2, dilation=d, groups=shape[-1])
    yr.backward(torch.from_numpy(np.transpose(g, (0, 3, 1, 2)).astype("float64")))
    reference = [np.transpose(yr.detach().numpy(), (0, 2, 3, 1)), np.transpose(xr.grad.numpy(), (0, 2, 3, 1)),
                 np.transpose(wr.grad.numpy(), (2, 3, 0, 1))]
    for name, a, b in zip(("output", "d input", "d kernel"), ours, reference):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), err_msg=name)


def test_depthwise_same_bands_on_large_maps_and_unknown_sizes(monkeypatch):
    """The automatic bands (a small BAND_BYTES forces several) and a map size unknown until run (one band, no
    cropping) give the kernel gradient of the whole-map computation; band_rows bounds the band count."""
    import tensorflow as tf

    from cxrkeras.models import lka

    rng = np.random.default_rng(4)
    x, g = (tf.constant(rng.normal(size=(2, 12, 5, 3)).astype("float32")) for _ in range(2))
    w = tf.constant(rng.normal(size=(7, 7, 3, 1)).astype("float32"))

    def kernel_gradient(band, signature=None):
        @tf.function(input_signature=signature)
        def run(x, w):
            with tf.GradientTape() as tape:
                tape.watch(w)
                y = lka.depthwise_same(x, w, 3, band=band)
            return tape.gradient(y, w, output_gradients=g)
        return run(x, w).numpy()

    whole = kernel_gradient(False)
    monkeypatch.setattr(lka, "BAND_BYTES", 4 * 5 * 3 * 2)  # 2 rows of one image a band; the map holds 6 bands
    assert lka.band_rows(12, 5, 3) == 2
    assert lka.band_rows(12, 5, 3, band=False) == 12 and lka.band_rows(12, 5, 3, band=5) == 5
    assert lka.band_rows(100, 5, 3) == 7  # at most MAX_BANDS (16) bands
    assert lka.band_rows(4, 5, 3) == 4  # a map within 2 x BAND_BYTES: one band
    np.testing.assert_allclose(kernel_gradient(True), whole, atol=1e-5 * float(np.abs(whole).max()))
    unknown = [tf.TensorSpec((None, None, None, 3)), tf.TensorSpec((7, 7, 3, 1))]
    np.testing.assert_allclose(kernel_gradient(True, unknown), whole, atol=1e-5 * float(np.abs(whole).max()))
    assert lka.taps_inside(7, 7, 3) == 2 and lka.taps_inside(10, 7, 3) == 3 and lka.taps_inside(None, 7, 3) == 3
