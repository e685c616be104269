"""PyTorch module names -> cxrkeras layer names: torchvision's, timm's and the paper's, for DenseNet121 and VGG16."""

import re

LKA_SUBLAYERS = {"conv0": ("dw_conv1", "conv0"), "conv_spatial": ("dw_conv2", "conv_spatial"),
                 "conv1": ("pw_conv", "conv1")}  # LargeKernelAttention sub-layer: (the paper's name, VAN's)
# The head as nn.Linear, or nn.Sequential(Linear) / nn.Sequential(Dropout, Linear).
HEAD_PREFIXES = ["classifier", "classifier.0", "classifier.1"]


def _add_lka(names, layer, prefix):
    for sub, torch_names in LKA_SUBLAYERS.items():
        names[(layer, sub)] = [f"{prefix}.{t}" for t in torch_names]


def densenet_names(blocks):
    """{(keras layer, sub-layer or None): [candidate PyTorch prefixes]} for DenseNet with every LKA position."""
    names = {("conv1_conv", None): ["features.conv0"], ("conv1_bn", None): ["features.norm0"],
             ("bn", None): ["features.norm5"], ("predictions", None): HEAD_PREFIXES}
    for b, num_layers in enumerate(blocks, start=1):
        for i in range(1, num_layers + 1):
            p, k = f"features.denseblock{b}.denselayer{i}", f"conv{b + 1}_block{i}"
            for keras_suffix, torch_suffix in (("0_bn", "norm1"), ("1_conv", "conv1"), ("1_bn", "norm2"),
                                               ("2_conv", "conv2")):
                names[(f"{k}_{keras_suffix}", None)] = [f"{p}.{torch_suffix}"]
        if b < len(blocks):
            names[(f"pool{b + 1}_bn", None)] = [f"features.transition{b}.norm"]
            names[(f"pool{b + 1}_conv", None)] = [f"features.transition{b}.conv"]
        _add_lka(names, f"conv{b + 1}_lka", f"att_block{b}")
    _add_lka(names, "lka_after", "lka")
    return names


def vgg_names(blocks, batch_norm):
    """The same for VGG16: `features.<i>` (torchvision/timm, the paper's "after") or `block<b>.<i>` (the paper's
    slices, indices from 0 as nn.Sequential(*features[a:b]) gives, or kept as features[a:b] keeps them)."""
    names = {("predictions", None): HEAD_PREFIXES}
    index = 0
    step = 3 if batch_norm else 2  # conv, (BN,) ReLU
    for b, (_, num_convs) in enumerate(blocks, start=1):
        local = 0
        for j in range(1, num_convs + 1):
            conv = f"block{b}_conv{j}"
            names[(conv, None)] = [f"features.{index}", f"block{b}.{local}", f"block{b}.{index}"]
            if batch_norm:
                names[(f"{conv}_bn", None)] = [f"features.{index + 1}", f"block{b}.{local + 1}",
                                               f"block{b}.{index + 1}"]
            index, local = index + step, local + step
        index += 1  # the max-pool
        _add_lka(names, f"block{b}_lka", f"lka{b}")
    _add_lka(names, "lka_after", "lka")
    return names


_VGG_FC = ("classifier.0", "classifier.3", "classifier.6")  # torchvision VGG's three-layer classifier


def imagenet_head(prefix, params, num_classes, prefixes):
    """True for torchvision's / timm's ImageNet classifier, which a GAP -> Dense head cannot use: VGG's three fully
    connected layers (timm: pre_logits + head.fc), or a 1000-way Linear when the model has another size."""
    if prefix.startswith(("pre_logits.", "head.fc")) or (prefix in _VGG_FC and all(p in prefixes for p in _VGG_FC)):
        return True
    weight = params.get("weight")
    return (prefix in HEAD_PREFIXES and weight is not None and weight.ndim == 2
            and weight.shape[0] == 1000 and num_classes != 1000)


def describe_layout(prefixes, backbone):
    """A human name for the file's layout, from its module prefixes."""
    lka = sorted({p.split(".")[0] for p in prefixes if re.match(r"^(att_block\d|lka\d?)(\.|$)", p)})
    if backbone == "densenet121":
        base = "DenseNet121 (torchvision / timm module names)"
    elif any(p.startswith("block1.") for p in prefixes):
        base = "VGG16-BN as the paper's block1..5 slices"
    elif any(p.startswith("pre_logits.") for p in prefixes):
        base = "timm vgg16_bn"
    elif "classifier.0" in prefixes:
        base = "torchvision vgg16_bn"
    else:
        base = "VGG16 `features` (torchvision module names)"
    return base + (f" + the paper's LKA modules {', '.join(lka)}" if lka else "")
