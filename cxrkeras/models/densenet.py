"""DenseNet121 features with LKA blocks, rebuilt with keras.applications layer names (ImageNet weights load by name)."""

import keras

from cxrkeras.models.placement import AFTER, apply_lka, resolve_placement

DENSENET121_BLOCKS = (6, 12, 24, 16)
NAMED_PLACEMENTS = {"last2": (3, 4), "full": (1, 2, 3, 4)}
MIN_INPUT_SIZE = 32  # stride-2 stem + max-pool + three 2x2 transitions: 32 px leaves a 1x1 map
BN_EPSILON = 1.001e-5  # keras.applications' value, kept so its ImageNet statistics behave the same


def apply_conv_block(x, growth_rate, name):
    """BN-ReLU-1x1(4k)-BN-ReLU-3x3(k), concatenated to the input (keras.applications `conv_block`)."""
    x1 = keras.layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name=f"{name}_0_bn")(x)
    x1 = keras.layers.Activation("relu", name=f"{name}_0_relu")(x1)
    x1 = keras.layers.Conv2D(4 * growth_rate, 1, use_bias=False, name=f"{name}_1_conv")(x1)
    x1 = keras.layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name=f"{name}_1_bn")(x1)
    x1 = keras.layers.Activation("relu", name=f"{name}_1_relu")(x1)
    x1 = keras.layers.Conv2D(growth_rate, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(x1)
    return keras.layers.Concatenate(axis=3, name=f"{name}_concat")([x, x1])


def apply_dense_block(x, num_layers, growth_rate, name):
    for i in range(num_layers):
        x = apply_conv_block(x, growth_rate, name=f"{name}_block{i + 1}")
    return x


def apply_transition_block(x, reduction, name):
    x = keras.layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
    x = keras.layers.Conv2D(int(x.shape[3] * reduction), 1, use_bias=False, name=f"{name}_conv")(x)
    return keras.layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def apply_stem(x, filters, name="conv1"):
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(filters, 7, strides=2, use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)


def apply_densenet_features(x, lka_blocks="none", lka_form="lka", blocks=DENSENET121_BLOCKS, growth_rate=32,
                            stem_filters=64):
    """DenseNet features; returns (tensor, feature_layer_name).

    LKA placement follows the paper's torchvision model: block b's LKA sits after dense block b, before its
    transition (or before the final norm for block 4); "after" sits after the final norm ("bn", the paper's norm5)
    and before the final ReLU, which torchvision applies outside `features`.
    """
    positions = resolve_placement(lka_blocks, len(blocks), NAMED_PLACEMENTS, "DenseNet121")
    feature_layer = "relu"
    x = apply_stem(x, stem_filters)
    for b, num_layers in enumerate(blocks, start=1):
        x = apply_dense_block(x, num_layers, growth_rate, name=f"conv{b + 1}")
        if b in positions:
            feature_layer = f"conv{b + 1}_lka"
            x = apply_lka(x, lka_form, name=feature_layer)
        if b < len(blocks):
            x = apply_transition_block(x, 0.5, name=f"pool{b + 1}")
    x = keras.layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name="bn")(x)
    if AFTER in positions:
        feature_layer = "lka_after"
        x = apply_lka(x, lka_form, name=feature_layer)
    x = keras.layers.Activation("relu", name="relu")(x)
    return x, feature_layer
