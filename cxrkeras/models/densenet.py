"""DenseNet121 features with LKA blocks, rebuilt with keras.applications layer names (ImageNet weights load by name)."""

import keras

from cxrkeras.models.batchnorm import apply_batch_norm
from cxrkeras.models.placement import AFTER, apply_lka, resolve_placement

DENSENET121_BLOCKS = (6, 12, 24, 16)
NAMED_PLACEMENTS = {"last2": (3, 4), "full": (1, 2, 3, 4)}
MIN_INPUT_SIZE = 32  # stride-2 stem + max-pool + three 2x2 transitions: 32 px leaves a 1x1 map
TORCH_BN = dict(epsilon=1e-5, momentum=0.9)  # torchvision / the paper (PyTorch momentum 0.1 = Keras 0.9)


def apply_conv_block(x, growth_rate, name, bn=TORCH_BN):
    """BN-ReLU-1x1(4k)-BN-ReLU-3x3(k), concatenated to the input (keras.applications `conv_block`, torchvision's
    `_DenseLayer`)."""
    x1 = apply_batch_norm(x, bn, f"{name}_0_bn")
    x1 = keras.layers.Activation("relu", name=f"{name}_0_relu")(x1)
    x1 = keras.layers.Conv2D(4 * growth_rate, 1, use_bias=False, name=f"{name}_1_conv")(x1)
    x1 = apply_batch_norm(x1, bn, f"{name}_1_bn")
    x1 = keras.layers.Activation("relu", name=f"{name}_1_relu")(x1)
    x1 = keras.layers.Conv2D(growth_rate, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(x1)
    return keras.layers.Concatenate(axis=3, name=f"{name}_concat")([x, x1])


def apply_dense_block(x, num_layers, growth_rate, name, bn=TORCH_BN):
    for i in range(num_layers):
        x = apply_conv_block(x, growth_rate, name=f"{name}_block{i + 1}", bn=bn)
    return x


def apply_transition_block(x, reduction, name, bn=TORCH_BN):
    x = apply_batch_norm(x, bn, f"{name}_bn")
    x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
    x = keras.layers.Conv2D(int(x.shape[3] * reduction), 1, use_bias=False, name=f"{name}_conv")(x)
    return keras.layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def apply_stem(x, filters, name="conv1", bn=TORCH_BN):
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(filters, 7, strides=2, use_bias=False, name=f"{name}_conv")(x)
    x = apply_batch_norm(x, bn, f"{name}_bn")
    x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
    # Zero padding before the max-pool equals PyTorch's -inf padding here: the input is a ReLU output (>= 0).
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)


def apply_densenet_features(x, lka_blocks="none", lka_form="lka", blocks=DENSENET121_BLOCKS, growth_rate=32,
                            stem_filters=64, final_relu=False, bn=TORCH_BN):
    """DenseNet features; returns (tensor, feature_layer_name, [the outputs of transitions 1-3]).

    The paper's forward: block b's LKA sits after dense block b, before its transition (block 4's before norm5,
    "bn" here); "after" sits after norm5; then the head, with no ReLU in between. `final_relu` adds torchvision's
    `F.relu` after the features (after an "after" LKA), as the `densenet121` baseline does. `bn`: the batch-norm
    epsilon and (Keras) momentum, from the origin of the initial weights. The transitions' outputs
    (pool2_pool, pool3_pool, pool4_pool) are the local features of the attention gates.
    """
    positions = resolve_placement(lka_blocks, len(blocks), NAMED_PLACEMENTS, "DenseNet121")
    x = apply_stem(x, stem_filters, bn=bn)
    feature_layer = None
    transitions = []
    for b, num_layers in enumerate(blocks, start=1):
        x = apply_dense_block(x, num_layers, growth_rate, name=f"conv{b + 1}", bn=bn)
        if b in positions:
            feature_layer = f"conv{b + 1}_lka"
            x = apply_lka(x, lka_form, name=feature_layer)
        if b < len(blocks):
            x = apply_transition_block(x, 0.5, name=f"pool{b + 1}", bn=bn)
            transitions.append(x)
    x = apply_batch_norm(x, bn, "bn")
    if AFTER in positions:
        feature_layer = "lka_after"
        x = apply_lka(x, lka_form, name=feature_layer)
    if final_relu:
        x = keras.layers.Activation("relu", name="relu")(x)
    return x, feature_layer or ("relu" if final_relu else "bn"), transitions
